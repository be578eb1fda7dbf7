//! `/auth/token` (client_credentials with client_secret_basic), `/auth/jwks` and SMART discovery.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use base64::Engine as _;

use super::AppState;

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
    let Some((client_id, secret)) = basic_credentials(&headers) else {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication failed",
        );
    };
    let client = match state
        .appliance
        .clients
        .authenticate(&client_id, &secret)
        .await
    {
        Ok(Some(client)) => client,
        Ok(None) => {
            tracing::warn!(client_id = %client_id, "client authentication failed");
            return oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "client authentication failed",
            );
        }
        Err(error) => {
            tracing::error!(error = %error, "client lookup failed");
            return oauth_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                "try again later",
            );
        }
    };
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
        "token_endpoint_auth_methods_supported": ["client_secret_basic"],
        "scopes_supported": ["system/*.cruds", "system/*.rs", "system/*.read", "system/*.write"],
        "capabilities": ["client-confidential-symmetric", "permission-v1", "permission-v2"],
    }))
}
