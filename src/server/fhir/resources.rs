//! Instance interactions: create (with `If-None-Exist`), read, vread, update (client ids and
//! `If-Match`), conditional update and delete, PATCH (JSON Patch) and delete. The `*_resource`
//! functions are shared with batch Bundles; the handlers add HTTP.

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::search::matching_ids;
use super::{
    Answer, Caller, FhirBody, FhirError, Prefer, check_resource, known_resource_type, names_caller,
    parse_resource, record_body, stored_form, valid_id,
};
use crate::access;
use crate::records::{Precondition, RecordError};
use crate::server::AppState;
use crate::server::authenticate::Caller as AuthenticatedCaller;

pub async fn create(
    State(state): State<AppState>,
    AuthenticatedCaller(caller): AuthenticatedCaller,
    Path(resource_type): Path<String>,
    headers: HeaderMap,
    FhirBody(body): FhirBody,
) -> Response {
    let if_none_exist = headers
        .get("if-none-exist")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let outcome = async {
        known_resource_type(&resource_type)?;
        let resource =
            parse_resource(&resource_type, &body, Prefer::from_headers(&headers).strict)?;
        create_resource(
            &state,
            &caller,
            &resource_type,
            resource,
            if_none_exist.as_deref(),
        )
        .await
    };
    respond(outcome.await, &headers)
}

pub async fn read(
    State(state): State<AppState>,
    AuthenticatedCaller(caller): AuthenticatedCaller,
    Path((resource_type, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let outcome = read_resource(&state, &caller, &resource_type, &id).await;
    respond_read(outcome, &headers)
}

pub async fn vread(
    State(state): State<AppState>,
    AuthenticatedCaller(caller): AuthenticatedCaller,
    Path((resource_type, id, version)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let outcome = vread_resource(&state, &caller, &resource_type, &id, &version).await;
    respond_read(outcome, &headers)
}

pub async fn update(
    State(state): State<AppState>,
    AuthenticatedCaller(caller): AuthenticatedCaller,
    Path((resource_type, id)): Path<(String, String)>,
    headers: HeaderMap,
    FhirBody(body): FhirBody,
) -> Response {
    let outcome = async {
        known_resource_type(&resource_type)?;
        let precondition = if_match(&headers)?;
        let resource =
            parse_resource(&resource_type, &body, Prefer::from_headers(&headers).strict)?;
        update_resource(&state, &caller, &resource_type, &id, resource, precondition).await
    };
    respond(outcome.await, &headers)
}

pub async fn conditional_update(
    State(state): State<AppState>,
    AuthenticatedCaller(caller): AuthenticatedCaller,
    Path(resource_type): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    FhirBody(body): FhirBody,
) -> Response {
    let outcome = async {
        known_resource_type(&resource_type)?;
        let precondition = if_match(&headers)?;
        let resource =
            parse_resource(&resource_type, &body, Prefer::from_headers(&headers).strict)?;
        conditional_update_resource(
            &state,
            &caller,
            &resource_type,
            query.as_deref().unwrap_or_default(),
            resource,
            precondition,
        )
        .await
    };
    respond(outcome.await, &headers)
}

pub async fn delete(
    State(state): State<AppState>,
    AuthenticatedCaller(caller): AuthenticatedCaller,
    Path((resource_type, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let outcome = async {
        known_resource_type(&resource_type)?;
        let precondition = if_match(&headers)?;
        delete_resource(&state, &caller, &resource_type, &id, precondition).await
    };
    respond(outcome.await, &headers)
}

pub async fn conditional_delete(
    State(state): State<AppState>,
    AuthenticatedCaller(caller): AuthenticatedCaller,
    Path(resource_type): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let outcome = async {
        known_resource_type(&resource_type)?;
        conditional_delete_resource(
            &state,
            &caller,
            &resource_type,
            query.as_deref().unwrap_or_default(),
        )
        .await
    };
    respond(outcome.await, &headers)
}

pub async fn patch(
    State(state): State<AppState>,
    AuthenticatedCaller(caller): AuthenticatedCaller,
    Path((resource_type, id)): Path<(String, String)>,
    headers: HeaderMap,
    FhirBody(body): FhirBody,
) -> Response {
    let outcome = async {
        known_resource_type(&resource_type)?;
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default();
        if !content_type.starts_with("application/json-patch+json") {
            return Err(FhirError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "not-supported",
                "PATCH takes a JSON Patch (Content-Type: application/json-patch+json)",
            ));
        }
        let precondition = if_match(&headers)?;
        let patch: Value = serde_json::from_slice(&body).map_err(|_| {
            FhirError::new(
                StatusCode::BAD_REQUEST,
                "structure",
                "the body is not valid JSON",
            )
        })?;
        patch_resource(&state, &caller, &resource_type, &id, &patch, precondition).await
    };
    respond(outcome.await, &headers)
}

fn respond(outcome: Result<Answer, FhirError>, headers: &HeaderMap) -> Response {
    match outcome {
        Ok(answer) => answer.into_response(Prefer::from_headers(headers).return_kind),
        Err(error) => error.into_response(),
    }
}

fn respond_read(outcome: Result<Answer, FhirError>, headers: &HeaderMap) -> Response {
    match outcome {
        Ok(answer) => {
            let unchanged = answer.version.as_ref().is_some_and(|version| {
                headers
                    .get(header::IF_NONE_MATCH)
                    .and_then(|value| value.to_str().ok())
                    .is_some_and(|etag| etag.trim() == format!("W/\"{}\"", version.version))
            });
            if unchanged {
                return StatusCode::NOT_MODIFIED.into_response();
            }
            answer.into_response(super::ReturnKind::Representation)
        }
        Err(error) => error.into_response(),
    }
}

pub fn if_match(headers: &HeaderMap) -> Result<Precondition, FhirError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(Precondition::None);
    };
    parse_etag(value.to_str().unwrap_or_default())
}

/// `W/"3"` (or `3`) as a version precondition.
pub fn parse_etag(text: &str) -> Result<Precondition, FhirError> {
    let version = text.trim().trim_start_matches("W/").trim_matches('"');
    version
        .parse()
        .map(Precondition::VersionIs)
        .map_err(|_| FhirError::invalid("If-Match must be an ETag like W/\"3\""))
}

pub async fn read_resource(
    state: &AppState,
    caller: &Caller,
    resource_type: &str,
    id: &str,
) -> Result<Answer, FhirError> {
    known_resource_type(resource_type)?;
    let records = &state.appliance.records;
    let allowed = records
        .authorize::<access::Read>(caller, resource_type)
        .await?;
    let record = records.read(&allowed, id).await?;
    Ok(Answer::with_resource(StatusCode::OK, &record))
}

pub async fn vread_resource(
    state: &AppState,
    caller: &Caller,
    resource_type: &str,
    id: &str,
    version: &str,
) -> Result<Answer, FhirError> {
    known_resource_type(resource_type)?;
    let version: i64 = version
        .parse()
        .map_err(|_| FhirError::new(StatusCode::NOT_FOUND, "not-found", "no such version"))?;
    let records = &state.appliance.records;
    let allowed = records
        .authorize::<access::Read>(caller, resource_type)
        .await?;
    let record = records.read_version(&allowed, id, version).await?;
    Ok(Answer::with_resource(StatusCode::OK, &record))
}

/// Creates a resource with a new server id; with `If-None-Exist`, returns the one match instead
/// (200), or refuses when several match (412).
pub async fn create_resource(
    state: &AppState,
    caller: &Caller,
    resource_type: &str,
    resource: Value,
    if_none_exist: Option<&str>,
) -> Result<Answer, FhirError> {
    if let Some(query) = if_none_exist {
        let matches = matching_ids(state, caller, resource_type, query).await?;
        match matches.as_slice() {
            [] => {}
            [existing] => {
                let mut answer = read_resource(state, caller, resource_type, existing).await?;
                answer.status = StatusCode::OK;
                return Ok(answer);
            }
            _ => return Err(several_match()),
        }
    }
    let id = super::new_resource_id();
    let mut resource = stored_form(resource, &id);
    super::bundles::resolve_references(state, caller, &mut resource).await?;
    let records = &state.appliance.records;
    let facts = access::RequestFacts {
        concerns_caller: names_caller(resource_type, &resource, &caller.id),
    };
    let allowed = records
        .authorize_with::<access::Create>(caller, resource_type, &facts)
        .await?;
    let body = record_body(resource_type, &id, &resource);
    let version = records.create(&allowed, &id, body).await?;
    Ok(Answer::written(StatusCode::CREATED, resource, version))
}

/// Updates (or creates, with a client-assigned id) a resource.
pub async fn update_resource(
    state: &AppState,
    caller: &Caller,
    resource_type: &str,
    id: &str,
    resource: Value,
    precondition: Precondition,
) -> Result<Answer, FhirError> {
    if !valid_id(id) {
        return Err(FhirError::invalid("invalid resource id"));
    }
    if resource.get("id").and_then(Value::as_str) != Some(id) {
        return Err(FhirError::invalid("the resource id must match the URL"));
    }
    let records = &state.appliance.records;
    let allowed = records
        .authorize::<access::Update>(caller, resource_type)
        .await?;
    let mut resource = stored_form(resource, id);
    super::bundles::resolve_references(state, caller, &mut resource).await?;
    let body = record_body(resource_type, id, &resource);
    let version = records.update(&allowed, id, body, precondition).await?;
    let status = if version.version == 1 {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(Answer::written(status, resource, version))
}

/// `PUT /Type?query`: no match creates (with the body's id, or a new one), one match updates
/// it, several are refused (412).
pub async fn conditional_update_resource(
    state: &AppState,
    caller: &Caller,
    resource_type: &str,
    query: &str,
    resource: Value,
    precondition: Precondition,
) -> Result<Answer, FhirError> {
    let matches = matching_ids(state, caller, resource_type, query).await?;
    let body_id = resource
        .get("id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    // With no match, a body id must name a new resource: the condition said none exists.
    let no_match = matches.is_empty();
    let id = match (matches.as_slice(), body_id) {
        ([], Some(body_id)) => body_id,
        ([], None) => super::new_resource_id(),
        ([existing], Some(body_id)) if *existing != body_id => {
            return Err(FhirError::invalid(
                "the resource id does not match the resource the condition found",
            ));
        }
        ([existing], _) => existing.clone(),
        _ => return Err(several_match()),
    };
    let resource = stored_form(resource, &id);
    let precondition = if no_match {
        Precondition::MustNotExist
    } else {
        precondition
    };
    update_resource(state, caller, resource_type, &id, resource, precondition).await
}

pub async fn delete_resource(
    state: &AppState,
    caller: &Caller,
    resource_type: &str,
    id: &str,
    precondition: Precondition,
) -> Result<Answer, FhirError> {
    let records = &state.appliance.records;
    let allowed = records
        .authorize::<access::Delete>(caller, resource_type)
        .await?;
    match records.delete(&allowed, id, precondition).await {
        Ok(_) | Err(RecordError::Deleted { .. }) | Err(RecordError::NotFound) => Ok(Answer {
            status: StatusCode::NO_CONTENT,
            resource: None,
            version: None,
        }),
        Err(error) => Err(error.into()),
    }
}

/// `DELETE /Type?query`: deletes the one match; none is a success, several are refused (412).
pub async fn conditional_delete_resource(
    state: &AppState,
    caller: &Caller,
    resource_type: &str,
    query: &str,
) -> Result<Answer, FhirError> {
    let matches = matching_ids(state, caller, resource_type, query).await?;
    match matches.as_slice() {
        [] => Ok(Answer {
            status: StatusCode::NO_CONTENT,
            resource: None,
            version: None,
        }),
        [only] => delete_resource(state, caller, resource_type, only, Precondition::None).await,
        _ => Err(several_match()),
    }
}

/// Applies a JSON Patch to the current version; the write requires that version to still be
/// current (or the one `If-Match` names), so concurrent patches cannot lose each other.
pub async fn patch_resource(
    state: &AppState,
    caller: &Caller,
    resource_type: &str,
    id: &str,
    patch: &Value,
    precondition: Precondition,
) -> Result<Answer, FhirError> {
    let records = &state.appliance.records;
    let read = records
        .authorize::<access::Read>(caller, resource_type)
        .await?;
    let update = records
        .authorize::<access::Update>(caller, resource_type)
        .await?;
    let current = records.read(&read, id).await?;
    if let Precondition::VersionIs(expected) = precondition
        && expected != current.meta.version
    {
        return Err(RecordError::VersionConflict {
            current: Some(current.meta.version),
        }
        .into());
    }
    let document: Value = serde_json::from_slice(&current.body).unwrap_or(Value::Null);
    let patched = glastonbury_fhir::patch::apply_patch(&document, patch).map_err(|error| {
        FhirError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "processing",
            error.to_string(),
        )
    })?;
    check_resource(resource_type, &patched, false).map_err(|error| {
        FhirError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "processing",
            error.diagnostics,
        )
    })?;
    if patched.get("id").and_then(Value::as_str) != Some(id) {
        return Err(FhirError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "processing",
            "a patch may not change the id",
        ));
    }
    let mut resource = stored_form(patched, id);
    super::bundles::resolve_references(state, caller, &mut resource).await?;
    let body = record_body(resource_type, id, &resource);
    let version = records
        .update(
            &update,
            id,
            body,
            Precondition::VersionIs(current.meta.version),
        )
        .await?;
    Ok(Answer::written(StatusCode::OK, resource, version))
}

fn several_match() -> FhirError {
    FhirError::new(
        StatusCode::PRECONDITION_FAILED,
        "multiple-matches",
        "the condition matches more than one resource",
    )
}
