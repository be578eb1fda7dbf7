//! The audit leaf: an [`AuditEvent`] carrying what IHE BALP, FHIR AuditEvent and DICOM audit
//! messages need, canonically encoded (RFC 8785), with PHI only as sealed ciphertext plus a
//! hiding commitment.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rand::RngCore as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::canonical::{CanonicalError, canonical_json, parse_canonical};
use crate::hash::{Hash, leaf_hash};

/// Schema tag stored in every leaf.
pub const AUDIT_EVENT_SCHEMA: &str = "glastonbury-audit-event/v1";

/// Domain tag of detail commitments: SHA-256(tag ‖ nonce ‖ plaintext).
pub const DETAIL_COMMITMENT_TAG: &[u8] = b"glastonbury-audit-detail-commitment/v1\n";

/// A coded concept: code system, code and human-readable display.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coding {
    /// Code system URI, e.g. `http://dicom.nema.org/resources/ontology/DCM`.
    pub system: String,
    /// The code, e.g. `110110`.
    pub code: String,
    /// Display text, e.g. `Patient Record`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
}

/// The event action (FHIR AuditEvent.action): create, read, update, delete, execute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuditAction {
    /// Create.
    #[serde(rename = "C")]
    Create,
    /// Read, view, print, query.
    #[serde(rename = "R")]
    Read,
    /// Update.
    #[serde(rename = "U")]
    Update,
    /// Delete.
    #[serde(rename = "D")]
    Delete,
    /// Execute (e.g. a search, an operation, an export).
    #[serde(rename = "E")]
    Execute,
}

/// The event outcome (FHIR AuditEvent.outcome / DICOM EventOutcomeIndicator), stored as 0/4/8/12.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditOutcome {
    /// 0: success.
    Success,
    /// 4: minor failure.
    MinorFailure,
    /// 8: serious failure.
    SeriousFailure,
    /// 12: major failure.
    MajorFailure,
}

impl AuditOutcome {
    /// The numeric code (0, 4, 8 or 12).
    pub fn code(self) -> u8 {
        match self {
            Self::Success => 0,
            Self::MinorFailure => 4,
            Self::SeriousFailure => 8,
            Self::MajorFailure => 12,
        }
    }
}

impl Serialize for AuditOutcome {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u8(self.code())
    }
}

impl<'de> Deserialize<'de> for AuditOutcome {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match u8::deserialize(deserializer)? {
            0 => Ok(Self::Success),
            4 => Ok(Self::MinorFailure),
            8 => Ok(Self::SeriousFailure),
            12 => Ok(Self::MajorFailure),
            other => Err(serde::de::Error::custom(format!(
                "unknown outcome code {other}"
            ))),
        }
    }
}

/// Who took part: a user or API client (FHIR AuditEvent.agent / DICOM ActiveParticipant).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditAgent {
    /// User id or client id (never a patient's name).
    pub who: String,
    /// Whether this agent initiated the event.
    pub requestor: bool,
    /// Roles, e.g. a workforce role or SMART scope set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<Coding>,
    /// Network address the request came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_address: Option<String>,
    /// Access token id (`jti`) the request carried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
}

/// What was touched (FHIR AuditEvent.entity / DICOM ParticipantObjectIdentification).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntity {
    /// Role of the object, e.g. patient, report, query (DICOM ParticipantObjectTypeCodeRole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Coding>,
    /// FHIR resource type, e.g. `Observation`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_type: Option<String>,
    /// FHIR logical id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
    /// DICOM Study Instance UID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub study_uid: Option<String>,
    /// DICOM Series Instance UID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub series_uid: Option<String>,
    /// DICOM SOP Instance UIDs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instance_uids: Vec<String>,
    /// The patient's pseudonymous id (never a medical record number or name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient_pseudonym: Option<String>,
}

/// PHI-bearing detail (query text, free text), sealed: the leaf holds only ciphertext and a
/// hiding commitment, so it still verifies after the patient key is destroyed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedDetail {
    /// Base64 ciphertext made by the caller (the binary uses age to the patient's key).
    /// Encrypt the commitment nonce together with the plaintext so both vanish with the key.
    pub ciphertext: String,
    /// Base64 [`DetailCommitment`] of the plaintext.
    pub commitment: String,
    /// Which key sealed it (an opaque key id, no PHI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
}

/// One audit record; its canonical JSON encoding is the Merkle leaf.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Always [`AUDIT_EVENT_SCHEMA`].
    pub schema: String,
    /// Event type, e.g. DCM 110110 Patient Record or audit-event-type `rest`.
    pub event_type: Coding,
    /// Subtypes, e.g. FHIR restful-interaction `read` or DCM 110112 Query.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subtypes: Vec<Coding>,
    /// Action C/R/U/D/E.
    pub action: AuditAction,
    /// When the appliance recorded the event (RFC 3339).
    pub recorded: String,
    /// Outcome 0/4/8/12.
    pub outcome: AuditOutcome,
    /// Short non-PHI reason for a failure, e.g. `forbidden`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome_reason: Option<String>,
    /// Purpose of use, e.g. v3-ActReason TREAT.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub purpose_of_use: Vec<Coding>,
    /// Users, clients and systems that took part.
    pub agents: Vec<AuditAgent>,
    /// The appliance's own id (FHIR AuditEvent.source.observer / DICOM AuditSourceID).
    pub source: String,
    /// Objects touched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entities: Vec<AuditEntity>,
    /// Request correlation id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Ids of the policies that decided access.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy_ids: Vec<String>,
    /// Whether emergency access (break-glass) was used.
    pub break_glass: bool,
    /// Sealed PHI-bearing detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_detail: Option<SealedDetail>,
}

/// Why a leaf could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The event could not be turned into JSON.
    #[error("audit event does not serialize: {0}")]
    Serialize(#[from] serde_json::Error),
    /// The JSON has no canonical form, or the bytes were not canonical.
    #[error(transparent)]
    Canonical(#[from] CanonicalError),
    /// The leaf names another schema.
    #[error("unsupported audit event schema {0:?}")]
    Schema(String),
}

impl AuditEvent {
    /// The canonical leaf bytes (RFC 8785 JSON of this event).
    pub fn leaf_bytes(&self) -> Result<Vec<u8>, EventError> {
        Ok(canonical_json(&serde_json::to_value(self)?)?)
    }

    /// The RFC 9162 leaf hash of [`AuditEvent::leaf_bytes`].
    pub fn leaf_hash(&self) -> Result<Hash, EventError> {
        Ok(leaf_hash(&self.leaf_bytes()?))
    }

    /// Decodes leaf bytes, requiring canonical form and the known schema.
    pub fn from_leaf_bytes(bytes: &[u8]) -> Result<Self, EventError> {
        let value = parse_canonical(bytes)?;
        let event: Self = serde_json::from_value(value)?;
        if event.schema != AUDIT_EVENT_SCHEMA {
            return Err(EventError::Schema(event.schema));
        }
        Ok(event)
    }
}

/// Well-known codes for event types, subtypes and purposes of use.
pub mod codes {
    use super::Coding;

    /// DICOM controlled terminology (DCM).
    pub const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
    /// FHIR restful-interaction codes.
    pub const FHIR_RESTFUL: &str = "http://hl7.org/fhir/restful-interaction";
    /// FHIR audit-event-type codes.
    pub const AUDIT_EVENT_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-event-type";
    /// HL7 v3 ActReason (purpose of use).
    pub const ACT_REASON: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";

    /// A code in a system, as compile-time constants; turn into a [`Coding`] with `coding()`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Code {
        /// Code system URI.
        pub system: &'static str,
        /// The code.
        pub code: &'static str,
        /// Display text.
        pub display: &'static str,
    }

    impl Code {
        /// The owned [`Coding`].
        pub fn coding(self) -> Coding {
            Coding {
                system: self.system.to_owned(),
                code: self.code.to_owned(),
                display: Some(self.display.to_owned()),
            }
        }
    }

    const fn dcm(code: &'static str, display: &'static str) -> Code {
        Code {
            system: DCM,
            code,
            display,
        }
    }

    const fn rest(code: &'static str, display: &'static str) -> Code {
        Code {
            system: FHIR_RESTFUL,
            code,
            display,
        }
    }

    const fn reason(code: &'static str, display: &'static str) -> Code {
        Code {
            system: ACT_REASON,
            code,
            display,
        }
    }

    /// DCM 110100 Application Activity.
    pub const APPLICATION_ACTIVITY: Code = dcm("110100", "Application Activity");
    /// DCM 110101 Audit Log Used.
    pub const AUDIT_LOG_USED: Code = dcm("110101", "Audit Log Used");
    /// DCM 110103 DICOM Instances Accessed.
    pub const INSTANCES_ACCESSED: Code = dcm("110103", "DICOM Instances Accessed");
    /// DCM 110104 DICOM Instances Transferred.
    pub const INSTANCES_TRANSFERRED: Code = dcm("110104", "DICOM Instances Transferred");
    /// DCM 110105 DICOM Study Deleted.
    pub const STUDY_DELETED: Code = dcm("110105", "DICOM Study Deleted");
    /// DCM 110106 Export.
    pub const EXPORT: Code = dcm("110106", "Export");
    /// DCM 110107 Import.
    pub const IMPORT: Code = dcm("110107", "Import");
    /// DCM 110110 Patient Record.
    pub const PATIENT_RECORD: Code = dcm("110110", "Patient Record");
    /// DCM 110112 Query.
    pub const QUERY: Code = dcm("110112", "Query");
    /// DCM 110113 Security Alert.
    pub const SECURITY_ALERT: Code = dcm("110113", "Security Alert");
    /// DCM 110114 User Authentication.
    pub const USER_AUTHENTICATION: Code = dcm("110114", "User Authentication");
    /// audit-event-type `rest` (RESTful Operation).
    pub const REST: Code = Code {
        system: AUDIT_EVENT_TYPE,
        code: "rest",
        display: "RESTful Operation",
    };
    /// FHIR interaction `read`.
    pub const READ: Code = rest("read", "read");
    /// FHIR interaction `vread`.
    pub const VREAD: Code = rest("vread", "vread");
    /// FHIR interaction `create`.
    pub const CREATE: Code = rest("create", "create");
    /// FHIR interaction `update`.
    pub const UPDATE: Code = rest("update", "update");
    /// FHIR interaction `patch`.
    pub const PATCH: Code = rest("patch", "patch");
    /// FHIR interaction `delete`.
    pub const DELETE: Code = rest("delete", "delete");
    /// FHIR interaction `history`.
    pub const HISTORY: Code = rest("history", "history");
    /// FHIR interaction `search-type`.
    pub const SEARCH_TYPE: Code = rest("search-type", "search-type");
    /// FHIR interaction `search`.
    pub const SEARCH: Code = rest("search", "search");
    /// FHIR interaction `transaction`.
    pub const TRANSACTION: Code = rest("transaction", "transaction");
    /// FHIR interaction `operation`.
    pub const OPERATION: Code = rest("operation", "operation");
    /// Purpose of use TREAT (treatment).
    pub const TREATMENT: Code = reason("TREAT", "treatment");
    /// Purpose of use ETREAT (emergency treatment, break-glass).
    pub const EMERGENCY_TREATMENT: Code = reason("ETREAT", "Emergency Treatment");
    /// Purpose of use HPAYMT (payment).
    pub const PAYMENT: Code = reason("HPAYMT", "healthcare payment");
    /// Purpose of use HOPERAT (operations).
    pub const OPERATIONS: Code = reason("HOPERAT", "healthcare operations");
    /// Purpose of use HRESCH (research).
    pub const RESEARCH: Code = reason("HRESCH", "healthcare research");
    /// Purpose of use PUBHLTH (public health).
    pub const PUBLIC_HEALTH: Code = reason("PUBHLTH", "public health");
    /// Purpose of use PATRQT (patient requested).
    pub const PATIENT_REQUESTED: Code = reason("PATRQT", "patient requested");
}

/// The secret 32-byte nonce of a detail commitment; zeroized on drop, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct DetailNonce(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for DetailNonce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DetailNonce(..)")
    }
}

impl DetailNonce {
    /// A fresh random nonce from the OS.
    pub fn random() -> Self {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(bytes.as_mut());
        Self(bytes)
    }

    /// A nonce from its bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The nonce bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// Why a detail commitment did not check out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DetailError {
    /// The stored commitment is not base64 of 32 bytes.
    #[error("detail commitment is malformed")]
    Malformed,
    /// The nonce and plaintext do not open the commitment.
    #[error("detail does not match its commitment")]
    Mismatch,
}

/// SHA-256([`DETAIL_COMMITMENT_TAG`] ‖ nonce ‖ plaintext): binds a sealed detail's plaintext
/// into the leaf without revealing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DetailCommitment(pub Hash);

impl DetailCommitment {
    /// Commits to `plaintext` with a fresh random nonce; keep the nonce with the plaintext
    /// (inside the ciphertext) to open it later.
    pub fn make(plaintext: &[u8]) -> (Self, DetailNonce) {
        let nonce = DetailNonce::random();
        (Self::compute(&nonce, plaintext), nonce)
    }

    /// The commitment for a given nonce and plaintext.
    pub fn compute(nonce: &DetailNonce, plaintext: &[u8]) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(DETAIL_COMMITMENT_TAG);
        hasher.update(nonce.as_bytes());
        hasher.update(plaintext);
        Self(hasher.finalize().into())
    }

    /// Checks that `nonce` and `plaintext` open this commitment.
    pub fn check(&self, nonce: &DetailNonce, plaintext: &[u8]) -> Result<(), DetailError> {
        if Self::compute(nonce, plaintext) == *self {
            Ok(())
        } else {
            Err(DetailError::Mismatch)
        }
    }

    /// Base64 text, as stored in [`SealedDetail::commitment`].
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0)
    }

    /// Parses the base64 text of [`SealedDetail::commitment`].
    pub fn from_base64(text: &str) -> Result<Self, DetailError> {
        let bytes = BASE64.decode(text).map_err(|_| DetailError::Malformed)?;
        let hash: Hash = bytes.try_into().map_err(|_| DetailError::Malformed)?;
        Ok(Self(hash))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample_event() -> AuditEvent {
        AuditEvent {
            schema: AUDIT_EVENT_SCHEMA.to_owned(),
            event_type: codes::REST.coding(),
            subtypes: vec![codes::READ.coding()],
            action: AuditAction::Read,
            recorded: "2025-01-02T03:04:05Z".to_owned(),
            outcome: AuditOutcome::Success,
            outcome_reason: None,
            purpose_of_use: vec![codes::TREATMENT.coding()],
            agents: vec![AuditAgent {
                who: "client-7".to_owned(),
                requestor: true,
                roles: vec![],
                network_address: Some("10.0.0.9".to_owned()),
                token_id: Some("jti-1".to_owned()),
            }],
            source: "appliance-1".to_owned(),
            entities: vec![AuditEntity {
                resource_type: Some("Observation".to_owned()),
                resource_id: Some("obs-1".to_owned()),
                patient_pseudonym: Some("p-abc".to_owned()),
                ..AuditEntity::default()
            }],
            request_id: Some("req-1".to_owned()),
            policy_ids: vec!["policy0".to_owned()],
            break_glass: false,
            sealed_detail: None,
        }
    }

    #[test]
    fn leaf_round_trip() {
        let event = sample_event();
        let bytes = event.leaf_bytes().unwrap();
        assert_eq!(AuditEvent::from_leaf_bytes(&bytes).unwrap(), event);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("{\"action\":\"R\",\"agents\":"));
        assert!(text.contains("\"outcome\":0"));
    }

    #[test]
    fn commitment_opens_only_with_nonce_and_plaintext() {
        let (commitment, nonce) = DetailCommitment::make(b"name=Smith");
        assert!(commitment.check(&nonce, b"name=Smith").is_ok());
        assert_eq!(
            commitment.check(&nonce, b"name=Smyth"),
            Err(DetailError::Mismatch)
        );
        let other = DetailNonce::random();
        assert_eq!(
            commitment.check(&other, b"name=Smith"),
            Err(DetailError::Mismatch)
        );
        let parsed = DetailCommitment::from_base64(&commitment.to_base64()).unwrap();
        assert_eq!(parsed, commitment);
        assert_eq!(format!("{nonce:?}"), "DetailNonce(..)");
    }
}
