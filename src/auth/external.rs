//! Access tokens from the hospital's OpenID Connect provider (`oidc_issuer`): discovery of its
//! JWKS, signature checks with an algorithm allow-list (never `none`, never HMAC), `iss`, `aud`,
//! `exp` and `nbf`, and the role taken from a configured claim.

use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tokio::sync::RwLock;

use super::tokens::TokenError;

/// Asymmetric algorithms accepted from the external issuer.
const ALLOWED_ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Unknown key ids trigger at most one JWKS refresh per this interval (key rotation, no storms).
const REFRESH_AT_MOST_EVERY: Duration = Duration::from_secs(30);
const LEEWAY_SECONDS: u64 = 30;

/// Why the external issuer could not be used at start.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot reach the OpenID provider at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the OpenID provider's discovery document is unusable: {0}")]
    BadDocument(String),
}

/// Claims taken from a verified external access token.
#[derive(Debug, Clone)]
pub struct ExternalClaims {
    pub subject: String,
    pub role: Option<String>,
    pub scope: String,
    pub token_id: Option<String>,
    /// The `purpose_of_use` claim, when the provider states one.
    pub purpose_of_use: Option<String>,
}

/// A discovered external issuer and its cached keys.
#[derive(Debug)]
pub struct ExternalIssuer {
    issuer: String,
    audience: String,
    role_claim: String,
    jwks_uri: String,
    /// Where the console sends people to sign in, and trades codes for tokens.
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    http: reqwest::Client,
    keys: RwLock<(JwkSet, Instant)>,
}

impl ExternalIssuer {
    /// Reads `<issuer>/.well-known/openid-configuration` (its `issuer` must match exactly) and
    /// the JWKS it names.
    pub async fn discover(
        issuer: &str,
        audience: &str,
        role_claim: &str,
    ) -> Result<Self, DiscoveryError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|error| DiscoveryError::BadDocument(error.to_string()))?;
        let url = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let document: serde_json::Value = fetch_json(&http, &url).await?;
        if document["issuer"].as_str() != Some(issuer) {
            return Err(DiscoveryError::BadDocument(format!(
                "issuer is {:?}, expected {issuer:?}",
                document["issuer"]
            )));
        }
        let jwks_uri = document["jwks_uri"]
            .as_str()
            .ok_or_else(|| DiscoveryError::BadDocument("no jwks_uri".to_owned()))?
            .to_owned();
        let endpoint = |name: &str| {
            document[name]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_default()
        };
        let authorization_endpoint = endpoint("authorization_endpoint");
        let token_endpoint = endpoint("token_endpoint");
        let keys: JwkSet = fetch_json(&http, &jwks_uri).await?;
        Ok(Self {
            authorization_endpoint,
            token_endpoint,
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            role_claim: role_claim.to_owned(),
            jwks_uri,
            http,
            keys: RwLock::new((keys, Instant::now())),
        })
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Verifies an access token issued by this provider.
    pub async fn verify(&self, token: &str) -> Result<ExternalClaims, TokenError> {
        let claims = self.decode_signed(token, &self.audience).await?;
        Ok(ExternalClaims {
            subject: claims["sub"].as_str().unwrap_or_default().to_owned(),
            role: role_from(&claims[self.role_claim.as_str()]),
            scope: scope_from(&claims),
            token_id: claims["jti"].as_str().map(str::to_owned),
            purpose_of_use: claims["purpose_of_use"].as_str().map(str::to_owned),
        })
    }

    /// The HTTP client used toward the provider (no redirects, 10 s timeout).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Verifies an ID token from the code flow: signature, `iss`, `aud` = our client id, expiry
    /// and the `nonce` of this login. Returns its claims.
    pub async fn verify_id_token(
        &self,
        token: &str,
        client_id: &str,
        nonce: &str,
    ) -> Result<serde_json::Value, TokenError> {
        let claims = self.decode_signed(token, client_id).await?;
        let presented = claims["nonce"].as_str().unwrap_or_default();
        let matches: bool =
            subtle::ConstantTimeEq::ct_eq(presented.as_bytes(), nonce.as_bytes()).into();
        if !matches {
            return Err(TokenError::WrongAudience);
        }
        Ok(claims)
    }

    /// The role named by the configured role claim of `claims`.
    pub fn role_of(&self, claims: &serde_json::Value) -> Option<String> {
        role_from(&claims[self.role_claim.as_str()])
    }

    /// Checks a JWT from this provider: allowed algorithm, known key, signature, `iss`, `aud`
    /// = `audience`, `exp` and `nbf`. Returns its claims.
    async fn decode_signed(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<serde_json::Value, TokenError> {
        use jsonwebtoken::errors::ErrorKind;
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if !ALLOWED_ALGORITHMS.contains(&header.alg) {
            return Err(TokenError::AlgorithmNotAllowed);
        }
        let kid = header.kid.ok_or(TokenError::UnknownKey)?;
        let key = self.key_for(&kid).await?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let decoded = jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation).map_err(
            |error| match error.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                ErrorKind::InvalidIssuer | ErrorKind::InvalidAudience => TokenError::WrongAudience,
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                _ => TokenError::Malformed,
            },
        )?;
        Ok(decoded.claims)
    }

    /// The key `kid`, refreshing the JWKS once if it is unknown (the provider rotated keys).
    async fn key_for(&self, kid: &str) -> Result<DecodingKey, TokenError> {
        {
            let keys = self.keys.read().await;
            if let Some(jwk) = keys.0.find(kid) {
                return DecodingKey::from_jwk(jwk).map_err(|_| TokenError::UnknownKey);
            }
            if keys.1.elapsed() < REFRESH_AT_MOST_EVERY {
                return Err(TokenError::UnknownKey);
            }
        }
        // One refresh at a time, and the attempt (not only a success) starts the interval, so
        // forged kids cannot make us hammer a provider that is down.
        let mut keys = self.keys.write().await;
        if let Some(jwk) = keys.0.find(kid) {
            return DecodingKey::from_jwk(jwk).map_err(|_| TokenError::UnknownKey);
        }
        if keys.1.elapsed() < REFRESH_AT_MOST_EVERY {
            return Err(TokenError::UnknownKey);
        }
        keys.1 = Instant::now();
        let fresh: JwkSet = fetch_json(&self.http, &self.jwks_uri)
            .await
            .map_err(|_| TokenError::UnknownKey)?;
        keys.0 = fresh;
        let jwk = keys.0.find(kid).ok_or(TokenError::UnknownKey)?;
        DecodingKey::from_jwk(jwk).map_err(|_| TokenError::UnknownKey)
    }
}

async fn fetch_json<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    url: &str,
) -> Result<T, DiscoveryError> {
    let unreachable = |reason: String| DiscoveryError::Unreachable {
        url: url.to_owned(),
        reason,
    };
    let response = http
        .get(url)
        .send()
        .await
        .map_err(|error| unreachable(error.to_string()))?;
    if !response.status().is_success() {
        return Err(unreachable(format!("HTTP {}", response.status())));
    }
    response
        .json()
        .await
        .map_err(|error| DiscoveryError::BadDocument(format!("{url}: {error}")))
}

/// The first of the claim's values that names a role (a string or an array of strings).
fn role_from(claim: &serde_json::Value) -> Option<String> {
    let known = ["clinician", "researcher", "compliance", "device", "admin"];
    let values: Vec<&str> = match claim {
        serde_json::Value::String(text) => vec![text.as_str()],
        serde_json::Value::Array(items) => items.iter().filter_map(|item| item.as_str()).collect(),
        _ => Vec::new(),
    };
    values
        .into_iter()
        .find(|value| known.contains(value))
        .map(str::to_owned)
}

/// Granted scopes from `scope` (space-separated) or `scp` (array).
fn scope_from(claims: &serde_json::Value) -> String {
    if let Some(text) = claims["scope"].as_str() {
        return text.to_owned();
    }
    claims["scp"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|item| item.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}
