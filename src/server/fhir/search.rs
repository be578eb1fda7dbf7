//! Search interactions: `GET /Type?…`, `POST /Type/_search` (form body), `_include`,
//! `_revinclude`, paging links, `_summary=count`, `_elements`, and `Patient/{id}/$everything`.
//! Unknown parameters are reported in the Bundle's OperationOutcome, or refused with
//! `Prefer: handling=strict`.

use std::collections::{BTreeMap, BTreeSet};

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use glastonbury_fhir::SearchParameters;
use glastonbury_fhir::extract::references_of;
use glastonbury_fhir::path::reference_type;
use glastonbury_fhir::query::{Include, SearchRequest, parse_search};
use serde_json::Value;

use super::{
    Caller, FhirBody, FhirError, Prefer, fhir_base, known_resource_type, resource_with_meta,
    respond_bundle,
};
use crate::access;
use crate::records::Record;
use crate::server::AppState;
use crate::server::authenticate::Caller as AuthenticatedCaller;

pub async fn search_get(
    State(state): State<AppState>,
    AuthenticatedCaller(caller): AuthenticatedCaller,
    Path(resource_type): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let pairs = query_pairs(query.as_deref().unwrap_or_default());
    respond_bundle(search_type(&state, &caller, &resource_type, &pairs, &headers).await)
}

pub async fn search_post(
    State(state): State<AppState>,
    AuthenticatedCaller(caller): AuthenticatedCaller,
    Path(resource_type): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    FhirBody(body): FhirBody,
) -> Response {
    let mut pairs = query_pairs(query.as_deref().unwrap_or_default());
    pairs.extend(query_pairs(&String::from_utf8_lossy(&body)));
    respond_bundle(search_type(&state, &caller, &resource_type, &pairs, &headers).await)
}

/// Splits a query string into decoded pairs, keeping their order (`_format`/`_pretty` dropped).
pub fn query_pairs(query: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .filter(|(name, _)| name != "_format" && name != "_pretty")
        .collect()
}

/// Ids matching a conditional interaction's query (at most two are looked for: none, one, or
/// "several"). A condition must name at least one criterion.
pub async fn matching_ids(
    state: &AppState,
    caller: &Caller,
    resource_type: &str,
    query: &str,
) -> Result<Vec<String>, FhirError> {
    let query = query.trim_start_matches('?');
    let mut request = parse_search(resource_type, &query_pairs(query))
        .map_err(|error| FhirError::invalid(error.0))?;
    if request.criteria.is_empty() {
        return Err(FhirError::new(
            StatusCode::PRECONDITION_FAILED,
            "invalid",
            "a conditional interaction needs at least one search criterion the server understands",
        ));
    }
    request.count = 2;
    request.offset = 0;
    request.summary_count = false;
    request.elements.clear();
    request.includes.clear();
    request.revincludes.clear();
    authorize_related_types(state, caller, &request).await?;
    let records = &state.appliance.records;
    let allowed = records
        .authorize::<access::Search>(caller, resource_type)
        .await?;
    let page = records.search(&allowed, &request, query).await?;
    Ok(page
        .records
        .iter()
        .map(|record| record.meta.key.resource_id.clone())
        .collect())
}

/// A type-level search, answered as a `searchset` Bundle.
pub async fn search_type(
    state: &AppState,
    caller: &Caller,
    resource_type: &str,
    pairs: &[(String, String)],
    headers: &HeaderMap,
) -> Result<Value, FhirError> {
    known_resource_type(resource_type)?;
    let request =
        parse_search(resource_type, pairs).map_err(|error| FhirError::invalid(error.0))?;
    if Prefer::from_headers(headers).strict && !request.ignored.is_empty() {
        return Err(FhirError::invalid(request.ignored.join("; ")));
    }
    authorize_related_types(state, caller, &request).await?;
    let records = &state.appliance.records;
    let allowed = records
        .authorize::<access::Search>(caller, resource_type)
        .await?;
    let query_text = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    let page = records.search(&allowed, &request, &query_text).await?;
    let mut entries: Vec<Value> = page
        .records
        .iter()
        .map(|record| search_entry(state, record, "match", &request.elements))
        .collect();
    let mut warnings = request.ignored.clone();
    if page.unreadable > 0 {
        warnings.push(format!(
            "{} matching resources belong to crypto-shredded patients and were left out",
            page.unreadable
        ));
    }
    let included = included_records(state, caller, &request, &page.records, &mut warnings).await?;
    entries.extend(
        included
            .iter()
            .map(|record| search_entry(state, record, "include", &[])),
    );
    if !warnings.is_empty() {
        entries.push(serde_json::json!({
            "search": {"mode": "outcome"},
            "resource": {"resourceType": "OperationOutcome", "issue": warnings.iter().map(|warning| serde_json::json!({
                "severity": "warning", "code": "not-supported", "diagnostics": warning,
            })).collect::<Vec<_>>()},
        }));
    }
    let mut bundle = serde_json::json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": "searchset",
        "total": page.total,
        "link": page_links(state, resource_type, pairs, &request, page.total),
    });
    if !request.summary_count {
        bundle["entry"] = Value::Array(entries);
    }
    Ok(bundle)
}

/// Chained and `_has` criteria look into other resource types; the caller must be allowed to
/// search those too.
async fn authorize_related_types(
    state: &AppState,
    caller: &Caller,
    request: &SearchRequest,
) -> Result<(), FhirError> {
    let mut related = BTreeSet::new();
    for criterion in &request.criteria {
        collect_related_types(criterion, &mut related);
    }
    for resource_type in related {
        state
            .appliance
            .records
            .authorize::<access::Search>(caller, &resource_type)
            .await?;
    }
    Ok(())
}

fn collect_related_types(
    criterion: &glastonbury_fhir::query::Criterion,
    related: &mut BTreeSet<String>,
) {
    use glastonbury_fhir::query::Criterion;
    match criterion {
        Criterion::Chain { targets, .. } => {
            for (target, inner) in targets {
                related.insert(target.clone());
                collect_related_types(inner, related);
            }
        }
        Criterion::Has {
            source_type, inner, ..
        } => {
            related.insert(source_type.clone());
            collect_related_types(inner, related);
        }
        _ => {}
    }
}

fn search_entry(state: &AppState, record: &Record, mode: &str, elements: &[String]) -> Value {
    let mut resource = resource_with_meta(record);
    if !elements.is_empty() {
        resource = only_elements(resource, elements);
    }
    serde_json::json!({
        "fullUrl": format!("{}/{}/{}", fhir_base(state), record.meta.key.resource_type, record.meta.key.resource_id),
        "resource": resource,
        "search": {"mode": mode},
    })
}

/// `_elements`: keeps the named top-level elements (and the mandatory ones), and marks the
/// resource SUBSETTED as the specification requires.
fn only_elements(resource: Value, elements: &[String]) -> Value {
    let Value::Object(object) = resource else {
        return resource;
    };
    let mut kept: serde_json::Map<String, Value> = object
        .into_iter()
        .filter(|(key, _)| {
            matches!(key.as_str(), "resourceType" | "id" | "meta")
                || elements.iter().any(|element| element == key)
        })
        .collect();
    let meta = kept.entry("meta").or_insert_with(|| serde_json::json!({}));
    if !meta.is_object() {
        *meta = serde_json::json!({});
    }
    let subsetted = serde_json::json!({"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"});
    match meta.get_mut("tag").and_then(Value::as_array_mut) {
        Some(tags) => tags.push(subsetted),
        None => meta["tag"] = Value::Array(vec![subsetted]),
    }
    Value::Object(kept)
}

/// `_include` (targets of the matches' references) and `_revinclude` (resources referring to
/// the matches), each only for types the caller may read; others are reported, not returned.
async fn included_records(
    state: &AppState,
    caller: &Caller,
    request: &SearchRequest,
    matches: &[Record],
    warnings: &mut Vec<String>,
) -> Result<Vec<Record>, FhirError> {
    let records = &state.appliance.records;
    let mut included = Vec::new();
    let mut targets: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for include in &request.includes {
        for record in matches {
            let Ok(resource) = serde_json::from_slice::<Value>(&record.body) else {
                continue;
            };
            for reference in references_of(&include.source_type, &include.code, &resource) {
                let Some(target_type) = reference_type(&reference) else {
                    continue;
                };
                if include
                    .target_type
                    .as_deref()
                    .is_some_and(|wanted| wanted != target_type)
                {
                    continue;
                }
                if let Some((_, id)) = reference.rsplit_once('/') {
                    targets
                        .entry(target_type.to_owned())
                        .or_default()
                        .insert(id.to_owned());
                }
            }
        }
    }
    for (target_type, ids) in targets {
        let Some(allowed) = records.permitted::<access::Read>(caller, &target_type) else {
            warnings.push(format!(
                "included {target_type} resources were left out: not permitted"
            ));
            continue;
        };
        let ids: Vec<String> = ids.into_iter().collect();
        included.extend(records.read_included(&allowed, &ids).await?);
    }
    for revinclude in &request.revincludes {
        included.extend(reverse_included(state, caller, revinclude, matches, warnings).await?);
    }
    Ok(included)
}

async fn reverse_included(
    state: &AppState,
    caller: &Caller,
    revinclude: &Include,
    matches: &[Record],
    warnings: &mut Vec<String>,
) -> Result<Vec<Record>, FhirError> {
    if matches.is_empty() {
        return Ok(Vec::new());
    }
    let records = &state.appliance.records;
    let Some(allowed) = records.permitted::<access::Search>(caller, &revinclude.source_type) else {
        warnings.push(format!(
            "revincluded {} resources were left out: not permitted",
            revinclude.source_type
        ));
        return Ok(Vec::new());
    };
    let references: Vec<String> = matches
        .iter()
        .map(|record| {
            format!(
                "{}/{}",
                record.meta.key.resource_type, record.meta.key.resource_id
            )
        })
        .collect();
    let pairs = vec![
        (revinclude.code.clone(), references.join(",")),
        (
            "_count".to_owned(),
            glastonbury_fhir::query::MAX_COUNT.to_string(),
        ),
    ];
    let request = parse_search(&revinclude.source_type, &pairs)
        .map_err(|error| FhirError::invalid(error.0))?;
    let page = records.search(&allowed, &request, "_revinclude").await?;
    Ok(page.records)
}

/// `self`, `first`, `previous` and `next` links, as offsets over the same query.
fn page_links(
    state: &AppState,
    resource_type: &str,
    pairs: &[(String, String)],
    request: &SearchRequest,
    total: u64,
) -> Vec<Value> {
    let base = format!("{}/{resource_type}", fhir_base(state));
    let link = |relation: &str, offset: usize| {
        let mut serializer = url::form_urlencoded::Serializer::new(String::new());
        for (name, value) in pairs.iter().filter(|(name, _)| name != "_offset") {
            serializer.append_pair(name, value);
        }
        if offset > 0 {
            serializer.append_pair("_offset", &offset.to_string());
        }
        let query = serializer.finish();
        let url = if query.is_empty() {
            base.clone()
        } else {
            format!("{base}?{query}")
        };
        serde_json::json!({"relation": relation, "url": url})
    };
    let mut links = vec![link("self", request.offset)];
    if request.summary_count || request.count == 0 {
        return links;
    }
    links.push(link("first", 0));
    if request.offset > 0 {
        links.push(link(
            "previous",
            request.offset.saturating_sub(request.count),
        ));
    }
    let next_offset = request.offset + request.count;
    if (next_offset as u64) < total {
        links.push(link("next", next_offset));
    }
    links
}

/// `GET /Patient/{id}/$everything`: the patient and every resource of their compartment that the
/// caller may read.
pub async fn everything(
    State(state): State<AppState>,
    AuthenticatedCaller(caller): AuthenticatedCaller,
    Path((resource_type, id, operation)): Path<(String, String, String)>,
) -> Response {
    let outcome = async {
        if resource_type != "Patient" || operation != "$everything" {
            return Err(FhirError::new(
                StatusCode::NOT_FOUND,
                "not-supported",
                "unknown operation",
            ));
        }
        let records = &state.appliance.records;
        let allowed = records
            .authorize::<access::Read>(&caller, "Patient")
            .await?;
        records.read(&allowed, &id).await?;
        // A type is listed when the caller may read it in this view (or in any view, when this
        // view is de-identified: then everything leaves de-identified).
        let readable: Vec<String> = SearchParameters::r4()
            .resource_types()
            .filter(|resource_type| {
                records
                    .permitted::<access::Read>(&caller, resource_type)
                    .is_some_and(|other| {
                        other.view() == allowed.view() || allowed.view().is_deidentified()
                    })
            })
            .map(str::to_owned)
            .collect();
        let found = records.compartment(&allowed, &id, &readable).await?;
        let entries: Vec<Value> = found
            .iter()
            .map(|record| search_entry(&state, record, "match", &[]))
            .collect();
        Ok(serde_json::json!({
            "resourceType": "Bundle",
            "id": uuid::Uuid::new_v4().to_string(),
            "type": "searchset",
            "total": entries.len(),
            "entry": entries,
        }))
    };
    respond_bundle(outcome.await)
}
