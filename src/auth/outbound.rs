//! Tokens for calls the appliance itself makes to another FHIR server (e.g. delivering results
//! to an EHR): OAuth 2.0 client credentials through the `oauth2` crate, authenticating with a
//! client secret or with `private_key_jwt` (SMART Backend Services), cached until shortly before
//! they expire.

use std::time::{Duration, Instant};

use oauth2::basic::BasicClient;
use oauth2::{AuthType, ClientId, ClientSecret, Scope, TokenResponse, TokenUrl};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use tokio::sync::Mutex;

/// Tokens are renewed this long before they expire.
const RENEW_BEFORE_EXPIRY: Duration = Duration::from_secs(30);
/// Client assertions live this long (SMART asks for at most five minutes).
const ASSERTION_LIFETIME_SECONDS: i64 = 120;

/// How the appliance proves itself to the other server's token endpoint.
pub enum OutboundCredential {
    /// `client_secret_basic`.
    Secret(SecretString),
    /// `private_key_jwt`: a PEM private key (PKCS#8), its algorithm (RS384 or ES384) and `kid`.
    PrivateKey {
        pem: SecretBox<Vec<u8>>,
        algorithm: jsonwebtoken::Algorithm,
        key_id: String,
    },
}

impl std::fmt::Debug for OutboundCredential {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Secret(_) => formatter.write_str("Secret(********)"),
            Self::PrivateKey { key_id, .. } => write!(formatter, "PrivateKey({key_id})"),
        }
    }
}

/// Why no token was obtained. No secret appears in the message.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("the token URL is not valid: {0}")]
    BadTokenUrl(String),
    #[error("the private key cannot sign: {0}")]
    BadKey(String),
    #[error("the token endpoint refused or failed: {0}")]
    Refused(String),
}

/// A cached source of access tokens for one remote server.
#[derive(Debug)]
pub struct OutboundTokenSource {
    client_id: String,
    token_url: String,
    credential: OutboundCredential,
    scopes: Vec<String>,
    http: reqwest::Client,
    cached: Mutex<Option<(SecretString, Instant)>>,
}

impl OutboundTokenSource {
    pub fn new(
        token_url: &str,
        client_id: &str,
        credential: OutboundCredential,
        scopes: &[&str],
    ) -> Result<Self, OutboundError> {
        TokenUrl::new(token_url.to_owned())
            .map_err(|error| OutboundError::BadTokenUrl(error.to_string()))?;
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|error| OutboundError::Refused(error.to_string()))?;
        Ok(Self {
            client_id: client_id.to_owned(),
            token_url: token_url.to_owned(),
            credential,
            scopes: scopes.iter().map(|scope| (*scope).to_owned()).collect(),
            http,
            cached: Mutex::new(None),
        })
    }

    /// A valid access token: the cached one, or a fresh one.
    pub async fn access_token(&self) -> Result<SecretString, OutboundError> {
        let mut cached = self.cached.lock().await;
        if let Some((token, expires)) = cached.as_ref()
            && Instant::now() + RENEW_BEFORE_EXPIRY < *expires
        {
            return Ok(token.clone());
        }
        let (token, lifetime) = self.request_token().await?;
        let lifetime = lifetime.min(Duration::from_secs(86_400));
        let expires = Instant::now()
            .checked_add(lifetime)
            .unwrap_or_else(Instant::now);
        *cached = Some((token.clone(), expires));
        Ok(token)
    }

    async fn request_token(&self) -> Result<(SecretString, Duration), OutboundError> {
        let token_url = TokenUrl::new(self.token_url.clone())
            .map_err(|error| OutboundError::BadTokenUrl(error.to_string()))?;
        let client =
            BasicClient::new(ClientId::new(self.client_id.clone())).set_token_uri(token_url);
        let response = match &self.credential {
            OutboundCredential::Secret(secret) => {
                let client = client
                    .set_client_secret(ClientSecret::new(secret.expose_secret().to_owned()))
                    .set_auth_type(AuthType::BasicAuth);
                let mut request = client.exchange_client_credentials();
                for scope in &self.scopes {
                    request = request.add_scope(Scope::new(scope.clone()));
                }
                request.request_async(&self.http).await
            }
            OutboundCredential::PrivateKey {
                pem,
                algorithm,
                key_id,
            } => {
                let assertion = self.client_assertion(pem, *algorithm, key_id)?;
                let client = client.set_auth_type(AuthType::RequestBody);
                let mut request = client
                    .exchange_client_credentials()
                    .add_extra_param(
                        "client_assertion_type",
                        super::assertions::JWT_BEARER_ASSERTION,
                    )
                    .add_extra_param("client_assertion", assertion);
                for scope in &self.scopes {
                    request = request.add_scope(Scope::new(scope.clone()));
                }
                request.request_async(&self.http).await
            }
        }
        .map_err(|error| OutboundError::Refused(error.to_string()))?;
        let lifetime = response.expires_in().unwrap_or(Duration::from_secs(300));
        Ok((
            SecretString::from(response.access_token().secret().to_owned()),
            lifetime,
        ))
    }

    fn client_assertion(
        &self,
        pem: &SecretBox<Vec<u8>>,
        algorithm: jsonwebtoken::Algorithm,
        key_id: &str,
    ) -> Result<String, OutboundError> {
        let key = match algorithm {
            jsonwebtoken::Algorithm::RS384 => {
                jsonwebtoken::EncodingKey::from_rsa_pem(pem.expose_secret())
            }
            jsonwebtoken::Algorithm::ES384 => {
                jsonwebtoken::EncodingKey::from_ec_pem(pem.expose_secret())
            }
            other => {
                return Err(OutboundError::BadKey(format!(
                    "{other:?} is not RS384 or ES384"
                )));
            }
        }
        .map_err(|error| OutboundError::BadKey(error.to_string()))?;
        let mut header = jsonwebtoken::Header::new(algorithm);
        header.kid = Some(key_id.to_owned());
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let claims = serde_json::json!({
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.token_url,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_SECONDS,
            "jti": uuid::Uuid::new_v4().to_string(),
        });
        jsonwebtoken::encode(&header, &claims, &key)
            .map_err(|error| OutboundError::BadKey(error.to_string()))
    }
}
