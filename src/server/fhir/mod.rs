//! The FHIR R4 REST surface at `/fhir`: every interaction translates HTTP into calls on the record
//! path (`crate::records`), and answers in FHIR's own form (resources, Bundles, OperationOutcome).

mod bulk;
mod bundles;

pub use bundles::batch_or_transaction;
mod capabilities;
mod history;
mod resources;
mod search;

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use glastonbury_fhir::SearchParameters;
use serde_json::Value;

use super::AppState;
use crate::access::Principal;
use crate::records::{Record, RecordError, RecordVersion};

pub const FHIR_JSON: &str = "application/fhir+json";

/// Interactions on every resource type; the CapabilityStatement advertises this list, and each
/// has its route below.
pub const TYPE_INTERACTIONS: &[&str] = &[
    "read",
    "vread",
    "update",
    "patch",
    "delete",
    "history-instance",
    "history-type",
    "create",
    "search-type",
];

/// System-level interactions (routes `/` and `/_history`).
pub const SYSTEM_INTERACTIONS: &[&str] = &["transaction", "batch", "history-system"];

pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/", axum::routing::post(bundles::batch_or_transaction))
        .route("/metadata", get(capabilities::capability_statement))
        .route(
            "/$export",
            get(bulk::export_system).post(bulk::export_system),
        )
        .route(
            "/Patient/$export",
            get(bulk::export_patients).post(bulk::export_patients),
        )
        .route(
            "/Group/{id}/$export",
            get(bulk::export_group).post(bulk::export_group),
        )
        .route(
            "/$export-status/{job}",
            get(bulk::export_status).delete(bulk::cancel_export),
        )
        .route("/$export-file/{job}/{file}", get(bulk::export_file))
        .route("/_history", get(history::system_history))
        .route(
            "/{resource_type}",
            get(search::search_get)
                .post(resources::create)
                .put(resources::conditional_update)
                .delete(resources::conditional_delete),
        )
        .route(
            "/{resource_type}/_search",
            axum::routing::post(search::search_post),
        )
        .route("/{resource_type}/_history", get(history::type_history))
        .route(
            "/{resource_type}/{id}",
            get(resources::read)
                .put(resources::update)
                .patch(resources::patch)
                .delete(resources::delete),
        )
        .route(
            "/{resource_type}/{id}/_history",
            get(history::instance_history),
        )
        .route("/{resource_type}/{id}/{operation}", get(search::everything))
        .route(
            "/{resource_type}/{id}/_history/{version}",
            get(resources::vread),
        )
        .layer(axum::middleware::from_fn_with_state(
            state,
            negotiate_format,
        ))
}

/// A FHIR error: an OperationOutcome with its HTTP status.
#[derive(Debug)]
pub struct FhirError {
    pub status: StatusCode,
    pub code: &'static str,
    pub diagnostics: String,
}

impl FhirError {
    pub fn new(status: StatusCode, code: &'static str, diagnostics: impl Into<String>) -> Self {
        Self {
            status,
            code,
            diagnostics: diagnostics.into(),
        }
    }

    pub fn invalid(diagnostics: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid", diagnostics)
    }

    pub fn outcome(&self) -> Value {
        outcome_value(self.status, self.code, &self.diagnostics)
    }
}

impl IntoResponse for FhirError {
    fn into_response(self) -> Response {
        fhir_response(self.status, &self.outcome())
    }
}

impl From<RecordError> for FhirError {
    fn from(error: RecordError) -> Self {
        match error {
            RecordError::Denied(denied) => {
                Self::new(StatusCode::FORBIDDEN, "forbidden", denied.reason)
            }
            RecordError::NotFound => {
                Self::new(StatusCode::NOT_FOUND, "not-found", "resource not found")
            }
            RecordError::Deleted { .. } => {
                Self::new(StatusCode::GONE, "deleted", "resource was deleted")
            }
            RecordError::AlreadyExists => {
                Self::new(StatusCode::CONFLICT, "duplicate", "resource already exists")
            }
            RecordError::VersionConflict { .. } => Self::new(
                StatusCode::PRECONDITION_FAILED,
                "conflict",
                "the resource's current version does not match If-Match",
            ),
            RecordError::Shredded => Self::new(
                StatusCode::GONE,
                "deleted",
                "this patient's data was crypto-shredded and can no longer be read",
            ),
            RecordError::NotInView(reason) => Self::new(StatusCode::FORBIDDEN, "forbidden", reason),
            RecordError::Invalid(reason) => Self::invalid(reason),
            RecordError::Busy(reason) => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, "throttled", reason)
            }
            RecordError::TooBroad => {
                Self::new(StatusCode::BAD_REQUEST, "too-costly", error.to_string())
            }
            RecordError::Damaged => {
                tracing::error!("stored payload failed authentication on read");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "exception",
                    "the stored payload is damaged",
                )
            }
            other => {
                tracing::error!(error = %other, "record operation failed");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "transient",
                    "storage is unavailable; nothing was changed",
                )
            }
        }
    }
}

pub fn outcome_value(status: StatusCode, code: &str, diagnostics: &str) -> Value {
    let severity = if status.is_server_error() {
        "fatal"
    } else if status.is_success() {
        "information"
    } else {
        "error"
    };
    serde_json::json!({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    })
}

pub fn fhir_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, FHIR_JSON)],
        body.to_string(),
    )
        .into_response()
}

/// A Bundle (search, history) as a 200 answer, or the error as an OperationOutcome.
pub fn respond_bundle(outcome: Result<Value, FhirError>) -> Response {
    match outcome {
        Ok(bundle) => fhir_response(StatusCode::OK, &bundle),
        Err(error) => error.into_response(),
    }
}

/// The raw body of a FHIR request; a body over the size limit is answered as an OperationOutcome.
#[derive(Debug)]
pub struct FhirBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for FhirBody {
    type Rejection = FhirError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let content_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_ascii_lowercase();
        if content_type.contains("xml") {
            return Err(FhirError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "not-supported",
                "this server speaks FHIR JSON only (application/fhir+json)",
            ));
        }
        Bytes::from_request(request, state)
            .await
            .map(FhirBody)
            .map_err(|rejection| {
                FhirError::new(
                    rejection.status(),
                    "too-costly",
                    "the request body is too large or unreadable",
                )
            })
    }
}

/// `Prefer: return=…` (how a write answers) and `Prefer: handling=strict|lenient`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Prefer {
    pub return_kind: ReturnKind,
    pub strict: bool,
    /// The client asked for lenient handling explicitly.
    pub lenient: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReturnKind {
    #[default]
    Representation,
    Minimal,
    OperationOutcome,
}

impl Prefer {
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let mut prefer = Self::default();
        for value in headers.get_all("prefer") {
            for token in value.to_str().unwrap_or_default().split([',', ';']) {
                match token.trim() {
                    "return=minimal" => prefer.return_kind = ReturnKind::Minimal,
                    "return=representation" => prefer.return_kind = ReturnKind::Representation,
                    "return=OperationOutcome" => prefer.return_kind = ReturnKind::OperationOutcome,
                    "handling=strict" => {
                        prefer.strict = true;
                        prefer.lenient = false;
                    }
                    "handling=lenient" => {
                        prefer.strict = false;
                        prefer.lenient = true;
                    }
                    _ => {}
                }
            }
        }
        prefer
    }
}

/// What an interaction produced, before it is rendered as an HTTP response or a Bundle entry.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub resource: Option<Value>,
    pub version: Option<RecordVersion>,
}

impl Answer {
    /// A record read back. A de-identified record carries no version headers: `Last-Modified`
    /// is a full date, which the de-identified view does not show.
    pub fn with_resource(status: StatusCode, record: &Record) -> Self {
        Self {
            status,
            resource: Some(resource_with_meta(record)),
            version: (!record.view.is_deidentified()).then(|| record.meta.clone()),
        }
    }

    pub fn written(status: StatusCode, resource: Value, version: RecordVersion) -> Self {
        Self {
            status,
            resource: Some(with_meta(resource, &version)),
            version: Some(version),
        }
    }

    /// The HTTP response, honouring `Prefer: return=…`.
    pub fn into_response(self, prefer: ReturnKind) -> Response {
        let mut headers = HeaderMap::new();
        if let Some(version) = &self.version {
            insert_header(
                &mut headers,
                header::ETAG,
                &format!("W/\"{}\"", version.version),
            );
            insert_header(
                &mut headers,
                header::LAST_MODIFIED,
                &http_date(version.last_updated),
            );
            insert_header(
                &mut headers,
                header::LOCATION,
                &format!("/fhir/{}", location_of(version)),
            );
        }
        let body = match (prefer, self.resource) {
            (ReturnKind::Minimal, _) | (_, None) => String::new(),
            (ReturnKind::OperationOutcome, _) => {
                outcome_value(self.status, "informational", "the interaction succeeded").to_string()
            }
            (ReturnKind::Representation, Some(resource)) => resource.to_string(),
        };
        if !body.is_empty() {
            insert_header(&mut headers, header::CONTENT_TYPE, FHIR_JSON);
        }
        (self.status, headers, body).into_response()
    }

    /// The `response` element of a batch/transaction-response entry.
    pub fn bundle_response(&self) -> Value {
        let mut response = serde_json::json!({"status": status_line(self.status)});
        if let Some(version) = &self.version {
            response["location"] = Value::String(location_of(version));
            response["etag"] = Value::String(format!("W/\"{}\"", version.version));
            response["lastModified"] = Value::String(instant(version.last_updated));
        }
        response
    }
}

fn insert_header(headers: &mut HeaderMap, name: header::HeaderName, value: &str) {
    if let Ok(value) = value.parse() {
        headers.insert(name, value);
    }
}

pub fn status_line(status: StatusCode) -> String {
    format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or_default()
    )
}

pub fn location_of(version: &RecordVersion) -> String {
    format!(
        "{}/{}/_history/{}",
        version.key.resource_type, version.key.resource_id, version.version
    )
}

/// Checks the resource type of a URL: 404 for anything that is not an R4 resource type.
pub fn known_resource_type(resource_type: &str) -> Result<(), FhirError> {
    if SearchParameters::r4().is_resource_type(resource_type) {
        return Ok(());
    }
    Err(FhirError::new(
        StatusCode::NOT_FOUND,
        "not-supported",
        "unknown resource type",
    ))
}

/// A new server-assigned id: a UUIDv7, so ids (and the index rows keyed by them) arrive in
/// increasing order and database pages fill at the end instead of everywhere.
pub fn new_resource_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// FHIR ids: 1 to 64 characters of letters, digits, `-` and `.`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|character| character.is_ascii_alphanumeric() || matches!(character, '-' | '.'))
}

/// The patient a resource belongs to: itself for Patient, else `subject`/`patient` references.
pub fn patient_of(resource_type: &str, id: &str, resource: &Value) -> Option<String> {
    if resource_type == "Patient" {
        return Some(id.to_owned());
    }
    ["subject", "patient", "beneficiary"]
        .iter()
        .find_map(|field| {
            let reference = resource.get(field)?.get("reference")?.as_str()?;
            let normalized = glastonbury_fhir::extract::normalize_reference(reference);
            normalized.strip_prefix("Patient/").map(str::to_owned)
        })
}

/// What the record path stores for a FHIR resource: its JSON, its patient and its index values.
pub fn record_body(resource_type: &str, id: &str, resource: &Value) -> crate::records::RecordBody {
    crate::records::RecordBody::fhir(
        patient_of(resource_type, id, resource),
        resource_type,
        resource,
    )
}

/// Whether a written resource names the caller itself: an Observation whose `device` is
/// `Device/<caller id>`, or a Device with an identifier whose value is the caller id.
pub fn names_caller(resource_type: &str, resource: &Value, caller_id: &str) -> bool {
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

/// Parses a request body as a resource of `resource_type`; `strict` (`Prefer:
/// handling=strict`) also refuses elements the R4 model does not know.
pub fn parse_resource(resource_type: &str, body: &[u8], strict: bool) -> Result<Value, FhirError> {
    let resource: Value = serde_json::from_slice(body).map_err(|_| {
        FhirError::new(
            StatusCode::BAD_REQUEST,
            "structure",
            "the body is not valid JSON",
        )
    })?;
    check_resource(resource_type, &resource, strict)?;
    Ok(resource)
}

/// The checks every stored resource passes: an object of the URL's type whose references are
/// well formed and whose elements fit the R4 model (see `glastonbury_fhir::validate`); with
/// `strict`, every element must be one the model knows.
pub fn check_resource(
    resource_type: &str,
    resource: &Value,
    strict: bool,
) -> Result<(), FhirError> {
    let object = resource.as_object().ok_or_else(|| {
        FhirError::new(
            StatusCode::BAD_REQUEST,
            "structure",
            "a resource must be a JSON object",
        )
    })?;
    if object.get("resourceType").and_then(Value::as_str) != Some(resource_type) {
        return Err(FhirError::invalid("resourceType does not match the URL"));
    }
    if object.get("meta").is_some_and(|meta| !meta.is_object()) {
        return Err(FhirError::invalid("meta must be an object"));
    }
    if glastonbury_fhir::patch::depth_exceeds(resource, glastonbury_fhir::patch::MAX_DEPTH) {
        return Err(FhirError::invalid("the resource is nested too deeply"));
    }
    if let Some(id) = object.get("id")
        && !id.as_str().is_some_and(valid_id)
    {
        return Err(FhirError::invalid(
            "id must be 1 to 64 letters, digits, '-' or '.'",
        ));
    }
    for reference in literal_references(resource) {
        check_reference(&reference)?;
    }
    check_structure(resource_type, resource, strict)
}

/// The most unknown elements named in one answer.
const UNKNOWN_ELEMENTS_NAMED: usize = 10;

fn check_structure(resource_type: &str, resource: &Value, strict: bool) -> Result<(), FhirError> {
    use glastonbury_fhir::validate::{Validation, validate};
    match validate(resource_type, resource) {
        Err(invalid) => Err(FhirError::new(
            StatusCode::BAD_REQUEST,
            "structure",
            invalid.to_string(),
        )),
        Ok(Validation::Checked { unknown_elements }) if strict && !unknown_elements.is_empty() => {
            let named: Vec<&str> = unknown_elements
                .iter()
                .take(UNKNOWN_ELEMENTS_NAMED)
                .map(String::as_str)
                .collect();
            Err(FhirError::new(
                StatusCode::BAD_REQUEST,
                "structure",
                format!(
                    "unknown elements (refused under Prefer: handling=strict): {}",
                    named.join(", ")
                ),
            ))
        }
        Ok(_) => Ok(()),
    }
}

fn check_reference(reference: &str) -> Result<(), FhirError> {
    if reference.starts_with('#') || reference.starts_with("urn:") || reference.contains("://") {
        return Ok(());
    }
    if let Some((resource_type, _)) = reference.split_once('?') {
        // A conditional reference, resolved to one resource before anything is stored.
        if SearchParameters::r4().is_resource_type(resource_type) {
            return Ok(());
        }
        return Err(FhirError::invalid(
            "a conditional reference names an unknown resource type",
        ));
    }
    let Some((resource_type, rest)) = reference.split_once('/') else {
        return Err(FhirError::invalid("a reference must look like Type/id"));
    };
    let id = rest.split('/').next().unwrap_or_default();
    if !SearchParameters::r4().is_resource_type(resource_type) || !valid_id(id) {
        return Err(FhirError::invalid(
            "a reference names an unknown resource type or an invalid id",
        ));
    }
    Ok(())
}

/// Every `reference` string in a resource (at any depth).
pub fn literal_references(resource: &Value) -> Vec<String> {
    let mut found = Vec::new();
    collect_references(resource, &mut found);
    found
}

fn collect_references(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(object) => {
            for (key, member) in object {
                if key == "reference" {
                    if let Some(reference) = member.as_str() {
                        found.push(reference.to_owned());
                    }
                    continue;
                }
                if key != "contained" {
                    collect_references(member, found);
                }
            }
        }
        Value::Array(items) => items
            .iter()
            .for_each(|item| collect_references(item, found)),
        _ => {}
    }
}

/// The stored form of a resource: the client's JSON with the server's id and without the
/// server-owned `meta.versionId`/`meta.lastUpdated` (added again on every read).
pub fn stored_form(mut resource: Value, id: &str) -> Value {
    if let Some(object) = resource.as_object_mut() {
        object.insert("id".to_owned(), Value::String(id.to_owned()));
        if let Some(meta) = object.get_mut("meta").and_then(Value::as_object_mut) {
            meta.remove("versionId");
            meta.remove("lastUpdated");
        }
    }
    resource
}

pub fn with_meta(mut resource: Value, version: &RecordVersion) -> Value {
    if let Some(object) = resource.as_object_mut() {
        let mut meta = object
            .get("meta")
            .cloned()
            .unwrap_or_else(|| serde_json::json!({}));
        meta["versionId"] = Value::String(version.version.to_string());
        meta["lastUpdated"] = Value::String(instant(version.last_updated));
        object.insert("meta".to_owned(), meta);
    }
    resource
}

/// The resource of a record with its `meta.versionId` and `meta.lastUpdated` (only the version
/// in a de-identified view: the update time is a full date).
pub fn resource_with_meta(record: &Record) -> Value {
    let resource: Value = serde_json::from_slice(&record.body).unwrap_or(Value::Null);
    if !record.view.is_deidentified() {
        return with_meta(resource, &record.meta);
    }
    let mut resource = resource;
    if let Some(meta) = resource.get_mut("meta").and_then(Value::as_object_mut) {
        meta.insert(
            "versionId".to_owned(),
            Value::String(record.meta.version.to_string()),
        );
    }
    resource
}

pub fn instant(micros: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
        .ok()
        .and_then(|moment| {
            moment
                .format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

pub fn http_date(micros: i64) -> String {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    time::OffsetDateTime::from_unix_timestamp(micros / 1_000_000)
        .ok()
        .and_then(|moment| moment.format(&format).ok())
        .unwrap_or_default()
}

/// The base URL clients use for this server's FHIR endpoint.
pub fn fhir_base(state: &AppState) -> String {
    format!("{}/fhir", state.appliance.tokens.issuer())
}

pub type Caller = Arc<Principal>;

/// `_format` and `Accept`: JSON only (406 otherwise); `_pretty=true` indents the answer.
async fn negotiate_format(request: Request, next: Next) -> Response {
    let query = request.uri().query().unwrap_or_default().to_owned();
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let format = pairs
        .iter()
        .find(|(name, _)| name == "_format")
        .map(|(_, value)| value.as_str());
    let accept = request
        .headers()
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let wants_json = match format {
        Some(format) => matches!(
            format,
            "json" | "application/json" | "application/fhir+json"
        ),
        None => accept.is_empty() || accept.contains("json") || accept.contains("*/*"),
    };
    if !wants_json {
        return FhirError::new(
            StatusCode::NOT_ACCEPTABLE,
            "not-supported",
            "this server answers in FHIR JSON only (_format=json)",
        )
        .into_response();
    }
    let pretty = pairs
        .iter()
        .any(|(name, value)| name == "_pretty" && value == "true");
    let response = next.run(request).await;
    if !pretty {
        return response;
    }
    let (parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let pretty_body = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|value| serde_json::to_vec_pretty(&value).ok())
        .unwrap_or_else(|| bytes.to_vec());
    let mut response = Response::from_parts(parts, axum::body::Body::from(pretty_body));
    response.headers_mut().remove(header::CONTENT_LENGTH);
    response
}
