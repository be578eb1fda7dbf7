//! The appliance's access tokens: compact JWTs signed with Ed25519 (`EdDSA`), five minutes by
//! default, verified with an algorithm allow-list of exactly one.

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

/// Why a token was refused. Never includes the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the access token is malformed")]
    Malformed,
    #[error("the access token uses an algorithm that is not allowed")]
    AlgorithmNotAllowed,
    #[error("the access token was signed by an unknown key")]
    UnknownKey,
    #[error("the access token signature is invalid")]
    BadSignature,
    #[error("the access token has expired")]
    Expired,
    #[error("the access token is not valid yet")]
    NotYetValid,
    #[error("the access token was issued for another audience or issuer")]
    WrongAudience,
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    alg: String,
    typ: String,
    kid: String,
}

/// The claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccessClaims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub exp: i64,
    pub iat: i64,
    pub nbf: i64,
    pub jti: String,
    pub scope: String,
    pub role: String,
}

/// One signing key, its public half (derived once: deriving it is a scalar multiplication) and
/// its id (the first 8 bytes of SHA-256 of the public key, hex).
struct TokenKey {
    signing_key: SigningKey,
    verifying_key: VerifyingKey,
    key_id: String,
}

impl TokenKey {
    fn from_seed(seed: &[u8; 32]) -> Self {
        let signing_key = SigningKey::from_bytes(seed);
        let verifying_key = signing_key.verifying_key();
        let key_id = hex::encode(&sha2::Sha256::digest_bytes(verifying_key.as_bytes())[..8]);
        Self {
            signing_key,
            verifying_key,
            key_id,
        }
    }
}

/// The most verified tokens remembered; past it the memory starts over (a miss only costs the
/// signature check it saves).
const MAX_REMEMBERED_TOKENS: usize = 4096;

/// Tokens whose signature, issuer and audience already verified under the current key set, by
/// the SHA-256 of the whole token: a client sends the same token with every request for its
/// lifetime, and the Ed25519 check was the largest cost of authenticating one. The times are
/// checked again at every use; a new key set forgets everything, and a check that started under
/// the previous key set is not remembered.
#[derive(Default)]
struct VerifiedTokens {
    remembered: Mutex<RememberedTokens>,
}

#[derive(Default)]
struct RememberedTokens {
    /// Moves on with every new key set.
    key_set_generation: u64,
    claims_by_digest: HashMap<[u8; 32], AccessClaims>,
}

impl VerifiedTokens {
    fn digest(token: &str) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(token.as_bytes()).into()
    }

    /// The remembered claims of a token, or the key set generation to remember a check under.
    fn recall(&self, digest: &[u8; 32]) -> Result<AccessClaims, u64> {
        let remembered = self.lock();
        match remembered.claims_by_digest.get(digest) {
            Some(claims) => Ok(claims.clone()),
            None => Err(remembered.key_set_generation),
        }
    }

    fn remember(&self, digest: [u8; 32], claims: &AccessClaims, key_set_generation: u64) {
        let mut remembered = self.lock();
        if remembered.key_set_generation != key_set_generation {
            return;
        }
        if remembered.claims_by_digest.len() >= MAX_REMEMBERED_TOKENS {
            remembered.claims_by_digest.clear();
        }
        remembered.claims_by_digest.insert(digest, claims.clone());
    }

    fn forget(&self, digest: &[u8; 32]) {
        self.lock().claims_by_digest.remove(digest);
    }

    fn forget_all(&self) {
        let mut remembered = self.lock();
        remembered.key_set_generation += 1;
        remembered.claims_by_digest.clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RememberedTokens> {
        self.remembered
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

/// Signs and verifies the appliance's access tokens. Holds the current key and, after a
/// rotation, the previous one: tokens it signed keep verifying (and its public key stays in the
/// JWKS) until the next rotation, far longer than any token lives.
pub struct TokenIssuer {
    /// Newest first; the first signs.
    keys: std::sync::RwLock<Vec<TokenKey>>,
    verified: VerifiedTokens,
    issuer: String,
    lifetime_seconds: i64,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("TokenIssuer")
            .field("key_ids", &self.key_ids())
            .field("issuer", &self.issuer)
            .finish()
    }
}

/// Allowed clock skew between the appliance and itself across replicas.
const LEEWAY_SECONDS: i64 = 30;

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

impl TokenIssuer {
    pub fn new(seed: &[u8; 32], issuer: String, lifetime_seconds: u64) -> Self {
        Self::with_keys(&[*seed], issuer, lifetime_seconds)
    }

    /// An issuer over several key seeds, newest (the signing one) first.
    pub fn with_keys(seeds: &[[u8; 32]], issuer: String, lifetime_seconds: u64) -> Self {
        Self {
            keys: std::sync::RwLock::new(seeds.iter().map(TokenKey::from_seed).collect()),
            verified: VerifiedTokens::default(),
            issuer,
            lifetime_seconds: i64::try_from(lifetime_seconds).unwrap_or(300),
        }
    }

    /// Swaps in a new key set (newest first) after a rotation; ignored when empty.
    pub fn replace_keys(&self, seeds: &[[u8; 32]]) {
        if seeds.is_empty() {
            return;
        }
        let mut keys = self
            .keys
            .write()
            .unwrap_or_else(|poison| poison.into_inner());
        *keys = seeds.iter().map(TokenKey::from_seed).collect();
        // A key that left the set must not keep its tokens valid through the memory.
        self.verified.forget_all();
    }

    /// The ids of the keys in use, newest first.
    pub fn key_ids(&self) -> Vec<String> {
        self.keys
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
            .iter()
            .map(|key| key.key_id.clone())
            .collect()
    }

    /// The issuer (and audience) of the tokens: the server's base URL.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn lifetime_seconds(&self) -> i64 {
        self.lifetime_seconds
    }

    /// Issues a token for a client with its role and granted scopes.
    pub fn issue(&self, subject: &str, role: &str, scope: &str) -> String {
        let now = unix_now();
        let claims = AccessClaims {
            iss: self.issuer.clone(),
            sub: subject.to_owned(),
            aud: self.issuer.clone(),
            exp: now + self.lifetime_seconds,
            iat: now,
            nbf: now,
            jti: uuid::Uuid::new_v4().to_string(),
            scope: scope.to_owned(),
            role: role.to_owned(),
        };
        let keys = self
            .keys
            .read()
            .unwrap_or_else(|poison| poison.into_inner());
        let Some(current) = keys.first() else {
            return String::new();
        };
        let header = Header {
            alg: "EdDSA".to_owned(),
            typ: "at+jwt".to_owned(),
            kid: current.key_id.clone(),
        };
        let encode = |value: &dyn erased::Json| URL_SAFE_NO_PAD.encode(value.to_json());
        let signing_input = format!("{}.{}", encode(&header), encode(&claims));
        let signature = current.signing_key.sign(signing_input.as_bytes());
        format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.to_bytes())
        )
    }

    /// Verifies a token's algorithm, key, signature, times, issuer and audience. A token that
    /// verified before under the same key set skips the signature check; its times are checked
    /// again.
    pub fn verify(&self, token: &str) -> Result<AccessClaims, TokenError> {
        let digest = VerifiedTokens::digest(token);
        let key_set_generation = match self.verified.recall(&digest) {
            Ok(claims) => {
                if let Err(error) = check_times(&claims) {
                    self.verified.forget(&digest);
                    return Err(error);
                }
                return Ok(claims);
            }
            Err(key_set_generation) => key_set_generation,
        };
        let claims = self.verify_signed(token)?;
        self.verified.remember(digest, &claims, key_set_generation);
        Ok(claims)
    }

    /// The full check of a token not verified before.
    fn verify_signed(&self, token: &str) -> Result<AccessClaims, TokenError> {
        let mut parts = token.split('.');
        let (Some(header_part), Some(claims_part), Some(signature_part), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let header: Header = decode_part(header_part)?;
        if header.alg != "EdDSA" {
            return Err(TokenError::AlgorithmNotAllowed);
        }
        let verifying_key = {
            let keys = self
                .keys
                .read()
                .unwrap_or_else(|poison| poison.into_inner());
            keys.iter()
                .find(|key| bool::from(header.kid.as_bytes().ct_eq(key.key_id.as_bytes())))
                .map(|key| key.verifying_key)
                .ok_or(TokenError::UnknownKey)?
        };
        let signature_bytes = URL_SAFE_NO_PAD
            .decode(signature_part)
            .map_err(|_| TokenError::Malformed)?;
        let signature =
            Signature::from_slice(&signature_bytes).map_err(|_| TokenError::Malformed)?;
        let signing_input = &token[..header_part.len() + 1 + claims_part.len()];
        verifying_key
            .verify(signing_input.as_bytes(), &signature)
            .map_err(|_| TokenError::BadSignature)?;
        let claims: AccessClaims = decode_part(claims_part)?;
        check_times(&claims)?;
        if claims.iss != self.issuer || claims.aud != self.issuer {
            return Err(TokenError::WrongAudience);
        }
        Ok(claims)
    }

    /// The public key set served at `/auth/jwks`.
    pub fn jwks(&self) -> serde_json::Value {
        let keys = self
            .keys
            .read()
            .unwrap_or_else(|poison| poison.into_inner());
        let published: Vec<serde_json::Value> = keys
            .iter()
            .map(|key| {
                let public: &VerifyingKey = &key.verifying_key;
                serde_json::json!({
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "alg": "EdDSA",
                    "use": "sig",
                    "kid": key.key_id,
                    "x": URL_SAFE_NO_PAD.encode(public.as_bytes()),
                })
            })
            .collect();
        serde_json::json!({ "keys": published })
    }
}

/// Whether the token is valid now (with [`LEEWAY_SECONDS`] either way).
fn check_times(claims: &AccessClaims) -> Result<(), TokenError> {
    let now = unix_now();
    if claims.exp + LEEWAY_SECONDS < now {
        return Err(TokenError::Expired);
    }
    if claims.nbf - LEEWAY_SECONDS > now {
        return Err(TokenError::NotYetValid);
    }
    Ok(())
}

fn decode_part<T: for<'de> Deserialize<'de>>(part: &str) -> Result<T, TokenError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)
}

/// Small helper so header and claims serialize through one closure.
mod erased {
    pub trait Json {
        fn to_json(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> Vec<u8> {
            serde_json::to_vec(self).unwrap_or_default()
        }
    }
}

trait DigestBytes {
    fn digest_bytes(data: &[u8]) -> Vec<u8>;
}

impl DigestBytes for sha2::Sha256 {
    fn digest_bytes(data: &[u8]) -> Vec<u8> {
        use sha2::Digest;
        sha2::Sha256::digest(data).to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer() -> TokenIssuer {
        TokenIssuer::new(&[3u8; 32], "https://appliance.test".to_owned(), 300)
    }

    #[test]
    fn issued_tokens_verify() {
        let token = issuer().issue("client-1", "clinician", "system/*.rs");
        let claims = issuer().verify(&token).unwrap();
        assert_eq!(claims.sub, "client-1");
        assert_eq!(claims.scope, "system/*.rs");
    }

    #[test]
    fn forged_tokens_are_refused() {
        let token = issuer().issue("client-1", "clinician", "system/*.rs");
        let other = TokenIssuer::new(&[4u8; 32], "https://appliance.test".to_owned(), 300);
        assert_eq!(other.verify(&token), Err(TokenError::UnknownKey));
        let parts: Vec<&str> = token.split('.').collect();
        let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"at+jwt","kid":"x"}"#);
        assert_eq!(
            issuer().verify(&format!("{none_header}.{}.", parts[1])),
            Err(TokenError::AlgorithmNotAllowed)
        );
        let tampered_claims = URL_SAFE_NO_PAD.encode(
            String::from_utf8(URL_SAFE_NO_PAD.decode(parts[1]).unwrap())
                .unwrap()
                .replace("clinician", "admin"),
        );
        assert_eq!(
            issuer().verify(&format!("{}.{}.{}", parts[0], tampered_claims, parts[2])),
            Err(TokenError::BadSignature)
        );
        assert_eq!(issuer().verify("garbage"), Err(TokenError::Malformed));
    }

    #[test]
    fn expired_tokens_are_refused() {
        let expired = TokenIssuer::new(&[3u8; 32], "https://appliance.test".to_owned(), 0);
        let mut token_issuer = expired;
        token_issuer.lifetime_seconds = -120;
        let token = token_issuer.issue("client-1", "clinician", "");
        assert_eq!(issuer().verify(&token), Err(TokenError::Expired));
    }

    #[test]
    fn a_remembered_token_still_expires() {
        let token_issuer = issuer();
        let token = token_issuer.issue("client-1", "clinician", "");
        let mut claims = token_issuer.verify(&token).unwrap();
        claims.exp = unix_now() - 2 * LEEWAY_SECONDS;
        token_issuer
            .verified
            .remember(VerifiedTokens::digest(&token), &claims, 0);
        assert_eq!(token_issuer.verify(&token), Err(TokenError::Expired));
    }

    #[test]
    fn a_new_key_set_forgets_verified_tokens() {
        let token_issuer = issuer();
        let token = token_issuer.issue("client-1", "clinician", "");
        assert!(token_issuer.verify(&token).is_ok());
        token_issuer.replace_keys(&[[5u8; 32]]);
        assert_eq!(token_issuer.verify(&token), Err(TokenError::UnknownKey));
    }

    #[test]
    fn a_check_that_started_under_the_previous_key_set_is_not_remembered() {
        let token_issuer = issuer();
        let token = token_issuer.issue("client-1", "clinician", "");
        let digest = VerifiedTokens::digest(&token);
        let Err(started_under) = token_issuer.verified.recall(&digest) else {
            panic!("nothing was verified yet");
        };
        let claims = token_issuer.verify_signed(&token).unwrap();
        token_issuer.replace_keys(&[[5u8; 32]]);
        token_issuer
            .verified
            .remember(digest, &claims, started_under);
        assert_eq!(token_issuer.verify(&token), Err(TokenError::UnknownKey));
    }
}
