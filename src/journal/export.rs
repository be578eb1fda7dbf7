//! Audit exports for compliance officers: the self-verifying `glastonbury-audit-export/v1` file
//! (entries with sealed details opened, proofs to a freshly signed checkpoint, a consistency
//! proof from the previous export), and renderings of it as a FHIR R4 AuditEvent Bundle and CSV.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use glastonbury_audit::{
    AuditEvent, Export, ExportBuildError, ExportEntryInput, ExportRequest, VerifyError,
    build_export, export_nodes_needed, verify_export,
};
use serde_json::{Value, json};

use super::checkpoints::CheckpointService;
use super::query::{AuditFilter, select_all};
use super::{JournalError, sealing, store};
use crate::storage::Database;
use crate::vault::Vault;

/// Why an export was not produced.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("export: {0}")]
    Build(#[from] ExportBuildError),
    #[error("the stored journal does not verify{}: {source}", entry_suffix(.source))]
    Verify { source: VerifyError },
    #[error("entry {index} is missing from the stored journal")]
    MissingEntry { index: u64 },
    #[error("entry {index}: the stored entry does not match its stored leaf hash (it was changed)")]
    ChangedEntry { index: u64 },
}

fn entry_suffix(error: &VerifyError) -> String {
    error
        .entry_index()
        .map(|index| format!(" at entry {index}"))
        .unwrap_or_default()
}

/// Builds an export of the entries `filter` selects, proven against a checkpoint of the whole
/// current log, and verifies it before returning it (so a damaged database is named, not
/// exported).
pub async fn build_verified_export(
    database: &Database,
    vault: &Vault,
    checkpoints: &CheckpointService,
    filter: &AuditFilter,
    previous: Option<&Export>,
) -> Result<Export, ExportError> {
    let keys = checkpoints.keys().await?;
    let mut connection = database
        .pool()
        .acquire()
        .await
        .map_err(JournalError::from)?;
    let (range, _) = checkpoints.sign_current(&mut connection, &keys).await?;
    if let Some(index) = store::first_missing_leaf(&mut connection, range.size()).await? {
        return Err(ExportError::MissingEntry { index });
    }
    let selected = select_all(&mut connection, filter, range.size()).await?;
    let leaf_hashes: Vec<(u64, glastonbury_audit::Hash)> = selected
        .iter()
        .map(|leaf| (leaf.index, glastonbury_audit::leaf_hash(&leaf.bytes)))
        .collect();
    let mut entries = Vec::with_capacity(selected.len());
    for leaf in selected {
        let detail = match AuditEvent::from_leaf_bytes(&leaf.bytes) {
            Ok(AuditEvent {
                sealed_detail: Some(sealed),
                ..
            }) => sealing::open(vault, &sealed).await.unwrap_or(None),
            _ => None,
        };
        entries.push(ExportEntryInput {
            index: leaf.index,
            leaf: leaf.bytes,
            detail,
        });
    }
    let request = ExportRequest {
        origin: keys.origin().to_owned(),
        tree_size: range.size(),
        query: filter.describe(),
        entries,
        previous_checkpoint: previous.map(|export| export.checkpoint.clone()),
    };
    let needed = export_nodes_needed(&request)?;
    let nodes = store::fetch_nodes(&mut connection, &needed).await?;
    let export = build_export(request, &nodes, keys.signer())?;
    if let Err(source) = verify_export(&export, keys.verifiers(), previous) {
        return Err(locate_changed_entry(&mut connection, &leaf_hashes, source).await);
    }
    Ok(export)
}

/// Names the first selected entry whose stored leaf no longer matches its stored leaf hash, so
/// a failed range proof points at the changed entry rather than at its window.
async fn locate_changed_entry(
    connection: &mut sqlx::AnyConnection,
    leaf_hashes: &[(u64, glastonbury_audit::Hash)],
    failure: VerifyError,
) -> ExportError {
    let ids: Vec<glastonbury_audit::NodeId> = leaf_hashes
        .iter()
        .map(|(index, _)| glastonbury_audit::NodeId::new(0, *index))
        .collect();
    let Ok(stored) = store::fetch_nodes(connection, &ids).await else {
        return ExportError::Verify { source: failure };
    };
    leaf_hashes
        .iter()
        .find(|(index, hash)| stored.get(&glastonbury_audit::NodeId::new(0, *index)) != Some(hash))
        .map_or(ExportError::Verify { source: failure }, |(index, _)| {
            ExportError::ChangedEntry { index: *index }
        })
}

/// The entries of an export as a FHIR R4 `Bundle` (type `collection`) of `AuditEvent`s.
pub fn to_fhir_bundle(export: &Export) -> Value {
    let entries: Vec<Value> = export
        .entries
        .iter()
        .filter_map(|entry| {
            let bytes = BASE64.decode(&entry.leaf).ok()?;
            let event = AuditEvent::from_leaf_bytes(&bytes).ok()?;
            let detail = opened_text(entry.detail.as_ref());
            Some(json!({
                "fullUrl": format!("urn:glastonbury:audit:{}", entry.index),
                "resource": fhir_audit_event(entry.index, &event, detail.as_deref()),
            }))
        })
        .collect();
    json!({
        "resourceType": "Bundle",
        "type": "collection",
        "total": entries.len(),
        "meta": {"tag": [{"system": "https://glastonbury.dev/CodeSystem/audit-export", "code": "unverifiable-rendering",
            "display": "rendering of a signed export; verify the glastonbury-audit-export/v1 file, not this bundle"}]},
        "entry": entries,
    })
}

fn opened_text(detail: Option<&glastonbury_audit::OpenedDetail>) -> Option<String> {
    let bytes = BASE64.decode(&detail?.plaintext).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// One leaf as a FHIR R4 AuditEvent resource.
pub fn fhir_audit_event(index: u64, event: &AuditEvent, detail: Option<&str>) -> Value {
    let agents: Vec<Value> = event
        .agents
        .iter()
        .map(|agent| {
            let mut value = json!({
                "who": {"identifier": {"system": "https://glastonbury.dev/client-id", "value": agent.who}},
                "requestor": agent.requestor,
                "role": agent.roles.iter().map(|role| json!({"coding": [coding(role)]})).collect::<Vec<_>>(),
            });
            if let Some(address) = &agent.network_address {
                value["network"] = json!({"address": address, "type": if address.contains(':') { "5" } else { "2" }});
            }
            if let Some(token) = &agent.token_id {
                value["altId"] = json!(token);
            }
            value
        })
        .collect();
    let mut entities: Vec<Value> = event
        .entities
        .iter()
        .flat_map(|entity| {
            let mut found = Vec::new();
            if let (Some(kind), Some(id)) = (&entity.resource_type, &entity.resource_id) {
                found.push(json!({
                    "what": {"reference": format!("{kind}/{id}")},
                    "type": {"system": "http://hl7.org/fhir/resource-types", "code": kind},
                }));
            } else if let Some(kind) = &entity.resource_type {
                found.push(json!({"type": {"system": "http://hl7.org/fhir/resource-types", "code": kind}}));
            }
            if let Some(pseudonym) = &entity.patient_pseudonym {
                found.push(json!({
                    "what": {"identifier": {"system": "https://glastonbury.dev/patient-pseudonym", "value": pseudonym}},
                    "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1", "display": "Person"},
                    "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1", "display": "Patient"},
                }));
            }
            found
        })
        .collect();
    if let Some(text) = detail {
        entities.push(json!({
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "24", "display": "Query"},
            "query": BASE64.encode(text.as_bytes()),
        }));
    }
    let mut resource = json!({
        "resourceType": "AuditEvent",
        "id": index.to_string(),
        "type": coding(&event.event_type),
        "subtype": event.subtypes.iter().map(coding).collect::<Vec<_>>(),
        "action": action_letter(event),
        "recorded": event.recorded,
        "outcome": event.outcome.code().to_string(),
        "agent": agents,
        "source": {"observer": {"display": event.source}},
        "entity": entities,
    });
    if !event.purpose_of_use.is_empty() {
        resource["purposeOfEvent"] = Value::Array(
            event
                .purpose_of_use
                .iter()
                .map(|purpose| json!({"coding": [coding(purpose)]}))
                .collect(),
        );
    }
    if let Some(reason) = &event.outcome_reason {
        resource["outcomeDesc"] = json!(reason);
    }
    if event.break_glass || !event.policy_ids.is_empty() || event.request_id.is_some() {
        resource["extension"] = json!([
            {"url": "https://glastonbury.dev/fhir/StructureDefinition/break-glass", "valueBoolean": event.break_glass},
            {"url": "https://glastonbury.dev/fhir/StructureDefinition/policy-ids", "valueString": event.policy_ids.join(" ")},
            {"url": "https://glastonbury.dev/fhir/StructureDefinition/request-id", "valueString": event.request_id.clone().unwrap_or_default()},
        ]);
    }
    resource
}

fn coding(value: &glastonbury_audit::Coding) -> Value {
    let mut coded = json!({"system": value.system, "code": value.code});
    if let Some(display) = &value.display {
        coded["display"] = json!(display);
    }
    coded
}

fn action_letter(event: &AuditEvent) -> &'static str {
    match event.action {
        glastonbury_audit::AuditAction::Create => "C",
        glastonbury_audit::AuditAction::Read => "R",
        glastonbury_audit::AuditAction::Update => "U",
        glastonbury_audit::AuditAction::Delete => "D",
        glastonbury_audit::AuditAction::Execute => "E",
    }
}

/// The CSV header of [`to_csv`].
pub const CSV_COLUMNS: &[&str] = &[
    "index",
    "recorded",
    "event_type",
    "subtype",
    "action",
    "outcome",
    "outcome_reason",
    "agent",
    "agent_role",
    "network_address",
    "purpose_of_use",
    "resource",
    "patient_pseudonym",
    "request_id",
    "policy_ids",
    "break_glass",
    "detail",
];

/// The entries of an export as RFC 4180 CSV, with spreadsheet formula injection neutralized.
pub fn to_csv(export: &Export) -> String {
    let mut out = String::new();
    push_csv_row(
        &mut out,
        CSV_COLUMNS.iter().map(|column| (*column).to_owned()),
    );
    for entry in &export.entries {
        let Some(event) = BASE64
            .decode(&entry.leaf)
            .ok()
            .and_then(|bytes| AuditEvent::from_leaf_bytes(&bytes).ok())
        else {
            continue;
        };
        let agent = event.agents.first();
        let entity = event.entities.first();
        let resource = entity
            .map(
                |entity| match (&entity.resource_type, &entity.resource_id) {
                    (Some(kind), Some(id)) => format!("{kind}/{id}"),
                    (Some(kind), None) => kind.clone(),
                    _ => String::new(),
                },
            )
            .unwrap_or_default();
        let row = [
            entry.index.to_string(),
            event.recorded.clone(),
            format!(
                "{} {}",
                event.event_type.code,
                event.event_type.display.clone().unwrap_or_default()
            )
            .trim()
            .to_owned(),
            event
                .subtypes
                .iter()
                .map(|subtype| subtype.code.clone())
                .collect::<Vec<_>>()
                .join(" "),
            action_letter(&event).to_owned(),
            event.outcome.code().to_string(),
            event.outcome_reason.clone().unwrap_or_default(),
            agent.map(|agent| agent.who.clone()).unwrap_or_default(),
            agent
                .map(|agent| {
                    agent
                        .roles
                        .iter()
                        .map(|role| role.code.clone())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default(),
            agent
                .and_then(|agent| agent.network_address.clone())
                .unwrap_or_default(),
            event
                .purpose_of_use
                .iter()
                .map(|purpose| purpose.code.clone())
                .collect::<Vec<_>>()
                .join(" "),
            resource,
            entity
                .and_then(|entity| entity.patient_pseudonym.clone())
                .unwrap_or_default(),
            event.request_id.clone().unwrap_or_default(),
            event.policy_ids.join(" "),
            event.break_glass.to_string(),
            opened_text(entry.detail.as_ref()).unwrap_or_default(),
        ];
        push_csv_row(&mut out, row.into_iter());
    }
    out
}

fn push_csv_row(out: &mut String, fields: impl Iterator<Item = String>) {
    let mut first = true;
    for field in fields {
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(&csv_field(&field));
    }
    out.push_str("\r\n");
}

/// Quotes a CSV field when needed and prefixes `'` to text a spreadsheet would run as a formula.
fn csv_field(text: &str) -> String {
    let neutral = if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{text}")
    } else {
        text.to_owned()
    };
    if neutral.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", neutral.replace('"', "\"\""))
    } else {
        neutral
    }
}

#[cfg(test)]
mod tests {
    use super::csv_field;

    #[test]
    fn csv_fields_are_quoted_and_formulas_neutralized() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=HYPERLINK(1)"), "'=HYPERLINK(1)");
    }
}
