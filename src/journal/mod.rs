//! The audit journal as the record path uses it: turning what happened into a leaf, and writing
//! leaves inside the same database transaction as the effect they record.

use sqlx::{AnyConnection, Row};

use crate::access::Principal;
use crate::storage::{StorageError, now_micros};

/// DICOM / FHIR event codes the spine emits.
pub mod codes {
    /// DICOM 110110 Patient Record (create, read, update, delete of clinical records).
    pub const PATIENT_RECORD: &str = "110110";
    /// DICOM 110112 Query.
    pub const QUERY: &str = "110112";
    /// DICOM 110113 Security Alert (denials, shredding, key operations).
    pub const SECURITY_ALERT: &str = "110113";
    /// DICOM 110114 User Authentication.
    pub const USER_AUTHENTICATION: &str = "110114";
    /// DICOM 110101 Audit Log Used.
    pub const AUDIT_LOG_USED: &str = "110101";
    /// DICOM 110106 Export.
    pub const EXPORT: &str = "110106";
}

/// Outcome codes of DICOM / FHIR AuditEvent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Outcome {
    Success = 0,
    MinorFailure = 4,
    SeriousFailure = 8,
    MajorFailure = 12,
}

/// What one audited event says, before it becomes a leaf. No PHI in clear: patients appear by
/// their pseudonymous reference only.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AuditDraft {
    pub event_code: &'static str,
    /// FHIR restful interaction or operation name (`read`, `create`, `shred`, …).
    pub subtype: String,
    /// C, R, U, D or E.
    pub action: char,
    pub outcome: Outcome,
    pub agent_id: String,
    pub agent_role: String,
    pub network_address: Option<String>,
    pub token_id: Option<String>,
    pub purpose_of_use: Option<String>,
    pub request_id: Option<String>,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub resource_version: Option<i64>,
    pub patient_ref: Option<String>,
    pub decided_by: Vec<String>,
    pub break_glass: bool,
}

impl AuditDraft {
    /// An event performed by `principal`.
    pub fn by(
        principal: &Principal,
        event_code: &'static str,
        subtype: &str,
        action: char,
    ) -> Self {
        Self {
            event_code,
            subtype: subtype.to_owned(),
            action,
            outcome: Outcome::Success,
            agent_id: principal.id.clone(),
            agent_role: principal.role.as_str().to_owned(),
            network_address: principal.network_address.clone(),
            token_id: principal.token_id.clone(),
            purpose_of_use: principal.purpose_of_use.clone(),
            request_id: principal.request_id.clone(),
            resource_type: None,
            resource_id: None,
            resource_version: None,
            patient_ref: None,
            decided_by: Vec::new(),
            break_glass: false,
        }
    }

    pub fn on(mut self, resource_type: &str, resource_id: Option<&str>) -> Self {
        self.resource_type = Some(resource_type.to_owned());
        self.resource_id = resource_id.map(str::to_owned);
        self
    }

    pub fn for_patient(mut self, patient_ref: &str) -> Self {
        self.patient_ref = Some(patient_ref.to_owned());
        self
    }

    pub fn decided_by(mut self, policies: &[String]) -> Self {
        self.decided_by = policies.to_vec();
        self
    }

    pub fn failed(mut self, outcome: Outcome) -> Self {
        self.outcome = outcome;
        self
    }
}

/// The appliance's identity, stamped on every leaf.
#[derive(Debug, Clone)]
pub struct JournalIdentity {
    pub appliance_id: String,
}

/// Appends `drafts` as leaves starting at `first_index`, inside the caller's transaction.
/// Returns the next free index.
pub async fn append_leaves(
    connection: &mut AnyConnection,
    identity: &JournalIdentity,
    first_index: i64,
    drafts: &[AuditDraft],
) -> Result<i64, StorageError> {
    let mut index = first_index;
    for draft in drafts {
        let recorded_at = now_micros();
        let leaf = encode_leaf(identity, draft, recorded_at);
        sqlx::query(
            "INSERT INTO audit_leaves (leaf_index, leaf, recorded_at, patient_ref, agent_id, event_code, outcome) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(index)
        .bind(leaf)
        .bind(recorded_at)
        .bind(draft.patient_ref.clone())
        .bind(draft.agent_id.clone())
        .bind(draft.event_code)
        .bind(draft.outcome as i64)
        .execute(&mut *connection)
        .await?;
        index += 1;
    }
    Ok(index)
}

/// Reads the journal size under the batch's lock (the caller has already updated the head row).
pub async fn current_size(connection: &mut AnyConnection) -> Result<i64, StorageError> {
    let row = sqlx::query("SELECT tree_size FROM journal_head WHERE id = 1")
        .fetch_one(&mut *connection)
        .await?;
    Ok(row.try_get(0)?)
}

pub async fn store_size(connection: &mut AnyConnection, size: i64) -> Result<(), StorageError> {
    sqlx::query("UPDATE journal_head SET tree_size = $1 WHERE id = 1")
        .bind(size)
        .execute(&mut *connection)
        .await?;
    Ok(())
}

fn encode_leaf(identity: &JournalIdentity, draft: &AuditDraft, recorded_at: i64) -> Vec<u8> {
    let recorded = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(recorded_at) * 1000)
        .ok()
        .and_then(|moment| {
            moment
                .format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    let value = serde_json::json!({
        "appliance": identity.appliance_id,
        "recorded": recorded,
        "event": draft,
    });
    serde_json::to_vec(&value).unwrap_or_default()
}
