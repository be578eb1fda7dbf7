//! History interactions: instance (`/Type/{id}/_history`), type (`/Type/_history`) and system
//! (`/_history`), as `history` Bundles with `_since`, `_count` and paging links.

use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use glastonbury_fhir::SearchParameters;
use serde_json::Value;

use super::search::query_pairs;
use super::{FhirError, fhir_base, known_resource_type, respond_bundle, with_meta};
use crate::access;
use crate::records::Record;
use crate::server::AppState;
use crate::server::authenticate::Caller as AuthenticatedCaller;

pub async fn instance_history(
    State(state): State<AppState>,
    AuthenticatedCaller(caller): AuthenticatedCaller,
    Path((resource_type, id)): Path<(String, String)>,
) -> Response {
    let outcome = async {
        known_resource_type(&resource_type)?;
        let records = &state.appliance.records;
        let allowed = records
            .authorize::<access::Read>(&caller, &resource_type)
            .await?;
        let versions = records.history(&allowed, &id).await?;
        Ok(history_bundle(
            &state,
            &versions,
            versions.len() as u64,
            Vec::new(),
        ))
    };
    respond_bundle(outcome.await)
}

pub async fn type_history(
    State(state): State<AppState>,
    AuthenticatedCaller(caller): AuthenticatedCaller,
    Path(resource_type): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let outcome = async {
        known_resource_type(&resource_type)?;
        let allowed = state
            .appliance
            .records
            .authorize::<access::Read>(&caller, &resource_type)
            .await?;
        let path = format!("{}/{resource_type}/_history", fhir_base(&state));
        history_page(
            &state,
            vec![allowed],
            query.as_deref().unwrap_or_default(),
            &path,
        )
        .await
    };
    respond_bundle(outcome.await)
}

/// System history lists only the types the caller may read.
pub async fn system_history(
    State(state): State<AppState>,
    AuthenticatedCaller(caller): AuthenticatedCaller,
    RawQuery(query): RawQuery,
) -> Response {
    let outcome = async {
        let records = &state.appliance.records;
        let allowed: Vec<_> = SearchParameters::r4()
            .resource_types()
            .filter_map(|resource_type| records.permitted::<access::Read>(&caller, resource_type))
            .collect();
        if allowed.is_empty() {
            records
                .authorize::<access::Read>(&caller, "Patient")
                .await?;
        }
        let path = format!("{}/_history", fhir_base(&state));
        history_page(&state, allowed, query.as_deref().unwrap_or_default(), &path).await
    };
    respond_bundle(outcome.await)
}

async fn history_page(
    state: &AppState,
    allowed: Vec<crate::access::Allowed<access::Read>>,
    query: &str,
    path: &str,
) -> Result<Value, FhirError> {
    let pairs = query_pairs(query);
    let value_of = |name: &str| {
        pairs
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    };
    let since = match value_of("_since") {
        Some(text) => Some(
            glastonbury_fhir::dates::parse_range(text)
                .ok_or_else(|| {
                    FhirError::invalid("_since must be an instant like 2024-01-01T00:00:00Z")
                })?
                .low,
        ),
        None => None,
    };
    let count = match value_of("_count") {
        Some(text) => text
            .parse::<usize>()
            .map_err(|_| FhirError::invalid("_count must be a non-negative integer"))?
            .min(glastonbury_fhir::query::MAX_COUNT),
        None => glastonbury_fhir::query::DEFAULT_COUNT,
    };
    let offset = match value_of("_offset") {
        Some(text) => text
            .parse::<usize>()
            .map_err(|_| FhirError::invalid("_offset must be a non-negative integer"))?,
        None => 0,
    };
    let (total, versions) = state
        .appliance
        .records
        .history_of_types(&allowed, since, count, offset)
        .await?;
    let link = |relation: &str, offset: usize| {
        let mut serializer = url::form_urlencoded::Serializer::new(String::new());
        for (name, value) in pairs.iter().filter(|(name, _)| name != "_offset") {
            serializer.append_pair(name, value);
        }
        serializer.append_pair("_offset", &offset.to_string());
        serde_json::json!({"relation": relation, "url": format!("{path}?{}", serializer.finish())})
    };
    let mut links = vec![link("self", offset)];
    if ((offset + count) as u64) < total {
        links.push(link("next", offset + count));
    }
    Ok(history_bundle(state, &versions, total, links))
}

fn history_bundle(state: &AppState, versions: &[Record], total: u64, links: Vec<Value>) -> Value {
    let entries: Vec<Value> = versions
        .iter()
        .map(|record| {
            let url = format!("{}/{}", record.meta.key.resource_type, record.meta.key.resource_id);
            let method = if record.meta.deleted {
                "DELETE"
            } else if record.meta.version == 1 {
                "POST"
            } else {
                "PUT"
            };
            let mut entry = serde_json::json!({
                "fullUrl": format!("{}/{url}", fhir_base(state)),
                "request": {"method": method, "url": url},
                "response": {"status": if record.meta.deleted { "204 No Content" } else if record.meta.version == 1 { "201 Created" } else { "200 OK" },
                             "etag": format!("W/\"{}\"", record.meta.version)},
            });
            if !record.meta.deleted {
                let resource: Value = serde_json::from_slice(&record.body).unwrap_or_default();
                entry["resource"] = with_meta(resource, &record.meta);
            }
            entry
        })
        .collect();
    serde_json::json!({"resourceType": "Bundle", "id": uuid::Uuid::new_v4().to_string(), "type": "history", "total": total, "link": links, "entry": entries})
}
