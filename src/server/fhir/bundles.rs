//! `POST /fhir` with a Bundle: `batch` (each entry on its own) and `transaction` (all writes in
//! one database transaction with their audit leaves: all or nothing). Transactions resolve
//! `urn:uuid:` full URLs and conditional references (`Patient?identifier=…`) to real ids first.

use std::collections::{HashMap, HashSet};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::resources::{
    conditional_delete_resource, conditional_update_resource, create_resource, delete_resource,
    parse_etag, read_resource, update_resource, vread_resource,
};
use super::search::{matching_ids, query_pairs, search_type};
use super::{
    Answer, Caller, FhirBody, FhirError, Prefer, ReturnKind, check_resource, fhir_response,
    known_resource_type, names_caller, outcome_value, record_body, status_line, stored_form,
    valid_id,
};
use crate::access;
use crate::records::{Precondition, RecordError, RecordKey};
use crate::server::AppState;
use crate::server::authenticate::Caller as AuthenticatedCaller;

/// The most entries one Bundle may carry.
const MAX_ENTRIES: usize = 10_000;

pub async fn batch_or_transaction(
    State(state): State<AppState>,
    AuthenticatedCaller(caller): AuthenticatedCaller,
    headers: HeaderMap,
    FhirBody(body): FhirBody,
) -> Response {
    let prefer = Prefer::from_headers(&headers).return_kind;
    let strict = Prefer::from_headers(&headers).strict;
    let outcome = async {
        let bundle: Value = serde_json::from_slice(&body).map_err(|_| {
            FhirError::new(
                StatusCode::BAD_REQUEST,
                "structure",
                "the body is not valid JSON",
            )
        })?;
        if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
            return Err(FhirError::invalid("POST to the base URL takes a Bundle"));
        }
        let entries = bundle
            .get("entry")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if entries.len() > MAX_ENTRIES {
            return Err(FhirError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-costly",
                "a Bundle may carry at most 10000 entries",
            ));
        }
        let parsed: Vec<Entry> = entries
            .iter()
            .enumerate()
            .map(|(position, entry)| Entry::parse(position, entry, strict))
            .collect::<Result<_, _>>()?;
        match bundle.get("type").and_then(Value::as_str) {
            Some("batch") => Ok(batch(&state, &caller, parsed, prefer).await),
            Some("transaction") => transaction(&state, &caller, parsed, prefer).await,
            _ => Err(FhirError::invalid(
                "Bundle.type must be batch or transaction",
            )),
        }
    };
    match outcome.await {
        Ok(response) => fhir_response(StatusCode::OK, &response),
        Err(error) => error.into_response(),
    }
}

/// One Bundle entry's request.
#[derive(Debug, Clone)]
struct Entry {
    position: usize,
    method: Method,
    /// `Type`, `Type/id`, `Type/id/_history/v` or `Type?query` (relative to the base).
    url: String,
    full_url: Option<String>,
    resource: Option<Value>,
    if_none_exist: Option<String>,
    if_match: Option<String>,
    /// `Prefer: handling=strict` on the Bundle: unknown elements are refused.
    strict: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Get,
    Post,
    Put,
    Delete,
}

impl Entry {
    fn parse(position: usize, entry: &Value, strict: bool) -> Result<Self, FhirError> {
        let request = entry
            .get("request")
            .ok_or_else(|| FhirError::invalid(format!("entry {position} has no request")))?;
        let method = match request.get("method").and_then(Value::as_str) {
            Some("GET") => Method::Get,
            Some("POST") => Method::Post,
            Some("PUT") => Method::Put,
            Some("DELETE") => Method::Delete,
            _ => {
                return Err(FhirError::invalid(format!(
                    "entry {position}: request.method must be GET, POST, PUT or DELETE"
                )));
            }
        };
        let url = request
            .get("url")
            .and_then(Value::as_str)
            .ok_or_else(|| FhirError::invalid(format!("entry {position} has no request.url")))?
            .trim_start_matches('/')
            .to_owned();
        let text = |name: &str| request.get(name).and_then(Value::as_str).map(str::to_owned);
        Ok(Self {
            position,
            method,
            url,
            full_url: entry
                .get("fullUrl")
                .and_then(Value::as_str)
                .map(str::to_owned),
            resource: entry.get("resource").cloned(),
            strict,
            if_none_exist: text("ifNoneExist"),
            if_match: text("ifMatch"),
        })
    }

    /// `(type, id or None, query or None)` of the URL.
    fn target(&self) -> (String, Option<String>, Option<String>) {
        if self.method != Method::Get && !self.url.contains('?') && self.url.split('/').count() > 2
        {
            // `Type/id/_history/2` and the like name no writable resource.
            return (String::new(), None, None);
        }
        if let Some((path, query)) = self.url.split_once('?') {
            return (path.to_owned(), None, Some(query.to_owned()));
        }
        let mut segments = self.url.split('/');
        let resource_type = segments.next().unwrap_or_default().to_owned();
        (resource_type, segments.next().map(str::to_owned), None)
    }

    fn resource_for(&self, resource_type: &str) -> Result<Value, FhirError> {
        let resource = self.resource.clone().ok_or_else(|| {
            FhirError::invalid(format!("entry {} has no resource", self.position))
        })?;
        check_resource(resource_type, &resource, self.strict)?;
        Ok(resource)
    }

    fn precondition(&self) -> Result<Precondition, FhirError> {
        self.if_match
            .as_deref()
            .map_or(Ok(Precondition::None), parse_etag)
    }

    fn error(&self, error: FhirError) -> FhirError {
        FhirError::new(
            error.status,
            error.code,
            format!("entry {}: {}", self.position, error.diagnostics),
        )
    }
}

async fn batch(
    state: &AppState,
    caller: &Caller,
    entries: Vec<Entry>,
    prefer: ReturnKind,
) -> Value {
    let mut responses = Vec::with_capacity(entries.len());
    for entry in &entries {
        let answer = execute(state, caller, entry).await;
        responses.push(response_entry(answer, prefer));
    }
    serde_json::json!({"resourceType": "Bundle", "id": uuid::Uuid::new_v4().to_string(), "type": "batch-response", "entry": responses})
}

/// One batch entry, exactly as the same request on its own would run.
async fn execute(state: &AppState, caller: &Caller, entry: &Entry) -> Result<Answer, FhirError> {
    let (resource_type, id, query) = entry.target();
    known_resource_type(&resource_type)?;
    match (entry.method, id, query) {
        (Method::Get, _, _) => read_entry(state, caller, entry).await,
        (Method::Post, None, None) => {
            let resource = entry.resource_for(&resource_type)?;
            create_resource(
                state,
                caller,
                &resource_type,
                resource,
                entry.if_none_exist.as_deref(),
            )
            .await
        }
        (Method::Put, Some(id), None) => {
            let resource = entry.resource_for(&resource_type)?;
            update_resource(
                state,
                caller,
                &resource_type,
                &id,
                resource,
                entry.precondition()?,
            )
            .await
        }
        (Method::Put, None, Some(query)) => {
            let resource = entry.resource_for(&resource_type)?;
            conditional_update_resource(
                state,
                caller,
                &resource_type,
                &query,
                resource,
                entry.precondition()?,
            )
            .await
        }
        (Method::Delete, Some(id), None) => {
            delete_resource(state, caller, &resource_type, &id, entry.precondition()?).await
        }
        (Method::Delete, None, Some(query)) => {
            conditional_delete_resource(state, caller, &resource_type, &query).await
        }
        _ => Err(FhirError::invalid(format!(
            "entry {}: the URL does not fit the method",
            entry.position
        ))),
    }
}

/// GET entries: read, vread or search.
async fn read_entry(state: &AppState, caller: &Caller, entry: &Entry) -> Result<Answer, FhirError> {
    let (resource_type, id, query) = entry.target();
    let segments: Vec<&str> = entry
        .url
        .split('?')
        .next()
        .unwrap_or_default()
        .split('/')
        .collect();
    match (id, segments.as_slice()) {
        (Some(id), [_, _]) => read_resource(state, caller, &resource_type, &id).await,
        (Some(id), [_, _, "_history", version]) => {
            vread_resource(state, caller, &resource_type, &id, version).await
        }
        (None, [_]) => {
            let pairs = query_pairs(query.as_deref().unwrap_or_default());
            let bundle =
                search_type(state, caller, &resource_type, &pairs, &HeaderMap::new()).await?;
            Ok(Answer {
                status: StatusCode::OK,
                resource: Some(bundle),
                version: None,
            })
        }
        _ => Err(FhirError::invalid(format!(
            "entry {}: unsupported GET URL",
            entry.position
        ))),
    }
}

fn response_entry(answer: Result<Answer, FhirError>, prefer: ReturnKind) -> Value {
    match answer {
        Ok(answer) => {
            let mut entry = serde_json::json!({"response": answer.bundle_response()});
            let is_read = answer.version.is_none() || answer.status == StatusCode::OK;
            match (prefer, answer.resource) {
                (ReturnKind::Minimal, _) if !is_read => {}
                (ReturnKind::OperationOutcome, _) if !is_read => {
                    entry["response"]["outcome"] =
                        outcome_value(answer.status, "informational", "the interaction succeeded");
                }
                (_, Some(resource)) => entry["resource"] = resource,
                (_, None) => {}
            }
            entry
        }
        Err(error) => {
            serde_json::json!({"response": {"status": status_line(error.status), "outcome": error.outcome()}})
        }
    }
}

/// What a transaction entry will do once references are resolved.
enum Plan {
    Create {
        resource_type: String,
        id: String,
        resource: Value,
    },
    Update {
        resource_type: String,
        id: String,
        resource: Value,
        precondition: Precondition,
    },
    Delete {
        resource_type: String,
        id: String,
        precondition: Precondition,
    },
    /// `If-None-Exist` matched, or a conditional delete matched nothing: nothing to write.
    Existing {
        resource_type: String,
        id: String,
    },
    NothingToDelete,
    Read,
}

async fn transaction(
    state: &AppState,
    caller: &Caller,
    entries: Vec<Entry>,
    prefer: ReturnKind,
) -> Result<Value, FhirError> {
    let mut full_urls: HashMap<String, String> = HashMap::new();
    let mut plans = Vec::with_capacity(entries.len());
    let mut written_keys: HashSet<RecordKey> = HashSet::new();
    for entry in &entries {
        let plan = plan_entry(state, caller, entry)
            .await
            .map_err(|error| entry.error(error))?;
        if let Plan::Create {
            resource_type, id, ..
        }
        | Plan::Update {
            resource_type, id, ..
        }
        | Plan::Existing { resource_type, id } = &plan
            && let Some(full_url) = &entry.full_url
        {
            full_urls.insert(full_url.clone(), format!("{resource_type}/{id}"));
        }
        if let Plan::Create {
            resource_type, id, ..
        }
        | Plan::Update {
            resource_type, id, ..
        }
        | Plan::Delete {
            resource_type, id, ..
        } = &plan
            && !written_keys.insert(RecordKey::new(resource_type, id))
        {
            return Err(FhirError::invalid(format!(
                "entry {}: a transaction may change each resource only once",
                entry.position
            )));
        }
        plans.push(plan);
    }
    let mut conditional_references: HashMap<String, String> = HashMap::new();
    for (entry, plan) in entries.iter().zip(plans.iter_mut()) {
        let resource = match plan {
            Plan::Create { resource, .. } | Plan::Update { resource, .. } => resource,
            _ => continue,
        };
        rewrite_references(
            state,
            caller,
            resource,
            &full_urls,
            &mut conditional_references,
        )
        .await
        .map_err(|error| entry.error(error))?;
    }
    let records = &state.appliance.records;
    let mut prepared = Vec::new();
    let mut written_positions = Vec::new();
    for (entry, plan) in entries.iter().zip(&plans) {
        let write = match plan {
            Plan::Create {
                resource_type,
                id,
                resource,
            } => {
                let facts = access::RequestFacts {
                    concerns_caller: names_caller(resource_type, resource, &caller.id),
                };
                let allowed = records
                    .authorize_with::<access::Create>(caller, resource_type, &facts)
                    .await?;
                let body = record_body(resource_type, id, resource);
                records
                    .prepare_store(
                        &allowed,
                        RecordKey::new(resource_type, id),
                        body,
                        Precondition::MustNotExist,
                        "create",
                        'C',
                    )
                    .await?
            }
            Plan::Update {
                resource_type,
                id,
                resource,
                precondition,
            } => {
                let allowed = records
                    .authorize::<access::Update>(caller, resource_type)
                    .await?;
                let body = record_body(resource_type, id, resource);
                records
                    .prepare_store(
                        &allowed,
                        RecordKey::new(resource_type, id),
                        body,
                        *precondition,
                        "update",
                        'U',
                    )
                    .await?
            }
            Plan::Delete {
                resource_type,
                id,
                precondition,
            } => {
                let allowed = records
                    .authorize::<access::Delete>(caller, resource_type)
                    .await?;
                match records.prepare_delete(&allowed, id, *precondition).await {
                    Ok(write) => write,
                    Err(RecordError::NotFound | RecordError::Deleted { .. }) => continue,
                    Err(error) => return Err(entry.error(error.into())),
                }
            }
            _ => continue,
        };
        prepared.push(write);
        written_positions.push(entry.position);
    }
    let versions = records.commit(prepared).await?;
    let mut written: HashMap<usize, crate::records::RecordVersion> =
        written_positions.into_iter().zip(versions).collect();
    let mut responses = Vec::with_capacity(entries.len());
    for (entry, plan) in entries.iter().zip(plans) {
        let answer = match plan {
            Plan::Create { resource, .. } => written
                .remove(&entry.position)
                .map(|version| Answer::written(StatusCode::CREATED, resource, version))
                .ok_or_else(|| FhirError::invalid("internal: a created entry has no version")),
            Plan::Update { resource, .. } => written
                .remove(&entry.position)
                .map(|version| {
                    let status = if version.version == 1 {
                        StatusCode::CREATED
                    } else {
                        StatusCode::OK
                    };
                    Answer::written(status, resource, version)
                })
                .ok_or_else(|| FhirError::invalid("internal: an updated entry has no version")),
            Plan::Delete { .. } | Plan::NothingToDelete => Ok(Answer {
                status: StatusCode::NO_CONTENT,
                resource: None,
                version: None,
            }),
            Plan::Existing { resource_type, id } => {
                read_resource(state, caller, &resource_type, &id).await
            }
            Plan::Read => read_entry(state, caller, entry).await,
        };
        responses.push(response_entry(answer, prefer));
    }
    Ok(
        serde_json::json!({"resourceType": "Bundle", "id": uuid::Uuid::new_v4().to_string(), "type": "transaction-response", "entry": responses}),
    )
}

async fn plan_entry(state: &AppState, caller: &Caller, entry: &Entry) -> Result<Plan, FhirError> {
    let (resource_type, id, query) = entry.target();
    known_resource_type(&resource_type)?;
    match (entry.method, id, query) {
        (Method::Get, _, _) => Ok(Plan::Read),
        (Method::Post, None, None) => {
            let resource = entry.resource_for(&resource_type)?;
            if let Some(condition) = &entry.if_none_exist {
                match matching_ids(state, caller, &resource_type, condition)
                    .await?
                    .as_slice()
                {
                    [] => {}
                    [existing] => {
                        return Ok(Plan::Existing {
                            resource_type,
                            id: existing.clone(),
                        });
                    }
                    _ => {
                        return Err(FhirError::new(
                            StatusCode::PRECONDITION_FAILED,
                            "multiple-matches",
                            "ifNoneExist matches more than one resource",
                        ));
                    }
                }
            }
            let id = super::new_resource_id();
            let resource = stored_form(resource, &id);
            Ok(Plan::Create {
                resource_type,
                id,
                resource,
            })
        }
        (Method::Put, Some(id), None) => {
            if !valid_id(&id) {
                return Err(FhirError::invalid("invalid resource id"));
            }
            let resource = entry.resource_for(&resource_type)?;
            if resource.get("id").and_then(Value::as_str) != Some(id.as_str()) {
                return Err(FhirError::invalid(
                    "the resource id must match the request URL",
                ));
            }
            let resource = stored_form(resource, &id);
            Ok(Plan::Update {
                resource_type,
                id,
                resource,
                precondition: entry.precondition()?,
            })
        }
        (Method::Put, None, Some(query)) => {
            let resource = entry.resource_for(&resource_type)?;
            let body_id = resource
                .get("id")
                .and_then(Value::as_str)
                .map(str::to_owned);
            let matches = matching_ids(state, caller, &resource_type, &query).await?;
            let precondition = if matches.is_empty() {
                Precondition::MustNotExist
            } else {
                entry.precondition()?
            };
            let id = match (matches.as_slice(), body_id) {
                ([], Some(body_id)) => body_id,
                ([], None) => super::new_resource_id(),
                ([existing], _) => existing.clone(),
                _ => {
                    return Err(FhirError::new(
                        StatusCode::PRECONDITION_FAILED,
                        "multiple-matches",
                        "the condition matches more than one resource",
                    ));
                }
            };
            let resource = stored_form(resource, &id);
            Ok(Plan::Update {
                resource_type,
                id,
                resource,
                precondition,
            })
        }
        (Method::Delete, Some(id), None) => Ok(Plan::Delete {
            resource_type,
            id,
            precondition: entry.precondition()?,
        }),
        (Method::Delete, None, Some(query)) => {
            match matching_ids(state, caller, &resource_type, &query)
                .await?
                .as_slice()
            {
                [] => Ok(Plan::NothingToDelete),
                [only] => Ok(Plan::Delete {
                    resource_type,
                    id: only.clone(),
                    precondition: Precondition::None,
                }),
                _ => Err(FhirError::new(
                    StatusCode::PRECONDITION_FAILED,
                    "multiple-matches",
                    "the condition matches more than one resource",
                )),
            }
        }
        _ => Err(FhirError::invalid("the URL does not fit the method")),
    }
}

/// Resolves the conditional references of a resource written on its own (outside a Bundle).
pub async fn resolve_references(
    state: &AppState,
    caller: &Caller,
    resource: &mut Value,
) -> Result<(), FhirError> {
    rewrite_references(
        state,
        caller,
        resource,
        &HashMap::new(),
        &mut HashMap::new(),
    )
    .await
}

/// Replaces `urn:uuid:` (and other full URLs of this Bundle) and conditional references
/// (`Patient?identifier=x`, which must match exactly one resource) with `Type/id`.
async fn rewrite_references(
    state: &AppState,
    caller: &Caller,
    resource: &mut Value,
    full_urls: &HashMap<String, String>,
    resolved: &mut HashMap<String, String>,
) -> Result<(), FhirError> {
    let mut conditional = Vec::new();
    collect_conditional(resource, &mut conditional);
    for reference in conditional {
        if resolved.contains_key(&reference) {
            continue;
        }
        let (resource_type, query) = reference.split_once('?').unwrap_or_default();
        known_resource_type(resource_type)?;
        match matching_ids(state, caller, resource_type, query)
            .await?
            .as_slice()
        {
            [only] => {
                resolved.insert(reference.clone(), format!("{resource_type}/{only}"));
            }
            [] => {
                return Err(FhirError::new(
                    StatusCode::PRECONDITION_FAILED,
                    "not-found",
                    "a conditional reference matches no resource",
                ));
            }
            _ => {
                return Err(FhirError::new(
                    StatusCode::PRECONDITION_FAILED,
                    "multiple-matches",
                    "a conditional reference matches more than one resource",
                ));
            }
        }
    }
    let mut unresolved = false;
    replace_references(resource, &mut |reference| {
        if let Some(target) = full_urls.get(reference).or_else(|| resolved.get(reference)) {
            return Some(target.clone());
        }
        if reference.starts_with("urn:uuid:") || reference.starts_with("urn:oid:") {
            unresolved = true;
        }
        None
    });
    if unresolved {
        return Err(FhirError::invalid(
            "a urn reference names no entry of this Bundle",
        ));
    }
    Ok(())
}

fn collect_conditional(value: &Value, found: &mut Vec<String>) {
    for reference in super::literal_references(value) {
        if reference.contains('?') && !reference.contains("://") {
            found.push(reference);
        }
    }
}

fn replace_references(value: &mut Value, replace: &mut impl FnMut(&str) -> Option<String>) {
    match value {
        Value::Object(object) => {
            for (key, member) in object.iter_mut() {
                if key == "reference" {
                    if let Some(replacement) = member.as_str().and_then(&mut *replace) {
                        *member = Value::String(replacement);
                    }
                    continue;
                }
                replace_references(member, replace);
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|item| replace_references(item, replace)),
        _ => {}
    }
}
