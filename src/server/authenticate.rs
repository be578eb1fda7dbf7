//! Turns a request's bearer token into a [`Principal`]; refuses anything else with 401.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::access::{Principal, Role};

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller(pub Arc<Principal>);

/// A missing or invalid bearer token.
#[derive(Debug)]
pub struct Unauthenticated(&'static str);

impl IntoResponse for Unauthenticated {
    fn into_response(self) -> Response {
        let outcome = serde_json::json!({
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "login", "diagnostics": self.0}],
        });
        (
            StatusCode::UNAUTHORIZED,
            [
                (header::WWW_AUTHENTICATE, "Bearer"),
                (header::CONTENT_TYPE, "application/fhir+json"),
            ],
            axum::Json(outcome),
        )
            .into_response()
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = Unauthenticated;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header_value = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .ok_or(Unauthenticated("a bearer access token is required"))?;
        let token = header_value
            .strip_prefix("Bearer ")
            .or_else(|| header_value.strip_prefix("bearer "))
            .ok_or(Unauthenticated("a bearer access token is required"))?;
        let claims = state
            .appliance
            .tokens
            .verify(token.trim())
            .map_err(|_| Unauthenticated("the access token is invalid or expired"))?;
        let role: Role = claims
            .role
            .parse()
            .map_err(|_| Unauthenticated("the access token names no known role"))?;
        let network_address = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(address)| address.ip().to_string());
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
        })))
    }
}
