//! `/auth/token` (client_credentials with client_secret_basic or SMART Backend Services
//! private_key_jwt), `/auth/jwks` and SMART discovery. Every attempt is journaled; repeated
//! failures per client and per address back off.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use base64::Engine as _;

use super::AppState;
use crate::auth::ClientRegistration;
use crate::auth::assertions::{
    JWT_BEARER_ASSERTION, claimed_client_id, registered_jwks, verify_client_assertion,
};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/auth/token", post(token))
        .route("/auth/jwks", get(jwks))
        .route("/.well-known/smart-configuration", get(smart_configuration))
}

#[derive(Debug, serde::Deserialize)]
struct TokenRequest {
    grant_type: String,
    scope: Option<String>,
    client_id: Option<String>,
    client_assertion_type: Option<String>,
    client_assertion: Option<String>,
}

/// An OAuth 2.0 error response (RFC 6749 §5.2).
fn oauth_error(status: StatusCode, error: &'static str, description: &str) -> Response {
    let body = serde_json::json!({"error": error, "error_description": description});
    (status, [(header::CACHE_CONTROL, "no-store")], Json(body)).into_response()
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

async fn token(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(request): Form<TokenRequest>,
) -> Response {
    if request.grant_type != "client_credentials" {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "only client_credentials is supported",
        );
    }
    let address = peer.ip().to_string();
    let address_key = format!("address:{address}");
    // Valid credentials always work; the back-off meets failing attempts only (and then they
    // are neither checked further nor journaled, which bounds what a flood can make us write).
    let client = match authenticate_client(&state, &headers, &request).await {
        Ok(client) => client,
        Err(ClientFailure::Refused { claimed_id, reason }) => {
            let client_key = format!("client:{claimed_id}");
            let blocked = state
                .throttle
                .failures
                .blocked_for(&address_key)
                .or_else(|| state.throttle.failures.blocked_for(&client_key));
            if let Some(wait) = blocked {
                return throttled(wait);
            }
            tracing::warn!(client_id = %claimed_id, reason = %reason, "client authentication failed");
            state.throttle.failures.record_failure(&address_key);
            state.throttle.failures.record_failure(&client_key);
            journal_authentication(&state, &claimed_id, &address, None, Some(&reason)).await;
            return oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "client authentication failed",
            );
        }
        Err(ClientFailure::Unavailable(error)) => {
            tracing::error!(error = %error, "client lookup failed");
            return oauth_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                "try again later",
            );
        }
    };
    state
        .throttle
        .failures
        .record_success(&format!("client:{}", client.client_id));
    journal_authentication(&state, &client.client_id, &address, Some(client.role), None).await;
    let registered: Vec<&str> = client
        .scopes
        .iter()
        .map(|scope| scope.text.as_str())
        .collect();
    let granted: Vec<&str> = match &request.scope {
        None => registered.clone(),
        Some(asked) => asked
            .split_whitespace()
            .filter(|scope| registered.contains(scope))
            .collect(),
    };
    if request.scope.is_some() && granted.is_empty() && !registered.is_empty() {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            "none of the requested scopes is allowed for this client",
        );
    }
    let scope = granted.join(" ");
    let access_token =
        state
            .appliance
            .tokens
            .issue(&client.client_id, client.role.as_str(), &scope);
    let body = serde_json::json!({
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": state.appliance.tokens.lifetime_seconds(),
        "scope": scope,
    });
    (
        StatusCode::OK,
        [(header::CACHE_CONTROL, "no-store")],
        Json(body),
    )
        .into_response()
}

/// Why a client could not be authenticated.
enum ClientFailure {
    Refused { claimed_id: String, reason: String },
    Unavailable(String),
}

fn refused(claimed_id: &str, reason: impl std::fmt::Display) -> ClientFailure {
    ClientFailure::Refused {
        claimed_id: claimed_id.chars().take(64).collect(),
        reason: reason.to_string(),
    }
}

/// Authenticates the client by `private_key_jwt` (when a client assertion is given) or by
/// `client_secret_basic`.
async fn authenticate_client(
    state: &AppState,
    headers: &HeaderMap,
    request: &TokenRequest,
) -> Result<ClientRegistration, ClientFailure> {
    let appliance = &state.appliance;
    if let Some(assertion_type) = &request.client_assertion_type {
        let claimed = request.client_id.clone().unwrap_or_default();
        if assertion_type != JWT_BEARER_ASSERTION {
            return Err(refused(&claimed, "unsupported client_assertion_type"));
        }
        let Some(assertion) = &request.client_assertion else {
            return Err(refused(&claimed, "client_assertion is missing"));
        };
        let client_id = claimed_client_id(assertion).map_err(|error| refused(&claimed, error))?;
        if request
            .client_id
            .as_ref()
            .is_some_and(|given| *given != client_id)
        {
            return Err(refused(
                &client_id,
                "client_id differs from the assertion issuer",
            ));
        }
        let jwks = registered_jwks(&appliance.database, &state.jwks_cache, &client_id)
            .await
            .map_err(|error| ClientFailure::Unavailable(error.to_string()))?
            .ok_or_else(|| refused(&client_id, "no such client with registered keys"))?;
        let token_url = format!("{}/auth/token", appliance.tokens.issuer());
        verify_client_assertion(
            &appliance.database,
            assertion,
            &client_id,
            &jwks,
            &token_url,
        )
        .await
        .map_err(|error| refused(&client_id, error))?;
        return appliance
            .clients
            .registration(&client_id)
            .await
            .map_err(|error| ClientFailure::Unavailable(error.to_string()))?
            .ok_or_else(|| refused(&client_id, "client is disabled"));
    }
    let Some((client_id, secret)) = basic_credentials(headers) else {
        return Err(refused("unknown", "no client credentials"));
    };
    appliance
        .clients
        .authenticate(&client_id, &secret)
        .await
        .map_err(|error| ClientFailure::Unavailable(error.to_string()))?
        .ok_or_else(|| refused(&client_id, "wrong client id or secret"))
}

fn throttled(wait: std::time::Duration) -> Response {
    let mut response = oauth_error(
        StatusCode::TOO_MANY_REQUESTS,
        "slow_down",
        "too many failed attempts; retry later",
    );
    response.headers_mut().insert(
        header::RETRY_AFTER,
        header::HeaderValue::from(wait.as_secs().max(1)),
    );
    response
}

async fn journal_authentication(
    state: &AppState,
    claimed_id: &str,
    address: &str,
    role: Option<crate::access::Role>,
    failure: Option<&str>,
) {
    if let Err(error) = state
        .appliance
        .records
        .journal_authentication(claimed_id, Some(address), role, failure)
        .await
    {
        tracing::error!(error = %error, "authentication attempt was not journaled");
    }
}

async fn jwks(State(state): State<AppState>) -> impl IntoResponse {
    Json(state.appliance.tokens.jwks())
}

async fn smart_configuration(State(state): State<AppState>) -> impl IntoResponse {
    let settings = &state.appliance.settings;
    let scheme = if settings.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let base = format!("{scheme}://{}", settings.http_addr);
    Json(serde_json::json!({
        "token_endpoint": format!("{base}/auth/token"),
        "jwks_uri": format!("{base}/auth/jwks"),
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "scopes_supported": ["system/*.cruds", "system/*.rs", "system/*.read", "system/*.write"],
        "capabilities": ["client-confidential-symmetric", "client-confidential-asymmetric", "permission-v1", "permission-v2"],
    }))
}
