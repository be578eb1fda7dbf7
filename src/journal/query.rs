//! Selecting audit entries by patient, agent, time range, event type and outcome, in index order
//! with keyset paging: what the `/audit` API, exports and disclosure accounting read.

use sqlx::AnyConnection;

use super::JournalError;
use super::append::to_i64;
use super::draft::rfc3339_micros;
use super::store::{StoredLeaf, stored_leaf};

/// Which entries to select. Every field narrows the selection.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// The patient's pseudonymous reference (from the vault, never the clear id).
    pub patient_ref: Option<String>,
    /// A user or client id.
    pub agent_id: Option<String>,
    /// Recorded at or after (µs since the epoch).
    pub since: Option<i64>,
    /// Recorded before (µs since the epoch).
    pub until: Option<i64>,
    /// Event type code, e.g. `110110`.
    pub event_code: Option<String>,
    /// Outcome code 0, 4, 8 or 12.
    pub outcome: Option<i64>,
}

impl AuditFilter {
    /// A one-line, PHI-free description (patients by pseudonym), signed into export manifests.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(patient) = &self.patient_ref {
            parts.push(format!("patient-pseudonym={patient}"));
        }
        if let Some(agent) = &self.agent_id {
            parts.push(format!("agent={}", one_line(agent)));
        }
        if let Some(since) = self.since {
            parts.push(format!("since={}", rfc3339_micros(since)));
        }
        if let Some(until) = self.until {
            parts.push(format!("until={}", rfc3339_micros(until)));
        }
        if let Some(code) = &self.event_code {
            parts.push(format!("type={}", one_line(code)));
        }
        if let Some(outcome) = self.outcome {
            parts.push(format!("outcome={outcome}"));
        }
        if parts.is_empty() {
            return "all entries".to_owned();
        }
        parts.join(" ")
    }
}

fn one_line(text: &str) -> String {
    text.chars()
        .map(|character| {
            if character.is_control() {
                '?'
            } else {
                character
            }
        })
        .collect()
}

/// Up to `limit` matching entries with `after < index < below`, in index order.
pub async fn select(
    connection: &mut AnyConnection,
    filter: &AuditFilter,
    after: Option<u64>,
    below: Option<u64>,
    limit: u32,
) -> Result<Vec<StoredLeaf>, JournalError> {
    let mut conditions: Vec<String> = Vec::new();
    let mut parameter = 0;
    let mut next = || {
        parameter += 1;
        format!("${parameter}")
    };
    if filter.patient_ref.is_some() {
        conditions.push(format!("patient_ref = {}", next()));
    }
    if filter.agent_id.is_some() {
        conditions.push(format!("agent_id = {}", next()));
    }
    if filter.since.is_some() {
        conditions.push(format!("recorded_at >= {}", next()));
    }
    if filter.until.is_some() {
        conditions.push(format!("recorded_at < {}", next()));
    }
    if filter.event_code.is_some() {
        conditions.push(format!("event_code = {}", next()));
    }
    if filter.outcome.is_some() {
        conditions.push(format!("outcome = {}", next()));
    }
    if after.is_some() {
        conditions.push(format!("leaf_index > {}", next()));
    }
    if below.is_some() {
        conditions.push(format!("leaf_index < {}", next()));
    }
    let limit_parameter = next();
    let where_clause = if conditions.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conditions.join(" AND "))
    };
    let sql = format!(
        "SELECT leaf_index, leaf, patient_ref FROM audit_leaves {where_clause} ORDER BY leaf_index LIMIT {limit_parameter}"
    );
    let mut query = sqlx::query(&sql);
    if let Some(patient) = &filter.patient_ref {
        query = query.bind(patient.clone());
    }
    if let Some(agent) = &filter.agent_id {
        query = query.bind(agent.clone());
    }
    if let Some(since) = filter.since {
        query = query.bind(since);
    }
    if let Some(until) = filter.until {
        query = query.bind(until);
    }
    if let Some(code) = &filter.event_code {
        query = query.bind(code.clone());
    }
    if let Some(outcome) = filter.outcome {
        query = query.bind(outcome);
    }
    if let Some(after) = after {
        query = query.bind(to_i64(after)?);
    }
    if let Some(below) = below {
        query = query.bind(to_i64(below)?);
    }
    query = query.bind(i64::from(limit));
    let rows = query.fetch_all(&mut *connection).await?;
    rows.iter().map(stored_leaf).collect()
}

/// Every matching entry below `below`, read in pages.
pub async fn select_all(
    connection: &mut AnyConnection,
    filter: &AuditFilter,
    below: u64,
) -> Result<Vec<StoredLeaf>, JournalError> {
    const PAGE: u32 = 5000;
    let mut selected = Vec::new();
    let mut after = None;
    loop {
        let page = select(connection, filter, after, Some(below), PAGE).await?;
        let full = page.len() == PAGE as usize;
        after = page.last().map(|leaf| leaf.index);
        selected.extend(page);
        if !full {
            return Ok(selected);
        }
    }
}
