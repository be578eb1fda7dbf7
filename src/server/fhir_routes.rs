//! The FHIR R4 REST surface of the spine: create, read, vread, update, delete and instance
//! history on `/fhir/{type}`, translating HTTP into calls on the record path. Search, bundles and
//! the rest arrive with the FHIR issue on this same path.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::AppState;
use super::authenticate::Caller;
use crate::access;
use crate::records::{Precondition, Record, RecordBody, RecordError, RecordVersion};

const FHIR_JSON: &str = "application/fhir+json";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/metadata", get(capability_statement))
        .route("/{resource_type}", axum::routing::post(create))
        .route(
            "/{resource_type}/{id}",
            get(read).put(update).delete(delete),
        )
        .route("/{resource_type}/{id}/_history", get(history))
        .route("/{resource_type}/{id}/_history/{version}", get(vread))
}

/// A FHIR error, answered as an OperationOutcome with its HTTP status.
#[derive(Debug)]
struct FhirError {
    status: StatusCode,
    code: &'static str,
    diagnostics: &'static str,
}

impl IntoResponse for FhirError {
    fn into_response(self) -> Response {
        outcome(self.status, self.code, self.diagnostics)
    }
}

fn invalid(code: &'static str, diagnostics: &'static str) -> FhirError {
    FhirError {
        status: StatusCode::BAD_REQUEST,
        code,
        diagnostics,
    }
}

/// A FHIR OperationOutcome response.
fn outcome(status: StatusCode, code: &str, diagnostics: &str) -> Response {
    let body = serde_json::json!({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": if status.is_server_error() { "fatal" } else { "error" }, "code": code, "diagnostics": diagnostics}],
    });
    (
        status,
        [(header::CONTENT_TYPE, FHIR_JSON)],
        body.to_string(),
    )
        .into_response()
}

fn record_error_response(error: RecordError) -> Response {
    match error {
        RecordError::Denied(denied) => outcome(StatusCode::FORBIDDEN, "forbidden", &denied.reason),
        RecordError::NotFound => outcome(StatusCode::NOT_FOUND, "not-found", "resource not found"),
        RecordError::Deleted { .. } => outcome(StatusCode::GONE, "deleted", "resource was deleted"),
        RecordError::AlreadyExists => {
            outcome(StatusCode::CONFLICT, "duplicate", "resource already exists")
        }
        RecordError::VersionConflict { .. } => outcome(
            StatusCode::PRECONDITION_FAILED,
            "conflict",
            "version does not match If-Match",
        ),
        RecordError::Shredded => outcome(
            StatusCode::GONE,
            "deleted",
            "this patient's data was crypto-shredded and can no longer be read",
        ),
        RecordError::Damaged => {
            tracing::error!("stored payload failed authentication on read");
            outcome(
                StatusCode::INTERNAL_SERVER_ERROR,
                "exception",
                "the stored payload is damaged",
            )
        }
        other => {
            tracing::error!(error = %other, "record operation failed");
            outcome(
                StatusCode::SERVICE_UNAVAILABLE,
                "transient",
                "storage is unavailable; nothing was changed",
            )
        }
    }
}

fn valid_resource_type(resource_type: &str) -> bool {
    resource_type
        .chars()
        .next()
        .is_some_and(|first| first.is_ascii_uppercase())
        && resource_type.len() <= 64
        && resource_type
            .chars()
            .all(|character| character.is_ascii_alphanumeric())
}

/// FHIR ids: 1 to 64 characters of letters, digits, `-` and `.`.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|character| character.is_ascii_alphanumeric() || matches!(character, '-' | '.'))
}

/// The patient a resource belongs to: itself for Patient, else `subject`/`patient` references.
fn patient_of(resource_type: &str, id: &str, resource: &serde_json::Value) -> Option<String> {
    if resource_type == "Patient" {
        return Some(id.to_owned());
    }
    ["subject", "patient", "beneficiary"]
        .iter()
        .find_map(|field| {
            let reference = resource.get(field)?.get("reference")?.as_str()?;
            reference.strip_prefix("Patient/").map(str::to_owned)
        })
}

/// Whether a written resource names the caller itself: an Observation whose `device` is
/// `Device/<caller id>`, or a Device with an identifier whose value is the caller id.
fn names_caller(resource_type: &str, resource: &serde_json::Value, caller_id: &str) -> bool {
    match resource_type {
        "Observation" => {
            resource["device"]["reference"].as_str() == Some(&format!("Device/{caller_id}"))
        }
        "Device" => resource["identifier"]
            .as_array()
            .is_some_and(|identifiers| {
                identifiers
                    .iter()
                    .any(|identifier| identifier["value"].as_str() == Some(caller_id))
            }),
        _ => false,
    }
}

/// Parses and checks a resource body; returns it with `id` and `meta` set by the server.
fn prepare_resource(
    resource_type: &str,
    id: &str,
    body: &Bytes,
    path_id: Option<&str>,
) -> Result<serde_json::Value, FhirError> {
    let mut resource: serde_json::Value = serde_json::from_slice(body)
        .map_err(|_| invalid("structure", "the body is not valid JSON"))?;
    let object = resource
        .as_object_mut()
        .ok_or_else(|| invalid("structure", "a resource must be a JSON object"))?;
    if object.get("resourceType").and_then(|value| value.as_str()) != Some(resource_type) {
        return Err(invalid("invalid", "resourceType does not match the URL"));
    }
    if let Some(path_id) = path_id {
        match object.get("id").and_then(|value| value.as_str()) {
            Some(body_id) if body_id == path_id => {}
            _ => {
                return Err(invalid("invalid", "the resource id must match the URL"));
            }
        }
    }
    object.insert("id".to_owned(), serde_json::Value::String(id.to_owned()));
    Ok(resource)
}

fn with_meta(mut resource: serde_json::Value, meta: &RecordVersion) -> serde_json::Value {
    if let Some(object) = resource.as_object_mut() {
        let mut meta_object = object
            .get("meta")
            .cloned()
            .unwrap_or_else(|| serde_json::json!({}));
        meta_object["versionId"] = serde_json::Value::String(meta.version.to_string());
        meta_object["lastUpdated"] = serde_json::Value::String(instant(meta.last_updated));
        object.insert("meta".to_owned(), meta_object);
    }
    resource
}

fn instant(micros: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
        .ok()
        .and_then(|moment| {
            moment
                .format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn http_date(micros: i64) -> String {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    time::OffsetDateTime::from_unix_timestamp(micros / 1_000_000)
        .ok()
        .and_then(|moment| moment.format(&format).ok())
        .unwrap_or_default()
}

fn resource_response(status: StatusCode, record: &Record) -> Response {
    let resource: serde_json::Value =
        serde_json::from_slice(&record.body).unwrap_or(serde_json::Value::Null);
    let body = with_meta(resource, &record.meta);
    versioned_response(status, &record.meta, body.to_string())
}

fn versioned_response(status: StatusCode, meta: &RecordVersion, body: String) -> Response {
    let location = format!(
        "/fhir/{}/{}/_history/{}",
        meta.key.resource_type, meta.key.resource_id, meta.version
    );
    (
        status,
        [
            (header::CONTENT_TYPE, FHIR_JSON.to_owned()),
            (header::ETAG, format!("W/\"{}\"", meta.version)),
            (header::LAST_MODIFIED, http_date(meta.last_updated)),
            (header::LOCATION, location),
        ],
        body,
    )
        .into_response()
}

fn if_match(headers: &HeaderMap) -> Result<Precondition, FhirError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(Precondition::None);
    };
    let text = value.to_str().unwrap_or_default();
    let version = text.trim().trim_start_matches("W/").trim_matches('"');
    version
        .parse()
        .map(Precondition::VersionIs)
        .map_err(|_| invalid("invalid", "If-Match must be an ETag like W/\"3\""))
}

async fn capability_statement(State(state): State<AppState>) -> Response {
    let base = state.appliance.tokens.issuer();
    let body = serde_json::json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": instant(crate::storage::now_micros()),
        "kind": "instance",
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json"],
        "software": {"name": "Glastonbury", "version": env!("CARGO_PKG_VERSION")},
        "rest": [{
            "mode": "server",
            "security": {
                "extension": [{
                    "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                    "extension": [{"url": "token", "valueUri": format!("{base}/auth/token")}],
                }],
                "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR"}]}],
            },
            "resource": [],
            "interaction": [],
        }],
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, FHIR_JSON)],
        body.to_string(),
    )
        .into_response()
}

async fn create(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(resource_type): Path<String>,
    body: Bytes,
) -> Response {
    if !valid_resource_type(&resource_type) {
        return outcome(
            StatusCode::NOT_FOUND,
            "not-supported",
            "unknown resource type",
        );
    }
    let records = &state.appliance.records;
    let id = uuid::Uuid::new_v4().to_string();
    let resource = match prepare_resource(&resource_type, &id, &body, None) {
        Ok(resource) => resource,
        Err(error) => return error.into_response(),
    };
    let facts = access::RequestFacts {
        concerns_caller: names_caller(&resource_type, &resource, &principal.id),
    };
    let allowed = match records
        .authorize_with::<access::Create>(&principal, &resource_type, &facts)
        .await
    {
        Ok(allowed) => allowed,
        Err(error) => return record_error_response(error),
    };
    let stored_body = RecordBody {
        patient_id: patient_of(&resource_type, &id, &resource),
        content_type: FHIR_JSON.to_owned(),
        body: Bytes::from(resource.to_string()),
    };
    match records.create(&allowed, &id, stored_body).await {
        Ok(meta) => versioned_response(
            StatusCode::CREATED,
            &meta,
            with_meta(resource, &meta).to_string(),
        ),
        Err(error) => record_error_response(error),
    }
}

async fn update(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((resource_type, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !valid_resource_type(&resource_type) || !valid_id(&id) {
        return outcome(
            StatusCode::BAD_REQUEST,
            "invalid",
            "invalid resource type or id",
        );
    }
    let precondition = match if_match(&headers) {
        Ok(precondition) => precondition,
        Err(error) => return error.into_response(),
    };
    let records = &state.appliance.records;
    let allowed = match records
        .authorize::<access::Update>(&principal, &resource_type)
        .await
    {
        Ok(allowed) => allowed,
        Err(error) => return record_error_response(error),
    };
    let resource = match prepare_resource(&resource_type, &id, &body, Some(&id)) {
        Ok(resource) => resource,
        Err(error) => return error.into_response(),
    };
    let stored_body = RecordBody {
        patient_id: patient_of(&resource_type, &id, &resource),
        content_type: FHIR_JSON.to_owned(),
        body: Bytes::from(resource.to_string()),
    };
    match records
        .update(&allowed, &id, stored_body, precondition)
        .await
    {
        Ok(meta) => {
            let status = if meta.version == 1 {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            versioned_response(status, &meta, with_meta(resource, &meta).to_string())
        }
        Err(error) => record_error_response(error),
    }
}

async fn read(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((resource_type, id)): Path<(String, String)>,
) -> Response {
    let records = &state.appliance.records;
    let allowed = match records
        .authorize::<access::Read>(&principal, &resource_type)
        .await
    {
        Ok(allowed) => allowed,
        Err(error) => return record_error_response(error),
    };
    match records.read(&allowed, &id).await {
        Ok(record) => resource_response(StatusCode::OK, &record),
        Err(error) => record_error_response(error),
    }
}

async fn vread(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((resource_type, id, version)): Path<(String, String, String)>,
) -> Response {
    let Ok(version) = version.parse::<i64>() else {
        return outcome(StatusCode::NOT_FOUND, "not-found", "no such version");
    };
    let records = &state.appliance.records;
    let allowed = match records
        .authorize::<access::Read>(&principal, &resource_type)
        .await
    {
        Ok(allowed) => allowed,
        Err(error) => return record_error_response(error),
    };
    match records.read_version(&allowed, &id, version).await {
        Ok(record) => resource_response(StatusCode::OK, &record),
        Err(error) => record_error_response(error),
    }
}

async fn delete(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((resource_type, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let precondition = match if_match(&headers) {
        Ok(precondition) => precondition,
        Err(error) => return error.into_response(),
    };
    let records = &state.appliance.records;
    let allowed = match records
        .authorize::<access::Delete>(&principal, &resource_type)
        .await
    {
        Ok(allowed) => allowed,
        Err(error) => return record_error_response(error),
    };
    match records.delete(&allowed, &id, precondition).await {
        Ok(_) | Err(RecordError::Deleted { .. }) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => record_error_response(error),
    }
}

async fn history(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((resource_type, id)): Path<(String, String)>,
) -> Response {
    let records = &state.appliance.records;
    let allowed = match records
        .authorize::<access::Read>(&principal, &resource_type)
        .await
    {
        Ok(allowed) => allowed,
        Err(error) => return record_error_response(error),
    };
    let versions = match records.history(&allowed, &id).await {
        Ok(versions) => versions,
        Err(error) => return record_error_response(error),
    };
    let entries: Vec<serde_json::Value> = versions
        .iter()
        .map(|record| {
            let url = format!(
                "{}/{}",
                record.meta.key.resource_type, record.meta.key.resource_id
            );
            let method = if record.meta.deleted {
                "DELETE"
            } else if record.meta.version == 1 {
                "POST"
            } else {
                "PUT"
            };
            let mut entry =
                serde_json::json!({"fullUrl": url, "request": {"method": method, "url": url}});
            if !record.meta.deleted {
                let resource: serde_json::Value =
                    serde_json::from_slice(&record.body).unwrap_or_default();
                entry["resource"] = with_meta(resource, &record.meta);
            }
            entry
        })
        .collect();
    let bundle = serde_json::json!({"resourceType": "Bundle", "type": "history", "total": entries.len(), "entry": entries});
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, FHIR_JSON)],
        bundle.to_string(),
    )
        .into_response()
}
