//! Turns a request's bearer token into a [`Principal`]. Refuses anything else with 401 (audited,
//! and counted toward the source address's back-off) and over-eager callers with 429.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::access::{Principal, Role};

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller(pub Arc<Principal>);

/// Why a request has no caller: a missing or invalid token (401), or too many requests (429).
#[derive(Debug)]
pub enum Unauthenticated {
    Refused(&'static str),
    Throttled(Duration),
    /// An unknown purpose of use (400).
    BadPurpose,
}

impl IntoResponse for Unauthenticated {
    fn into_response(self) -> Response {
        let (status, code, diagnostics, retry_after) = match self {
            Self::Refused(reason) => (StatusCode::UNAUTHORIZED, "login", reason, None),
            Self::Throttled(wait) => (
                StatusCode::TOO_MANY_REQUESTS,
                "throttled",
                "too many requests; retry later",
                Some(wait.as_secs().max(1)),
            ),
            Self::BadPurpose => (
                StatusCode::BAD_REQUEST,
                "value",
                "X-Purpose-Of-Use must be TREAT, ETREAT, HOPERAT or HRESCH",
                None,
            ),
        };
        let outcome = serde_json::json!({
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
        });
        let mut response = (
            status,
            [(header::CONTENT_TYPE, "application/fhir+json")],
            axum::Json(outcome),
        )
            .into_response();
        let headers = response.headers_mut();
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(seconds) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// The source address of a request, when the server recorded it.
pub fn source_address(parts: &Parts) -> Option<String> {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(address)| address.ip().to_string())
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = Unauthenticated;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let network_address = source_address(parts);
        let address_key = format!(
            "address:{}",
            network_address.as_deref().unwrap_or("unknown")
        );
        // A valid token always works; only failing attempts meet the back-off (so a client
        // sharing an address with a misbehaving one, e.g. behind NAT, is not locked out).
        let claims = match bearer_token(parts) {
            None => Err(crate::auth::TokenError::Malformed),
            Some(token) => verify_token(state, token).await,
        };
        let claims = match claims {
            Ok(claims) => claims,
            Err(error) => {
                if let Some(wait) = state.throttle.failures.blocked_for(&address_key) {
                    return Err(Unauthenticated::Throttled(wait));
                }
                if bearer_token(parts).is_none() {
                    return Err(Unauthenticated::Refused(
                        "a bearer access token is required",
                    ));
                }
                // An expired token is an honest client's normal life, not an attack.
                if error != crate::auth::TokenError::Expired {
                    state.throttle.failures.record_failure(&address_key);
                }
                let reason = format!("access token refused: {error}");
                if let Err(journal_error) = state
                    .appliance
                    .records
                    .journal_authentication(
                        "unknown",
                        network_address.as_deref(),
                        None,
                        Some(&reason),
                    )
                    .await
                {
                    tracing::error!(error = %journal_error, "authentication failure was not journaled");
                }
                return Err(Unauthenticated::Refused(
                    "the access token is invalid or expired",
                ));
            }
        };
        if let Err(wait) = state.throttle.clients.take(&claims.sub) {
            return Err(Unauthenticated::Throttled(wait));
        }
        let role: Role = claims
            .role
            .as_deref()
            .and_then(|role| role.parse().ok())
            .ok_or(Unauthenticated::Refused(
                "the access token names no known role",
            ))?;
        let request_id = parts
            .headers
            .get("x-request-id")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let purpose_of_use = purpose_of_use(parts, claims.purpose_of_use.as_deref())?;
        Ok(Caller(Arc::new(Principal {
            id: claims.sub,
            role,
            scopes: claims
                .scope
                .split_whitespace()
                .filter_map(|text| text.parse().ok())
                .collect(),
            token_id: claims.token_id,
            network_address,
            purpose_of_use,
            request_id,
            break_glass_reason: break_glass_reason(parts),
        })))
    }
}

/// The purposes of use the policies know.
const PURPOSES: &[&str] = &["TREAT", "ETREAT", "HOPERAT", "HRESCH"];

/// The purpose of use: a token's claim wins (the identity provider vouched for it and the
/// caller may not change it); otherwise the `X-Purpose-Of-Use` header. An unknown value is
/// refused rather than dropped, so it cannot fall back to "no stated purpose".
fn purpose_of_use(parts: &Parts, claimed: Option<&str>) -> Result<Option<String>, Unauthenticated> {
    if let Some(claimed) = claimed {
        if !PURPOSES.contains(&claimed) {
            return Err(Unauthenticated::BadPurpose);
        }
        return Ok(Some(claimed.to_owned()));
    }
    let Some(header) = parts.headers.get("x-purpose-of-use") else {
        return Ok(None);
    };
    let value = header.to_str().map_err(|_| Unauthenticated::BadPurpose)?;
    if !PURPOSES.contains(&value) {
        return Err(Unauthenticated::BadPurpose);
    }
    Ok(Some(value.to_owned()))
}

/// The emergency-access reason of `X-Break-Glass-Reason`: one line, at most 500 characters.
fn break_glass_reason(parts: &Parts) -> Option<String> {
    let reason = parts
        .headers
        .get("x-break-glass-reason")?
        .to_str()
        .ok()?
        .trim();
    if reason.is_empty() || reason.chars().any(char::is_control) {
        return None;
    }
    Some(reason.chars().take(500).collect())
}

/// What every accepted access token says, whoever issued it.
struct VerifiedClaims {
    sub: String,
    role: Option<String>,
    scope: String,
    token_id: Option<String>,
    purpose_of_use: Option<String>,
}

/// Verifies our own tokens, or, when `oidc_issuer` is set and the token names it, the external
/// provider's. The unverified `iss` only chooses which check runs.
async fn verify_token(
    state: &AppState,
    token: &str,
) -> Result<VerifiedClaims, crate::auth::TokenError> {
    if let Some(external) = &state.appliance.external_issuer
        && claimed_issuer(token).as_deref() == Some(external.issuer())
    {
        let claims = external.verify(token).await?;
        return Ok(VerifiedClaims {
            sub: claims.subject,
            role: claims.role,
            scope: claims.scope,
            token_id: claims.token_id,
            purpose_of_use: claims.purpose_of_use,
        });
    }
    let claims = match state.appliance.tokens.verify(token) {
        Err(crate::auth::TokenError::UnknownKey) => {
            // Another replica may have rotated the key already: reload (rate-limited), retry.
            state.appliance.reload_token_keys_if_due().await;
            state.appliance.tokens.verify(token)?
        }
        other => other?,
    };
    Ok(VerifiedClaims {
        sub: claims.sub,
        role: Some(claims.role),
        scope: claims.scope,
        token_id: Some(claims.jti),
        purpose_of_use: None,
    })
}

fn claimed_issuer(token: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims["iss"].as_str().map(str::to_owned)
}

fn bearer_token(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))?;
    Some(token.trim())
}
