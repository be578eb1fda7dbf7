//! The compliance surface at `/audit`: entry queries with keyset paging, accounting of
//! disclosures, signed exports (verifiable JSON, FHIR AuditEvent Bundle, CSV), the latest signed
//! checkpoint and the checkpoint public keys. Reading the journal is itself journaled (DCM 110101).

use std::collections::HashMap;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use glastonbury_audit::AuditEvent;

use super::AppState;
use super::authenticate::{Caller, Unauthenticated};
use super::problem::Problem;
use crate::access::AuditJournalAccess;
use crate::journal::draft::parse_time_micros;
use crate::journal::export::{build_verified_export, to_csv, to_fhir_bundle};
use crate::journal::query::{AuditFilter, select};
use crate::journal::{disclosures, sealing};
use crate::records::RecordError;

/// Most entries one page returns.
const MAX_PAGE: u32 = 1000;
const DEFAULT_PAGE: u32 = 100;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(query_entries))
        .route("/disclosures", get(disclosures_of_patient))
        .route("/export", get(export))
        .route("/checkpoint", get(latest_checkpoint))
        .route("/public-key", get(public_keys))
}

type Authenticated = Result<Caller, Unauthenticated>;

fn unauthenticated() -> Response {
    let mut response = Problem::new(
        StatusCode::UNAUTHORIZED,
        "Unauthorized",
        "a valid bearer access token is required".to_owned(),
    )
    .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    response
}

fn bad_request(detail: &str) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, "Bad Request", detail.to_owned())
}

fn internal(error: &dyn std::fmt::Display) -> Response {
    tracing::error!(error = %error, "audit request failed");
    Problem::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Internal Server Error",
        "the audit journal could not be read".to_owned(),
    )
    .into_response()
}

/// Authenticates and authorizes a compliance officer; denials are journaled.
async fn compliance_officer(
    state: &AppState,
    caller: Authenticated,
) -> Result<AuditJournalAccess, Response> {
    let Caller(principal) = match caller {
        Ok(caller) => caller,
        Err(Unauthenticated::Throttled(wait)) => {
            return Err(Unauthenticated::Throttled(wait).into_response());
        }
        Err(Unauthenticated::Refused(_)) => return Err(unauthenticated()),
        Err(Unauthenticated::BadPurpose) => {
            return Err(Unauthenticated::BadPurpose.into_response());
        }
    };
    match state
        .appliance
        .records
        .authorize_audit_access(&principal)
        .await
    {
        Ok(access) => Ok(access),
        Err(RecordError::Denied(_)) => Err(Problem::new(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "only the compliance role may read the audit journal".to_owned(),
        )
        .into_response()),
        Err(other) => Err(internal(&other)),
    }
}

/// The filter named by query parameters, the patient's clear id (if any) resolved to its pseudonym.
fn filter_from(
    state: &AppState,
    parameters: &HashMap<String, String>,
) -> Result<AuditFilter, Problem> {
    const KNOWN: &[&str] = &[
        "patient", "agent", "user", "since", "until", "from", "to", "type", "outcome", "after",
        "limit", "format", "all",
    ];
    if let Some(unknown) = parameters
        .keys()
        .find(|name| !KNOWN.contains(&name.as_str()))
    {
        return Err(bad_request(&format!("unknown parameter {unknown:?}")));
    }
    let time = |names: [&str; 2]| -> Result<Option<i64>, Problem> {
        let Some(text) = names.iter().find_map(|name| parameters.get(*name)) else {
            return Ok(None);
        };
        parse_time_micros(text)
            .map(Some)
            .ok_or_else(|| bad_request("times must be RFC 3339 or YYYY-MM-DD"))
    };
    let outcome = match parameters.get("outcome") {
        None => None,
        Some(text) => match text.as_str() {
            "0" | "4" | "8" | "12" => text.parse().ok(),
            _ => return Err(bad_request("outcome must be 0, 4, 8 or 12")),
        },
    };
    Ok(AuditFilter {
        patient_ref: parameters
            .get("patient")
            .map(|id| state.appliance.vault.patient_ref(Some(id))),
        agent_id: parameters
            .get("agent")
            .or_else(|| parameters.get("user"))
            .cloned(),
        since: time(["since", "from"])?,
        until: time(["until", "to"])?,
        event_code: parameters.get("type").cloned(),
        outcome,
    })
}

/// Journals this use of the audit log (DCM 110101) before anything is read.
async fn journal_use(
    state: &AppState,
    access: &AuditJournalAccess,
    subtype: &str,
    parameters: &HashMap<String, String>,
    patient_ref: Option<&str>,
) -> Result<(), Response> {
    state
        .appliance
        .records
        .journal_audit_log_used(access, subtype, &query_text(parameters), patient_ref)
        .await
        .map_err(|error| internal(&error))
}

fn query_text(parameters: &HashMap<String, String>) -> String {
    let mut pairs: Vec<_> = parameters.iter().collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join("&")
}

async fn query_entries(
    State(state): State<AppState>,
    caller: Authenticated,
    Query(parameters): Query<HashMap<String, String>>,
) -> Response {
    let access = match compliance_officer(&state, caller).await {
        Ok(access) => access,
        Err(response) => return response,
    };
    let filter = match filter_from(&state, &parameters) {
        Ok(filter) => filter,
        Err(problem) => return problem.into_response(),
    };
    let after = match parameters.get("after").map(|text| text.parse::<u64>()) {
        None => None,
        Some(Ok(index)) => Some(index),
        Some(Err(_)) => return bad_request("after must be an entry index").into_response(),
    };
    let limit = match parameters.get("limit").map(|text| text.parse::<u32>()) {
        None => DEFAULT_PAGE,
        Some(Ok(limit)) if (1..=MAX_PAGE).contains(&limit) => limit,
        Some(_) => return bad_request("limit must be between 1 and 1000").into_response(),
    };
    if let Err(response) = journal_use(
        &state,
        &access,
        "query",
        &parameters,
        filter.patient_ref.as_deref(),
    )
    .await
    {
        return response;
    }
    let vault = &state.appliance.vault;
    let leaves = match state.appliance.database.pool().acquire().await {
        Ok(mut connection) => select(&mut connection, &filter, after, None, limit).await,
        Err(error) => return internal(&error),
    };
    let leaves = match leaves {
        Ok(leaves) => leaves,
        Err(error) => return internal(&error),
    };
    let mut entries = Vec::with_capacity(leaves.len());
    for leaf in &leaves {
        let event = AuditEvent::from_leaf_bytes(&leaf.bytes).ok();
        let detail = match event
            .as_ref()
            .and_then(|event| event.sealed_detail.as_ref())
        {
            Some(sealed) => sealing::open(vault, sealed)
                .await
                .ok()
                .flatten()
                .map(|(_, plaintext)| String::from_utf8_lossy(&plaintext).into_owned()),
            None => None,
        };
        entries.push(serde_json::json!({
            "index": leaf.index,
            "leafHash": BASE64.encode(glastonbury_audit::leaf_hash(&leaf.bytes)),
            "event": event,
            "detail": detail,
        }));
    }
    let next = (leaves.len() == limit as usize)
        .then(|| leaves.last().map(|leaf| next_link(&parameters, leaf.index)))
        .flatten();
    axum::Json(serde_json::json!({"entries": entries, "next": next})).into_response()
}

fn next_link(parameters: &HashMap<String, String>, last_index: u64) -> String {
    let mut next = url::form_urlencoded::Serializer::new(String::new());
    let mut pairs: Vec<_> = parameters
        .iter()
        .filter(|(name, _)| *name != "after")
        .collect();
    pairs.sort();
    for (name, value) in pairs {
        next.append_pair(name, value);
    }
    next.append_pair("after", &last_index.to_string());
    format!("/audit?{}", next.finish())
}

async fn disclosures_of_patient(
    State(state): State<AppState>,
    caller: Authenticated,
    Query(parameters): Query<HashMap<String, String>>,
) -> Response {
    let access = match compliance_officer(&state, caller).await {
        Ok(access) => access,
        Err(response) => return response,
    };
    let Some(patient) = parameters.get("patient") else {
        return bad_request("patient is required").into_response();
    };
    let include_tpo = parameters.get("all").is_some_and(|value| value == "true");
    let patient_ref = state.appliance.vault.patient_ref(Some(patient));
    if let Err(response) = journal_use(
        &state,
        &access,
        "disclosures",
        &parameters,
        Some(&patient_ref),
    )
    .await
    {
        return response;
    }
    let result = match state.appliance.database.pool().acquire().await {
        Ok(mut connection) => {
            disclosures::account(&mut connection, &patient_ref, include_tpo).await
        }
        Err(error) => return internal(&error),
    };
    match result {
        Ok(list) => axum::Json(serde_json::json!({"disclosures": list})).into_response(),
        Err(error) => internal(&error),
    }
}

async fn export(
    State(state): State<AppState>,
    caller: Authenticated,
    Query(parameters): Query<HashMap<String, String>>,
) -> Response {
    let access = match compliance_officer(&state, caller).await {
        Ok(access) => access,
        Err(response) => return response,
    };
    let filter = match filter_from(&state, &parameters) {
        Ok(filter) => filter,
        Err(problem) => return problem.into_response(),
    };
    let format = parameters.get("format").map_or("json", String::as_str);
    if !matches!(format, "json" | "fhir" | "csv") {
        return bad_request("format must be json, fhir or csv").into_response();
    }
    if let Err(response) = journal_use(
        &state,
        &access,
        "export",
        &parameters,
        filter.patient_ref.as_deref(),
    )
    .await
    {
        return response;
    }
    let appliance = &state.appliance;
    let export = match build_verified_export(
        &appliance.database,
        &appliance.vault,
        &appliance.checkpoints,
        &filter,
        None,
    )
    .await
    {
        Ok(export) => export,
        Err(error) => return internal(&error),
    };
    match format {
        "fhir" => (
            [(header::CONTENT_TYPE, "application/fhir+json")],
            axum::Json(to_fhir_bundle(&export)),
        )
            .into_response(),
        "csv" => (
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            to_csv(&export),
        )
            .into_response(),
        _ => axum::Json(export).into_response(),
    }
}

async fn latest_checkpoint(State(state): State<AppState>, caller: Authenticated) -> Response {
    if caller.is_err() {
        return unauthenticated();
    }
    match state.appliance.checkpoints.sign_if_grown().await {
        Ok(Some(checkpoint)) => (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            checkpoint.note,
        )
            .into_response(),
        Ok(None) => Problem::new(
            StatusCode::NOT_FOUND,
            "Not Found",
            "the journal is empty; no checkpoint was signed yet".to_owned(),
        )
        .into_response(),
        Err(error) => internal(&error),
    }
}

async fn public_keys(State(state): State<AppState>) -> Response {
    match state.appliance.checkpoints.keys().await {
        Ok(keys) => {
            let all: Vec<String> = keys
                .verifiers()
                .iter()
                .map(glastonbury_audit::NoteVerifier::to_key_text)
                .collect();
            axum::Json(serde_json::json!({
                "origin": keys.origin(),
                "current": keys.public_key_text(),
                "all": all,
            }))
            .into_response()
        }
        Err(error) => internal(&error),
    }
}
