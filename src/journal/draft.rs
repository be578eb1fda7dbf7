//! What one audited event says before it becomes a leaf ([`AuditDraft`]), and its conversion
//! into the canonical [`AuditEvent`] the Merkle log stores.

use glastonbury_audit::codes::{ACT_REASON, Code, FHIR_RESTFUL};
use glastonbury_audit::{
    AUDIT_EVENT_SCHEMA, AuditAction, AuditAgent, AuditEntity, AuditEvent, Coding, SealedDetail,
};

use crate::access::Principal;
use crate::vault::NO_PATIENT;

pub use glastonbury_audit::AuditOutcome as Outcome;

/// Code system of the appliance's own roles.
pub const ROLE_SYSTEM: &str = "https://glastonbury.dev/CodeSystem/role";
/// Code system of subtypes that are not FHIR interactions (shred, key export, …).
pub const OPERATION_SYSTEM: &str = "https://glastonbury.dev/CodeSystem/operation";

/// FHIR restful-interaction codes; any other subtype is an appliance operation.
const FHIR_INTERACTIONS: &[&str] = &[
    "read",
    "vread",
    "update",
    "patch",
    "delete",
    "history",
    "history-instance",
    "history-type",
    "history-system",
    "create",
    "search",
    "search-type",
    "search-system",
    "capabilities",
    "transaction",
    "batch",
    "operation",
];

/// What one audited event says, before it becomes a leaf. No PHI in clear: patients appear by
/// their pseudonymous reference only, and PHI-bearing text only as a [`SealedDetail`].
#[derive(Debug, Clone)]
pub struct AuditDraft {
    pub event_code: Code,
    /// FHIR restful interaction or operation name (`read`, `create`, `patient-shred`, …).
    pub subtype: String,
    /// C, R, U, D or E.
    pub action: char,
    pub outcome: Outcome,
    /// Short non-PHI reason for a failure (`forbidden`, `not-found`, …).
    pub outcome_reason: Option<String>,
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
    pub sealed_detail: Option<SealedDetail>,
}

impl AuditDraft {
    /// An event performed by `principal`.
    pub fn by(principal: &Principal, event_code: Code, subtype: &str, action: char) -> Self {
        Self {
            event_code,
            subtype: subtype.to_owned(),
            action,
            outcome: Outcome::Success,
            outcome_reason: None,
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
            sealed_detail: None,
        }
    }

    /// An event by a caller that has not (yet) proven who it is: `claimed_id` is what it
    /// claimed (a client id, or `unknown`), never a credential.
    pub fn unauthenticated(
        claimed_id: &str,
        network_address: Option<&str>,
        event_code: Code,
        subtype: &str,
        action: char,
    ) -> Self {
        let principal = Principal {
            id: claimed_id.to_owned(),
            role: crate::access::Role::Device,
            scopes: Vec::new(),
            token_id: None,
            network_address: network_address.map(str::to_owned),
            purpose_of_use: None,
            request_id: None,
            break_glass_reason: None,
        };
        let mut draft = Self::by(&principal, event_code, subtype, action);
        draft.agent_role = "unauthenticated".to_owned();
        draft
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

    /// Flags the event as emergency access (break-glass).
    pub fn emergency(mut self, break_glass: bool) -> Self {
        self.break_glass = break_glass;
        self
    }

    pub fn failed(mut self, outcome: Outcome) -> Self {
        self.outcome = outcome;
        self
    }

    pub fn because(mut self, reason: &str) -> Self {
        self.outcome_reason = Some(reason.to_owned());
        self
    }

    pub fn with_detail(mut self, detail: SealedDetail) -> Self {
        self.sealed_detail = Some(detail);
        self
    }

    /// The patient pseudonym, unless the event concerns no patient.
    pub fn patient_pseudonym(&self) -> Option<&str> {
        self.patient_ref
            .as_deref()
            .filter(|reference| *reference != NO_PATIENT)
    }
}

/// The appliance's identity, stamped on every leaf.
#[derive(Debug, Clone)]
pub struct JournalIdentity {
    pub appliance_id: String,
}

/// The canonical event for `draft`, recorded at `recorded_at` (microseconds since the epoch).
pub fn to_event(identity: &JournalIdentity, draft: &AuditDraft, recorded_at: i64) -> AuditEvent {
    AuditEvent {
        schema: AUDIT_EVENT_SCHEMA.to_owned(),
        event_type: draft.event_code.coding(),
        subtypes: vec![subtype_coding(&draft.subtype)],
        action: action_of(draft.action),
        recorded: rfc3339_micros(recorded_at),
        outcome: draft.outcome,
        outcome_reason: draft.outcome_reason.clone(),
        purpose_of_use: draft
            .purpose_of_use
            .iter()
            .map(|purpose| Coding {
                system: ACT_REASON.to_owned(),
                code: purpose.clone(),
                display: None,
            })
            .collect(),
        agents: vec![AuditAgent {
            who: draft.agent_id.clone(),
            requestor: true,
            roles: vec![Coding {
                system: ROLE_SYSTEM.to_owned(),
                code: draft.agent_role.clone(),
                display: None,
            }],
            network_address: draft.network_address.clone(),
            token_id: draft.token_id.clone(),
        }],
        source: identity.appliance_id.clone(),
        entities: entities_of(draft),
        request_id: draft.request_id.clone(),
        policy_ids: draft.decided_by.clone(),
        break_glass: draft.break_glass,
        sealed_detail: draft.sealed_detail.clone(),
    }
}

fn entities_of(draft: &AuditDraft) -> Vec<AuditEntity> {
    let patient = draft.patient_pseudonym().map(str::to_owned);
    if draft.resource_type.is_none() && patient.is_none() {
        return Vec::new();
    }
    let resource_id = match (&draft.resource_id, draft.resource_version) {
        (Some(id), Some(version)) => Some(format!("{id}/_history/{version}")),
        (Some(id), None) => Some(id.clone()),
        (None, _) => None,
    };
    vec![AuditEntity {
        resource_type: draft.resource_type.clone(),
        resource_id,
        patient_pseudonym: patient,
        ..AuditEntity::default()
    }]
}

fn subtype_coding(subtype: &str) -> Coding {
    let system = if FHIR_INTERACTIONS.contains(&subtype) {
        FHIR_RESTFUL
    } else {
        OPERATION_SYSTEM
    };
    Coding {
        system: system.to_owned(),
        code: subtype.to_owned(),
        display: None,
    }
}

fn action_of(letter: char) -> AuditAction {
    match letter {
        'C' => AuditAction::Create,
        'R' => AuditAction::Read,
        'U' => AuditAction::Update,
        'D' => AuditAction::Delete,
        _ => AuditAction::Execute,
    }
}

/// RFC 3339 UTC with microseconds, e.g. `2026-11-22T03:14:15.926535Z`.
pub fn rfc3339_micros(micros: i64) -> String {
    let Ok(moment) = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
    else {
        return String::new();
    };
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    moment.format(&format).unwrap_or_default()
}

/// Parses an RFC 3339 time or a plain date (`2026-11-22`, midnight UTC) into microseconds.
pub fn parse_time_micros(text: &str) -> Option<i64> {
    use time::format_description::well_known::Rfc3339;
    if let Ok(moment) = time::OffsetDateTime::parse(text, &Rfc3339) {
        return i64::try_from(moment.unix_timestamp_nanos() / 1000).ok();
    }
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let date = time::Date::parse(text, &format).ok()?;
    let moment = date.midnight().assume_utc();
    i64::try_from(moment.unix_timestamp_nanos() / 1000).ok()
}
