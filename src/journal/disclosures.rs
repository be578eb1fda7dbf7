//! Accounting of disclosures (45 CFR 164.528) for one patient: every successful release of the
//! patient's records, with date, recipient, description and purpose, read from the journal.

use glastonbury_audit::{AuditAction, AuditEvent, AuditOutcome};
use sqlx::{AnyConnection, Row};

use super::JournalError;
use super::query::{AuditFilter, select_all};
use super::store;

/// Purposes of use that are treatment, payment or health care operations: 164.528(a)(1)(i)
/// exempts them from the accounting, so they are listed only on request.
const TREATMENT_PAYMENT_OPERATIONS: &[&str] = &["TREAT", "ETREAT", "HPAYMT", "HOPERAT"];

/// One disclosure.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Disclosure {
    /// Journal index of the entry that records it.
    pub entry: u64,
    /// When (RFC 3339).
    pub date: String,
    /// The user or client that received the data.
    pub recipient: String,
    /// The recipient's registered name, when it is a client of this appliance.
    pub recipient_name: Option<String>,
    /// What was disclosed, e.g. `read Observation/17/_history/2`.
    pub description: String,
    /// Purpose of use codes, or `not stated`.
    pub purpose: String,
    /// Whether the purpose is treatment, payment or operations (exempt from the accounting).
    pub treatment_payment_operations: bool,
}

/// The disclosures of the patient `patient_ref`, oldest first; TPO ones only with `include_tpo`.
pub async fn account(
    connection: &mut AnyConnection,
    patient_ref: &str,
    include_tpo: bool,
) -> Result<Vec<Disclosure>, JournalError> {
    let size = store::read_head(connection).await?.size();
    let filter = AuditFilter {
        patient_ref: Some(patient_ref.to_owned()),
        outcome: Some(0),
        ..AuditFilter::default()
    };
    let mut disclosures = Vec::new();
    for leaf in select_all(connection, &filter, size).await? {
        let Ok(event) = AuditEvent::from_leaf_bytes(&leaf.bytes) else {
            continue;
        };
        let Some(disclosure) = disclosure_of(leaf.index, &event) else {
            continue;
        };
        if include_tpo || !disclosure.treatment_payment_operations {
            disclosures.push(disclosure);
        }
    }
    for disclosure in &mut disclosures {
        disclosure.recipient_name = client_name(connection, &disclosure.recipient).await?;
    }
    Ok(disclosures)
}

fn disclosure_of(index: u64, event: &AuditEvent) -> Option<Disclosure> {
    let releases_data = matches!(event.action, AuditAction::Read | AuditAction::Execute);
    let oversight = event.event_type.code == glastonbury_audit::codes::AUDIT_LOG_USED.code;
    if !releases_data || oversight || event.outcome != AuditOutcome::Success {
        return None;
    }
    let recipient = event
        .agents
        .iter()
        .find(|agent| agent.requestor)?
        .who
        .clone();
    let subtype = event
        .subtypes
        .first()
        .map_or(event.event_type.code.as_str(), |subtype| {
            subtype.code.as_str()
        });
    let what = event
        .entities
        .iter()
        .find_map(
            |entity| match (&entity.resource_type, &entity.resource_id) {
                (Some(kind), Some(id)) => Some(format!("{kind}/{id}")),
                (Some(kind), None) => Some(kind.clone()),
                _ => None,
            },
        )
        .unwrap_or_default();
    let purposes: Vec<&str> = event
        .purpose_of_use
        .iter()
        .map(|purpose| purpose.code.as_str())
        .collect();
    let treatment_payment_operations = !purposes.is_empty()
        && purposes
            .iter()
            .all(|purpose| TREATMENT_PAYMENT_OPERATIONS.contains(purpose));
    Some(Disclosure {
        entry: index,
        date: event.recorded.clone(),
        recipient,
        recipient_name: None,
        description: format!("{subtype} {what}").trim().to_owned(),
        purpose: if purposes.is_empty() {
            "not stated".to_owned()
        } else {
            purposes.join(" ")
        },
        treatment_payment_operations,
    })
}

async fn client_name(
    connection: &mut AnyConnection,
    client_id: &str,
) -> Result<Option<String>, JournalError> {
    let row = sqlx::query("SELECT name FROM clients WHERE client_id = $1")
        .bind(client_id)
        .fetch_optional(&mut *connection)
        .await?;
    Ok(row.map(|row| row.try_get(0)).transpose()?)
}
