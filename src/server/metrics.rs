//! Prometheus metrics at `/metrics`: requests by method, route class and status, and latency.

use std::time::Instant;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::AppState;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    surface: String,
    status: u16,
}

/// The appliance's metrics registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Histogram,
}

impl Metrics {
    /// The registry, with the record path's break-glass counter.
    pub fn new(break_glass_uses: Counter) -> Self {
        let mut registry = Registry::with_prefix("glastonbury");
        registry.register(
            "break_glass_accesses",
            "Emergency (break-glass) accesses to review",
            break_glass_uses,
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by method, surface and status",
            requests.clone(),
        );
        let latency = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency",
            latency.clone(),
        );
        Self {
            registry,
            requests,
            latency,
        }
    }

    /// The registry in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            return String::new();
        }
        text
    }
}

/// The first path segment, so labels never carry ids (which could be PHI-adjacent).
fn surface_of(path: &str) -> String {
    let first = path
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or_default();
    match first {
        "fhir" | "dicomweb" | "auth" | "audit" | "console" | "livez" | "readyz" | "metrics"
        | ".well-known" => first.to_owned(),
        _ => "other".to_owned(),
    }
}

/// Middleware that counts and times every request.
pub async fn record_request(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = request.method().to_string();
    let surface = surface_of(request.uri().path());
    let response = next.run(request).await;
    let labels = RequestLabels {
        method,
        surface,
        status: response.status().as_u16(),
    };
    state.metrics.requests.get_or_create(&labels).inc();
    state
        .metrics
        .latency
        .observe(started.elapsed().as_secs_f64());
    response
}
