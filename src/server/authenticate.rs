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
        if let Some(wait) = state.throttle.failures.blocked_for(&address_key) {
            return Err(Unauthenticated::Throttled(wait));
        }
        let token = bearer_token(parts).ok_or(Unauthenticated::Refused(
            "a bearer access token is required",
        ))?;
        let claims = match state.appliance.tokens.verify(token) {
            Ok(claims) => claims,
            Err(error) => {
                state.throttle.failures.record_failure(&address_key);
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
            .parse()
            .map_err(|_| Unauthenticated::Refused("the access token names no known role"))?;
        let request_id = parts
            .headers
            .get("x-request-id")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let purpose_of_use = parts
            .headers
            .get("x-purpose-of-use")
            .and_then(|value| value.to_str().ok())
            .filter(|value| matches!(*value, "TREAT" | "ETREAT" | "HOPERAT" | "HRESCH"))
            .map(str::to_owned);
        Ok(Caller(Arc::new(Principal {
            id: claims.sub,
            role,
            scopes: claims
                .scope
                .split_whitespace()
                .filter_map(|text| text.parse().ok())
                .collect(),
            token_id: Some(claims.jti),
            network_address,
            purpose_of_use,
            request_id,
            break_glass_reason: break_glass_reason(parts),
        })))
    }
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

fn bearer_token(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))?;
    Some(token.trim())
}
