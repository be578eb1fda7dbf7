//! SMART Backend Services client authentication (`private_key_jwt`): a client proves itself with
//! a short-lived JWT signed by a key from the JWKS it registered. RS384 and ES384 only; `iss` =
//! `sub` = client id, `aud` = our token URL, `exp` at most five minutes ahead, `jti` used once.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use sqlx::Row;

use crate::storage::{Database, StorageError, now_micros};

/// The `client_assertion_type` of a JWT bearer client assertion (RFC 7523).
pub const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The longest an assertion may live, as SMART Backend Services requires.
const MAX_LIFETIME_SECONDS: i64 = 300;

/// Clock skew tolerated on `exp`/`nbf`/`iat`.
const LEEWAY_SECONDS: u64 = 30;

/// Why a client assertion was refused. Answered to the client only as `invalid_client`.
#[derive(Debug, thiserror::Error)]
pub enum AssertionError {
    #[error("client assertion is malformed")]
    Malformed,
    #[error("client assertion algorithm {0} is not allowed (RS384 or ES384)")]
    AlgorithmNotAllowed(String),
    #[error("client assertion names no key id the client registered")]
    UnknownKey,
    #[error("client assertion key does not fit its algorithm")]
    KeyMismatch,
    #[error("client assertion is invalid: {0}")]
    Invalid(String),
    #[error("client assertion iss and sub must both be the client id")]
    WrongSubject,
    #[error("client assertion expires more than five minutes ahead")]
    TooLongLived,
    #[error("client assertion jti was already used")]
    Replayed,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Claims a client assertion must carry.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct AssertionClaims {
    pub iss: String,
    pub sub: String,
    pub exp: i64,
    pub jti: String,
}

/// The client id an assertion claims to come from (unverified: used to find the client's keys).
pub fn claimed_client_id(assertion: &str) -> Result<String, AssertionError> {
    use base64::Engine as _;
    let payload = assertion
        .split('.')
        .nth(1)
        .ok_or(AssertionError::Malformed)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| AssertionError::Malformed)?;
    let claims: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| AssertionError::Malformed)?;
    claims["iss"]
        .as_str()
        .map(str::to_owned)
        .ok_or(AssertionError::Malformed)
}

/// Checks a registered JWKS: every key has a `kid` and is RSA (2048 bits or more) or EC P-384.
pub fn validate_client_jwks(text: &str) -> Result<JwkSet, String> {
    let set: JwkSet = serde_json::from_str(text).map_err(|error| format!("not a JWKS: {error}"))?;
    if set.keys.is_empty() {
        return Err("the JWKS holds no key".to_owned());
    }
    for key in &set.keys {
        let Some(kid) = &key.common.key_id else {
            return Err("every key needs a kid".to_owned());
        };
        match &key.algorithm {
            AlgorithmParameters::RSA(rsa) => {
                use base64::Engine as _;
                let modulus = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(&rsa.n)
                    .map_err(|_| format!("key {kid}: bad modulus"))?;
                if modulus.len() < 256 {
                    return Err(format!("key {kid}: RSA keys need at least 2048 bits"));
                }
            }
            AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P384 => {}
            _ => {
                return Err(format!(
                    "key {kid}: only RSA and EC P-384 keys are accepted"
                ));
            }
        }
    }
    Ok(set)
}

/// Verifies `assertion` for `client_id` against its registered `jwks`, for our `token_url`,
/// and records its `jti` so it cannot be used again.
pub async fn verify_client_assertion(
    database: &Database,
    assertion: &str,
    client_id: &str,
    jwks: &JwkSet,
    token_url: &str,
) -> Result<AssertionClaims, AssertionError> {
    let header = jsonwebtoken::decode_header(assertion).map_err(|_| AssertionError::Malformed)?;
    let algorithm = header.alg;
    if !matches!(algorithm, Algorithm::RS384 | Algorithm::ES384) {
        return Err(AssertionError::AlgorithmNotAllowed(format!(
            "{algorithm:?}"
        )));
    }
    let kid = header.kid.ok_or(AssertionError::UnknownKey)?;
    let jwk = jwks.find(&kid).ok_or(AssertionError::UnknownKey)?;
    let fits = matches!(
        (&jwk.algorithm, algorithm),
        (AlgorithmParameters::RSA(_), Algorithm::RS384)
            | (AlgorithmParameters::EllipticCurve(_), Algorithm::ES384)
    );
    if !fits {
        return Err(AssertionError::KeyMismatch);
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|_| AssertionError::KeyMismatch)?;
    let mut validation = Validation::new(algorithm);
    validation.leeway = LEEWAY_SECONDS;
    validation.set_audience(&[token_url]);
    validation.set_issuer(&[client_id]);
    validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
    validation.validate_nbf = true;
    let claims = jsonwebtoken::decode::<AssertionClaims>(assertion, &key, &validation)
        .map_err(|error| AssertionError::Invalid(error.to_string()))?
        .claims;
    if claims.sub != client_id || claims.iss != client_id {
        return Err(AssertionError::WrongSubject);
    }
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if claims.exp > now + MAX_LIFETIME_SECONDS + LEEWAY_SECONDS as i64 {
        return Err(AssertionError::TooLongLived);
    }
    if claims.jti.is_empty() || claims.jti.len() > 256 {
        return Err(AssertionError::Malformed);
    }
    remember_jti(database, client_id, &claims.jti, claims.exp).await?;
    Ok(claims)
}

/// Stores a used `jti` until its assertion expires; a second use is a replay.
async fn remember_jti(
    database: &Database,
    client_id: &str,
    jti: &str,
    expires_at: i64,
) -> Result<(), AssertionError> {
    let now_seconds = now_micros() / 1_000_000;
    sqlx::query("DELETE FROM client_assertion_jtis WHERE expires_at < $1")
        .bind(now_seconds - LEEWAY_SECONDS as i64)
        .execute(database.pool())
        .await
        .map_err(StorageError::from)?;
    let inserted = sqlx::query(
        "INSERT INTO client_assertion_jtis (client_id, jti, expires_at) VALUES ($1, $2, $3) \
         ON CONFLICT (client_id, jti) DO NOTHING",
    )
    .bind(client_id)
    .bind(jti)
    .bind(expires_at)
    .execute(database.pool())
    .await
    .map_err(StorageError::from)?;
    if inserted.rows_affected() == 0 {
        return Err(AssertionError::Replayed);
    }
    Ok(())
}

/// Largest JWKS document fetched from a client's JWKS URL.
const MAX_JWKS_BYTES: usize = 64 * 1024;
/// How long a fetched JWKS is reused.
const JWKS_URL_CACHE_SECONDS: u64 = 300;

/// Keys fetched from clients' JWKS URLs, reused for a few minutes.
#[derive(Debug, Default)]
pub struct JwksCache {
    entries: std::sync::Mutex<std::collections::HashMap<String, (JwkSet, std::time::Instant)>>,
}

/// Checks a client's JWKS URL: HTTPS, or HTTP on a loopback address only.
pub fn validate_jwks_url(text: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(text).map_err(|error| format!("not a URL: {error}"))?;
    let loopback = matches!(url.host_str(), Some("127.0.0.1" | "localhost" | "[::1]"));
    match url.scheme() {
        "https" => Ok(url),
        "http" if loopback => Ok(url),
        _ => Err("a JWKS URL must use https (http only on loopback)".to_owned()),
    }
}

/// The keys a client authenticates with: registered inline, or fetched from its JWKS URL.
pub async fn registered_jwks(
    database: &Database,
    cache: &JwksCache,
    client_id: &str,
) -> Result<Option<JwkSet>, StorageError> {
    let row = sqlx::query(
        "SELECT jwks, jwks_url FROM clients WHERE client_id = $1 AND disabled_at IS NULL",
    )
    .bind(client_id)
    .fetch_optional(database.pool())
    .await?;
    let Some(row) = row else { return Ok(None) };
    let inline: Option<String> = row.try_get(0)?;
    if let Some(text) = inline {
        return Ok(serde_json::from_str(&text).ok());
    }
    let url: Option<String> = row.try_get(1)?;
    let Some(url) = url else { return Ok(None) };
    Ok(fetch_jwks(cache, &url).await)
}

async fn fetch_jwks(cache: &JwksCache, url: &str) -> Option<JwkSet> {
    {
        let entries = cache
            .entries
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if let Some((keys, fetched)) = entries.get(url)
            && fetched.elapsed().as_secs() < JWKS_URL_CACHE_SECONDS
        {
            return Some(keys.clone());
        }
    }
    validate_jwks_url(url).ok()?;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .ok()?;
    let response = http.get(url).send().await.ok()?;
    if !response.status().is_success() {
        tracing::warn!(status = %response.status(), "client JWKS URL answered with an error");
        return None;
    }
    if response
        .content_length()
        .is_some_and(|length| length > MAX_JWKS_BYTES as u64)
    {
        return None;
    }
    let mut response = response;
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.ok()? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_JWKS_BYTES {
            return None;
        }
    }
    let keys = validate_client_jwks(std::str::from_utf8(&body).ok()?)
        .map_err(|reason| tracing::warn!(reason = %reason, "client JWKS URL serves unusable keys"))
        .ok()?;
    cache
        .entries
        .lock()
        .unwrap_or_else(|poison| poison.into_inner())
        .insert(url.to_owned(), (keys.clone(), std::time::Instant::now()));
    Some(keys)
}
