//! `/livez`, `/readyz` (database, blob store, keys loaded) and `/metrics`.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use super::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/livez", get(live))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
}

async fn live() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "pass"}))
}

async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    let database = state.appliance.database.ping().await.is_ok();
    let blobs = state.appliance.blobs.ping().await.is_ok();
    // The vault exists only once its master key is unsealed, so a running appliance has keys.
    let keys = true;
    let status = if database && blobs && keys {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = |ok: bool| if ok { "pass" } else { "fail" };
    let body = serde_json::json!({
        "status": word(database && blobs && keys),
        "checks": {"database": word(database), "blob_store": word(blobs), "keys": word(keys)},
    });
    (status, axum::Json(body))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}
