//! FHIR Bulk Data Access 2.0 (`$export`, asynchronous request pattern): kick-off at system,
//! Patient and Group level, status polling with `Retry-After` and `X-Progress`, the manifest,
//! NDJSON downloads for the client that asked, and `DELETE` to cancel. The jobs themselves run
//! on the record path (`crate::records::bulk_export`).

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use glastonbury_fhir::SearchParameters;
use glastonbury_fhir::query::{SearchRequest, parse_search};
use serde_json::{Value, json};

use super::{FhirBody, FhirError, fhir_base, fhir_response, instant, resource_with_meta};
use crate::records::bulk_export::{ExportRequest, ExportScope, ExportStatus};
use crate::server::AppState;
use crate::server::authenticate::Caller as AuthenticatedCaller;

/// The NDJSON media type of export files.
pub const NDJSON: &str = "application/fhir+ndjson";

/// `_outputFormat` values that mean NDJSON (the specification's abbreviations included).
const NDJSON_FORMATS: &[&str] = &["application/fhir+ndjson", "application/ndjson", "ndjson"];

/// How long a client should wait between status requests.
const RETRY_AFTER_SECONDS: u32 = 2;

/// The most `_typeFilter` searches one kick-off may carry.
const MAX_TYPE_FILTERS: usize = 50;

pub async fn export_system(
    State(state): State<AppState>,
    AuthenticatedCaller(caller): AuthenticatedCaller,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    FhirBody(body): FhirBody,
) -> Response {
    let path = "$export";
    kick_off(
        &state,
        &caller,
        ExportScope::System,
        path,
        query,
        &headers,
        &body,
    )
    .await
}

pub async fn export_patients(
    State(state): State<AppState>,
    AuthenticatedCaller(caller): AuthenticatedCaller,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    FhirBody(body): FhirBody,
) -> Response {
    let path = "Patient/$export";
    kick_off(
        &state,
        &caller,
        ExportScope::Patients,
        path,
        query,
        &headers,
        &body,
    )
    .await
}

pub async fn export_group(
    State(state): State<AppState>,
    AuthenticatedCaller(caller): AuthenticatedCaller,
    Path(group_id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    FhirBody(body): FhirBody,
) -> Response {
    if !super::valid_id(&group_id) {
        return FhirError::new(StatusCode::NOT_FOUND, "not-found", "resource not found")
            .into_response();
    }
    let path = format!("Group/{group_id}/$export");
    let scope = ExportScope::Group(group_id);
    kick_off(&state, &caller, scope, &path, query, &headers, &body).await
}

async fn kick_off(
    state: &AppState,
    caller: &super::Caller,
    scope: ExportScope,
    path: &str,
    query: Option<String>,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let outcome = async {
        if !prefers_async(headers) {
            return Err(FhirError::invalid(
                "$export runs asynchronously: send 'Prefer: respond-async'",
            ));
        }
        let query = query.unwrap_or_default();
        let mut parameters = super::search::query_pairs(&query);
        parameters.extend(body_parameters(body)?);
        let lenient = super::Prefer::from_headers(headers).lenient;
        let mut request = parse_kick_off(&parameters, lenient)?;
        request.scope = scope;
        request.request_url = if query.is_empty() {
            format!("{}/{path}", fhir_base(state))
        } else {
            format!("{}/{path}?{query}", fhir_base(state))
        };
        let render = Arc::new(|record: &crate::records::Record| {
            let mut line = resource_with_meta(record).to_string().into_bytes();
            line.push(b'\n');
            line
        });
        let job_id = state
            .appliance
            .records
            .start_export(caller, request, render)
            .await?;
        Ok(job_id)
    };
    match outcome.await {
        Ok(job_id) => {
            let location = format!("{}/$export-status/{job_id}", fhir_base(state));
            let mut response = fhir_response(
                StatusCode::ACCEPTED,
                &super::outcome_value(
                    StatusCode::ACCEPTED,
                    "informational",
                    "the export was accepted; poll the Content-Location URL",
                ),
            );
            insert(&mut response, header::CONTENT_LOCATION, &location);
            response
        }
        Err(error) => error.into_response(),
    }
}

fn prefers_async(headers: &HeaderMap) -> bool {
    headers.get_all("prefer").iter().any(|value| {
        value
            .to_str()
            .unwrap_or_default()
            .split([',', ';'])
            .any(|token| token.trim() == "respond-async")
    })
}

/// Kick-off parameters of a POST: a FHIR `Parameters` resource (or nothing).
fn body_parameters(body: &[u8]) -> Result<Vec<(String, String)>, FhirError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let parameters: Value = serde_json::from_slice(body)
        .map_err(|_| FhirError::invalid("the body must be a FHIR Parameters resource"))?;
    if parameters["resourceType"] != "Parameters" {
        return Err(FhirError::invalid(
            "the body must be a FHIR Parameters resource",
        ));
    }
    let mut pairs = Vec::new();
    for parameter in parameters["parameter"].as_array().into_iter().flatten() {
        let name = parameter["name"].as_str().unwrap_or_default();
        let value = [
            "valueString",
            "valueInstant",
            "valueDateTime",
            "valueCode",
            "valueUri",
        ]
        .iter()
        .find_map(|key| parameter[*key].as_str())
        .ok_or_else(|| FhirError::invalid(format!("parameter {name:?} needs a string value")))?;
        pairs.push((name.to_owned(), value.to_owned()));
    }
    Ok(pairs)
}

/// The export a kick-off asks for. Unknown parameters are refused unless the client prefers
/// lenient handling, as the Bulk Data specification asks.
fn parse_kick_off(
    parameters: &[(String, String)],
    lenient: bool,
) -> Result<ExportRequest, FhirError> {
    let registry = SearchParameters::r4();
    let mut request = ExportRequest {
        scope: ExportScope::System,
        types: None,
        since: None,
        type_filters: Vec::new(),
        request_url: String::new(),
    };
    for (name, value) in parameters {
        match name.as_str() {
            "_outputFormat" if NDJSON_FORMATS.contains(&value.as_str()) => {}
            "_outputFormat" => {
                return Err(FhirError::invalid(
                    "_outputFormat must be application/fhir+ndjson",
                ));
            }
            "_type" => {
                let types = request.types.get_or_insert_with(Vec::new);
                for resource_type in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                    if !registry.is_resource_type(resource_type) {
                        return Err(FhirError::invalid(format!(
                            "_type names an unknown resource type: {resource_type}"
                        )));
                    }
                    if !types.iter().any(|known| known == resource_type) {
                        types.push(resource_type.to_owned());
                    }
                }
            }
            "_since" => {
                let range = glastonbury_fhir::dates::parse_range(value).ok_or_else(|| {
                    FhirError::invalid("_since must be a FHIR instant, e.g. 2024-01-01T00:00:00Z")
                })?;
                request.since = Some(range.low);
            }
            "_typeFilter" => {
                if request.type_filters.len() >= MAX_TYPE_FILTERS {
                    return Err(FhirError::invalid("too many _typeFilter parameters"));
                }
                request.type_filters.push(parse_type_filter(value)?);
            }
            _ if lenient => {}
            other => {
                return Err(FhirError::new(
                    StatusCode::BAD_REQUEST,
                    "not-supported",
                    format!(
                        "$export parameter {other:?} is not supported (send Prefer: handling=lenient to ignore it)"
                    ),
                ));
            }
        }
    }
    if let Some(types) = &request.types
        && types.is_empty()
    {
        return Err(FhirError::invalid("_type names no resource type"));
    }
    Ok(request)
}

/// `Type?criteria`: a search the exported records of that type must match. Unknown criteria
/// are refused: ignoring them would export more than was asked for.
fn parse_type_filter(value: &str) -> Result<(String, SearchRequest), FhirError> {
    let (resource_type, query) = value
        .split_once('?')
        .ok_or_else(|| FhirError::invalid("_typeFilter must look like Type?search-criteria"))?;
    if !SearchParameters::r4().is_resource_type(resource_type) {
        return Err(FhirError::invalid(
            "_typeFilter names an unknown resource type",
        ));
    }
    let pairs = super::search::query_pairs(query);
    let request =
        parse_search(resource_type, &pairs).map_err(|error| FhirError::invalid(error.0))?;
    if !request.ignored.is_empty() {
        return Err(FhirError::invalid(format!(
            "_typeFilter: {}",
            request.ignored.join("; ")
        )));
    }
    let controls = !request.includes.is_empty()
        || !request.revincludes.is_empty()
        || !request.sort.is_empty()
        || !request.elements.is_empty()
        || request.summary_count;
    if request.criteria.is_empty() || controls {
        return Err(FhirError::invalid(
            "_typeFilter takes search criteria only (no _include, _sort, _elements or _summary)",
        ));
    }
    Ok((resource_type.to_owned(), request))
}

/// `GET [base]/$export-status/{job}`: 202 with progress while running, the manifest when done,
/// an OperationOutcome (500) when the export failed.
pub async fn export_status(
    State(state): State<AppState>,
    AuthenticatedCaller(caller): AuthenticatedCaller,
    Path(job_id): Path<String>,
) -> Response {
    let status = match state
        .appliance
        .records
        .export_status(&caller, &job_id)
        .await
    {
        Ok(status) => status,
        Err(error) => return FhirError::from(error).into_response(),
    };
    match status {
        ExportStatus::InProgress { progress } => {
            let mut response = StatusCode::ACCEPTED.into_response();
            insert(
                &mut response,
                header::HeaderName::from_static("x-progress"),
                &progress,
            );
            insert(
                &mut response,
                header::RETRY_AFTER,
                &RETRY_AFTER_SECONDS.to_string(),
            );
            response
        }
        ExportStatus::Failed { reason } => {
            FhirError::new(StatusCode::INTERNAL_SERVER_ERROR, "exception", reason).into_response()
        }
        ExportStatus::Completed {
            transaction_time,
            expires_at,
            request_url,
            files,
        } => {
            let base = fhir_base(&state);
            let output: Vec<Value> = files
                .iter()
                .map(|file| {
                    json!({
                        "type": file.resource_type,
                        "url": format!("{base}/$export-file/{job_id}/{}", file.file_name),
                        "count": file.count,
                    })
                })
                .collect();
            let manifest = json!({
                "transactionTime": instant(transaction_time),
                "request": request_url,
                "requiresAccessToken": true,
                "output": output,
                "deleted": [],
                "error": [],
            });
            let mut response = (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                manifest.to_string(),
            )
                .into_response();
            insert(
                &mut response,
                header::EXPIRES,
                &super::http_date(expires_at),
            );
            response
        }
    }
}

/// `DELETE [base]/$export-status/{job}`: cancels the export and destroys its files (202).
pub async fn cancel_export(
    State(state): State<AppState>,
    AuthenticatedCaller(caller): AuthenticatedCaller,
    Path(job_id): Path<String>,
) -> Response {
    match state
        .appliance
        .records
        .cancel_export(&caller, &job_id)
        .await
    {
        Ok(()) => fhir_response(
            StatusCode::ACCEPTED,
            &super::outcome_value(
                StatusCode::ACCEPTED,
                "informational",
                "the export was cancelled and its files deleted",
            ),
        ),
        Err(error) => FhirError::from(error).into_response(),
    }
}

/// `GET [base]/$export-file/{job}/{file}`: one NDJSON file, to the client that started the
/// export only.
pub async fn export_file(
    State(state): State<AppState>,
    AuthenticatedCaller(caller): AuthenticatedCaller,
    Path((job_id, file_name)): Path<(String, String)>,
) -> Response {
    match state
        .appliance
        .records
        .export_file(&caller, &job_id, &file_name)
        .await
    {
        Ok(lines) => (StatusCode::OK, [(header::CONTENT_TYPE, NDJSON)], lines).into_response(),
        Err(error) => FhirError::from(error).into_response(),
    }
}

fn insert(response: &mut Response, name: header::HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        response.headers_mut().insert(name, value);
    }
}
