//! The HTTP server: the axum router with its layers (request ids, masked logs, limits, timeouts,
//! security headers, metrics), optional TLS, and graceful shutdown on SIGTERM.

pub mod audit_routes;
pub mod authenticate;
pub mod console;
pub mod dicomweb;
pub mod fhir;
pub mod metrics;
pub mod probes;
pub mod problem;
pub mod throttle;
pub mod token_routes;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderName, HeaderValue, header};
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::TraceLayer;

use crate::appliance::Appliance;

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot load TLS certificate or key: {0}")]
    Tls(std::io::Error),
    #[error(transparent)]
    Dicom(#[from] crate::dimse::DimseError),
}

/// What every handler can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    pub appliance: Appliance,
    pub metrics: Arc<metrics::Metrics>,
    pub throttle: Arc<Throttle>,
    pub console: Arc<console::ConsoleSessions>,
    /// Keys fetched from clients' JWKS URLs.
    pub jwks_cache: Arc<crate::auth::assertions::JwksCache>,
}

/// Rate limits and authentication back-off shared by every surface.
#[derive(Debug)]
pub struct Throttle {
    /// Back-off after authentication failures, keyed `client:<id>` and `address:<ip>`.
    pub failures: throttle::FailureBackoff,
    /// Requests per authenticated client.
    pub clients: throttle::RateLimiter,
    /// Requests per source address.
    pub addresses: throttle::RateLimiter,
}

impl Throttle {
    pub fn new(rate_per_second: u32) -> Self {
        Self {
            failures: throttle::FailureBackoff::default(),
            clients: throttle::RateLimiter::new(rate_per_second),
            addresses: throttle::RateLimiter::new(rate_per_second),
        }
    }
}

/// How often a checkpoint is signed while the journal grows.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Builds the router with every layer.
pub fn router(state: AppState) -> Router {
    let settings = Arc::clone(&state.appliance.settings);
    let routes = Router::new()
        .merge(probes::routes())
        .merge(token_routes::routes())
        .nest("/fhir", fhir::routes(state.clone()))
        .route("/fhir/", axum::routing::post(fhir::batch_or_transaction))
        .nest("/dicomweb", dicomweb::routes())
        .nest("/audit", audit_routes::routes())
        .nest("/console", console::routes())
        .fallback(problem::not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limit_per_address,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::record_request,
        ))
        .with_state(state);
    let security_headers = ServiceBuilder::new()
        .layer(SetResponseHeaderLayer::overriding(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("DENY"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::STRICT_TRANSPORT_SECURITY,
            settings
                .tls
                .as_ref()
                .map(|_| HeaderValue::from_static("max-age=31536000")),
        ));
    routes.layer(
        ServiceBuilder::new()
            .layer(SetSensitiveRequestHeadersLayer::new([header::AUTHORIZATION, header::COOKIE]))
            .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
            .layer(TraceLayer::new_for_http().make_span_with(|request: &axum::http::Request<_>| {
                let request_id =
                    request.headers().get(REQUEST_ID).and_then(|value| value.to_str().ok()).unwrap_or_default();
                tracing::info_span!("request", method = %request.method(), path = %request.uri().path(), request_id)
            }))
            .layer(PropagateRequestIdLayer::new(REQUEST_ID))
            .layer(security_headers)
            .layer(axum::middleware::from_fn_with_state(
                Duration::from_secs(settings.request_timeout_seconds),
                request_deadline,
            ))
            .layer(axum::extract::DefaultBodyLimit::max(settings.max_body_bytes)),
    )
}

/// Ends a request that has no response within `request_timeout_seconds` with 408, except a
/// STOW-RS upload, which runs as long as its data keeps arriving (it times out an idle body).
async fn request_deadline(
    axum::extract::State(limit): axum::extract::State<Duration>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let upload = request.method() == axum::http::Method::POST
        && request.uri().path().starts_with("/dicomweb/studies");
    if upload {
        return next.run(request).await;
    }
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => axum::http::StatusCode::REQUEST_TIMEOUT.into_response(),
    }
}

/// Refuses a source address over its request rate with 429 (probes and metrics exempt).
async fn limit_per_address(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let exempt = matches!(request.uri().path(), "/livez" | "/readyz" | "/metrics");
    let address = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0.ip().to_string());
    if let (false, Some(address)) = (exempt, address)
        && let Err(wait) = state.throttle.addresses.take(&address)
    {
        let mut response = problem::Problem::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "Too Many Requests",
            "request rate limit reached for this address".to_owned(),
        )
        .into_response();
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(wait.as_secs().max(1)),
        );
        return response;
    }
    next.run(request).await
}

/// Serves until SIGTERM or SIGINT, then drains in-flight requests (up to 30 s) and returns.
pub async fn serve(appliance: Appliance) -> Result<(), ServeError> {
    let address = appliance.settings.http_addr;
    let state = AppState {
        appliance: appliance.clone(),
        metrics: Arc::new(metrics::Metrics::new(appliance.records.break_glass_uses())),
        throttle: Arc::new(Throttle::new(appliance.settings.rate_limit_per_second)),
        console: Arc::new(console::ConsoleSessions::default()),
        jwks_cache: Arc::new(crate::auth::assertions::JwksCache::default()),
    };
    let app = router(state).into_make_service_with_connect_info::<std::net::SocketAddr>();
    let handle = axum_server::Handle::new();
    tokio::spawn(shutdown_on_signal(handle.clone()));
    tokio::spawn(reload_on_hangup(appliance.clone()));
    tokio::spawn(reload_token_keys_periodically(appliance.clone()));
    tokio::spawn(purge_expired_exports_periodically(appliance.clone()));
    tokio::spawn(appliance.database.clone().checkpoint_wal_periodically());
    tokio::spawn(Arc::clone(&appliance.records).derive_imaging_studies());
    let records = Arc::clone(&appliance.records);
    tokio::spawn(async move {
        match records.fill_deidentified_keys().await {
            Ok(0) => {}
            Ok(filled) => {
                tracing::info!(instances = filled, "dicom de-identified view keys filled")
            }
            Err(error) => {
                tracing::warn!(error = %error, "dicom de-identified view keys not filled")
            }
        }
    });
    let dicom_listener = crate::dimse::bind(&appliance).await?;
    tokio::spawn(crate::dimse::serve(appliance.clone(), dicom_listener, None));
    if let Some((listener, tls)) = crate::dimse::bind_tls(&appliance).await? {
        tokio::spawn(crate::dimse::serve(appliance.clone(), listener, Some(tls)));
    }
    let listener = std::net::TcpListener::bind(address)
        .map_err(|source| ServeError::Listen { address, source })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| ServeError::Listen { address, source })?;
    let scheme = if appliance.settings.tls.is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!(address = %address, scheme, "http listening");
    let signer = Arc::clone(&appliance.checkpoints).spawn_periodic(CHECKPOINT_INTERVAL);
    // Every HTTP socket has TCP_NODELAY: a short response, or the last piece of a streamed one,
    // then leaves at once instead of waiting for the client's delayed acknowledgement.
    let result = match &appliance.settings.tls {
        Some(tls) => {
            // Several TLS backends are linked in through dependencies; pick ring explicitly.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let config = axum_server::tls_rustls::RustlsConfig::from_pem_file(
                &tls.certificate_path,
                &tls.private_key_path,
            )
            .await
            .map_err(ServeError::Tls)?;
            let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(config)
                .acceptor(axum_server::accept::NoDelayAcceptor);
            axum_server::from_tcp(listener)
                .acceptor(acceptor)
                .handle(handle)
                .serve(app)
                .await
        }
        None => {
            axum_server::from_tcp(listener)
                .acceptor(axum_server::accept::NoDelayAcceptor)
                .handle(handle)
                .serve(app)
                .await
        }
    };
    result.map_err(|source| ServeError::Listen { address, source })?;
    signer.abort();
    if let Err(error) = appliance.checkpoints.sign_if_grown().await {
        tracing::error!(error = %error, "final audit checkpoint was not signed");
    }
    tracing::info!("http server drained; closing storage");
    appliance.close().await;
    Ok(())
}

/// How often a server looks for a token key rotated by another process.
const TOKEN_KEY_RELOAD_INTERVAL: Duration = Duration::from_secs(30);

/// How often expired Bulk Data exports are looked for, at most (short expiries are checked at
/// half their length).
const EXPORT_PURGE_INTERVAL: Duration = Duration::from_secs(60);

async fn purge_expired_exports_periodically(appliance: Appliance) {
    let half_expiry = Duration::from_secs(appliance.settings.bulk_export_expiry_seconds / 2);
    let interval = half_expiry.clamp(Duration::from_secs(1), EXPORT_PURGE_INTERVAL);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match appliance.records.purge_expired_exports().await {
            Ok(0) => {}
            Ok(purged) => tracing::info!(purged, "expired bulk exports destroyed"),
            Err(error) => tracing::error!(error = %error, "expired bulk exports not purged"),
        }
    }
}

async fn reload_token_keys_periodically(appliance: Appliance) {
    let mut ticker = tokio::time::interval(TOKEN_KEY_RELOAD_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if let Err(error) = appliance.reload_token_keys().await {
            tracing::error!(error = %error, "token signing keys not reloaded");
        }
    }
}

/// On SIGHUP: reloads the Cedar policies (a set that fails to load is refused and the old one
/// stays) and the token signing keys.
async fn reload_on_hangup(appliance: Appliance) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler; policies load only at start");
        return;
    };
    while hangup.recv().await.is_some() {
        match appliance.reload_token_keys().await {
            Ok(()) => {
                tracing::info!(keys = ?appliance.tokens.key_ids(), "token signing keys reloaded")
            }
            Err(error) => tracing::error!(error = %error, "token signing keys not reloaded"),
        }
        if let Err(error) = appliance.deidentification.reload() {
            tracing::error!(error = %error, "de-identification policy not reloaded; the previous one stays in force");
        }
        match appliance.policies.reload() {
            Ok(count) => tracing::info!(policies = count, "policies reloaded"),
            Err(error) => {
                tracing::error!(error = %error, "policies not reloaded; the previous set stays in force");
            }
        }
    }
}

async fn shutdown_on_signal(handle: axum_server::Handle) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; graceful shutdown unavailable");
        return;
    };
    tokio::select! {
        _ = terminate.recv() => {},
        _ = interrupt.recv() => {},
    }
    tracing::info!("shutdown requested; draining requests");
    handle.graceful_shutdown(Some(Duration::from_secs(30)));
}
