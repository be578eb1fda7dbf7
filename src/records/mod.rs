//! The record path: the one module every surface (FHIR, DICOMweb, DIMSE, MQTT, workflows, CLI)
//! calls to authorize, encrypt, store, read and audit records. Nothing else touches the database,
//! the blob store, the keys or the journal.

pub mod bulk_export;
pub mod dicom;
pub mod egress;
pub mod imaging_study;
mod known_heads;
pub mod patient_owners;
pub mod search;
pub mod search_index;
pub mod stored_study_tokens;
mod wal_sync;
pub mod writer;

use std::sync::Arc;

use bytes::Bytes;
use sqlx::Row;
use tokio::sync::broadcast;

use crate::access::{
    self, Action, Allowed, AuditJournalAccess, Authorizer, Denied, Principal, Role, View,
};
use crate::journal::{AuditDraft, JournalIdentity, Outcome, codes};
use crate::storage::{BlobError, BlobStore, Database, StorageError};
use crate::vault::{PatientKeyring, Vault, VaultError};
use writer::RowWrite;
pub use writer::{Precondition, UnitReceipt, WriteUnit, Writer};

/// Encrypted bodies up to this size live in the database row; larger ones in the blob store.
pub const DEFAULT_INLINE_LIMIT: usize = 64 * 1024;

/// An encrypted body where it was placed: in the row, or under a blob key.
#[derive(Debug)]
struct PlacedPayload {
    inline_body: Option<Vec<u8>>,
    blob_key: Option<String>,
}

/// The row of a new (not deleted) version whose body is already encrypted and placed.
fn version_row(
    key: &RecordKey,
    patient_ref: &str,
    content_type: String,
    payload: PlacedPayload,
    precondition: Precondition,
    index: search_index::IndexRows,
) -> RowWrite {
    RowWrite {
        resource_type: key.resource_type.clone(),
        resource_id: key.resource_id.clone(),
        patient_ref: patient_ref.to_owned(),
        content_type,
        deleted: false,
        inline_body: payload.inline_body,
        blob_key: payload.blob_key,
        precondition,
        index,
        dicom: None,
    }
}

/// Errors of the record path. None carries PHI.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{0}")]
    Denied(Denied),
    #[error("record not found")]
    NotFound,
    #[error("record was deleted")]
    Deleted { version: i64, last_updated: i64 },
    #[error("record already exists")]
    AlreadyExists,
    #[error("version conflict")]
    VersionConflict { current: Option<i64> },
    #[error("this patient's data was crypto-shredded and can no longer be read")]
    Shredded,
    #[error("the stored payload is damaged and cannot be decrypted")]
    Damaged,
    #[error(
        "the request matches too many resources (a chained or _has parameter, or $everything); narrow it"
    )]
    TooBroad,
    #[error("{0}")]
    NotInView(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the record writer is not running")]
    Unavailable,
    #[error("audit leaf could not be made: {0}")]
    Audit(String),
    #[error(transparent)]
    Vault(VaultError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Blob(BlobError),
}

/// The message with which the database refuses new content for a crypto-shredded patient (the
/// `refuse_records_of_shredded_patients` trigger of migration 0010, on both engines).
pub const SHREDDED_PATIENT_REFUSAL: &str = "glastonbury: the patient was crypto-shredded";

impl From<sqlx::Error> for RecordError {
    fn from(error: sqlx::Error) -> Self {
        let refused_as_shredded = error
            .as_database_error()
            .is_some_and(|database_error| database_error.message() == SHREDDED_PATIENT_REFUSAL);
        if refused_as_shredded {
            return Self::Shredded;
        }
        Self::Storage(StorageError::from(error))
    }
}

impl From<VaultError> for RecordError {
    fn from(error: VaultError) -> Self {
        match error {
            VaultError::PatientShredded => Self::Shredded,
            VaultError::Payload(_) => Self::Damaged,
            other => Self::Vault(other),
        }
    }
}

impl From<BlobError> for RecordError {
    fn from(error: BlobError) -> Self {
        match error {
            BlobError::NotFound(_) => Self::Damaged,
            other => Self::Blob(other),
        }
    }
}

/// Identifies a record across its versions.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecordKey {
    pub resource_type: String,
    pub resource_id: String,
}

impl RecordKey {
    pub fn new(resource_type: &str, resource_id: &str) -> Self {
        Self {
            resource_type: resource_type.to_owned(),
            resource_id: resource_id.to_owned(),
        }
    }
}

/// A body to store.
#[derive(Debug, Clone)]
pub struct RecordBody {
    /// The patient the record belongs to (their logical id), or `None`.
    pub patient_id: Option<String>,
    pub content_type: String,
    pub body: Bytes,
    /// Search-parameter values of the body, in the clear; stored only as index rows (tokens).
    pub search_index: Vec<glastonbury_fhir::extract::IndexEntry>,
}

impl RecordBody {
    /// A FHIR resource to store: its JSON and its search-parameter values.
    pub fn fhir(
        patient_id: Option<String>,
        resource_type: &str,
        resource: &serde_json::Value,
    ) -> Self {
        Self {
            patient_id,
            content_type: "application/fhir+json".to_owned(),
            body: Bytes::from(resource.to_string()),
            search_index: glastonbury_fhir::extract::extract_index(resource_type, resource),
        }
    }
}

/// A write that is encrypted, indexed and audited but not yet committed.
#[derive(Debug)]
pub struct PreparedWrite {
    key: RecordKey,
    row: RowWrite,
    draft: AuditDraft,
}

impl PreparedWrite {
    pub fn key(&self) -> &RecordKey {
        &self.key
    }
}

/// Metadata of one stored version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordVersion {
    pub key: RecordKey,
    pub version: i64,
    pub last_updated: i64,
    pub deleted: bool,
}

/// A decrypted record version, as the caller's view shows it.
#[derive(Debug, Clone)]
pub struct Record {
    pub meta: RecordVersion,
    pub content_type: String,
    pub body: Bytes,
    /// `SafeHarbor` when the body was de-identified and the id is a pseudonym.
    pub view: View,
}

/// Announced after a record version is durable: the seam for workflows and subscriptions.
#[derive(Debug, Clone)]
pub struct RecordStored {
    pub meta: RecordVersion,
    pub patient_ref: String,
    /// The keyed hash of the study a DICOM instance belongs to; `None` for other records.
    pub study_key: Option<String>,
}

/// The record path of one appliance process.
#[derive(Debug)]
pub struct Records {
    database: Database,
    blobs: BlobStore,
    vault: Arc<Vault>,
    writer: Writer,
    authorizer: Authorizer,
    break_glass_uses: prometheus_client::metrics::counter::Counter,
    stored_events: broadcast::Sender<RecordStored>,
    inline_limit: usize,
    export_expiry_seconds: u64,
    deidentification: Arc<access::deidentification::DeidentificationPolicies>,
    /// Studies whose identifying-attribute tokens this process has committed.
    stored_study_tokens: stored_study_tokens::StoredStudyTokens,
    /// The FHIR Patient of each patient identifier looked up (SQLite only; the writer forgets
    /// them when it writes a Patient).
    patient_owners: Arc<patient_owners::PatientOwners>,
}

impl Records {
    pub fn new(
        database: Database,
        blobs: BlobStore,
        vault: Arc<Vault>,
        identity: JournalIdentity,
        authorizer: Authorizer,
        deidentification: Arc<access::deidentification::DeidentificationPolicies>,
    ) -> Self {
        let patient_owners = Arc::new(patient_owners::PatientOwners::for_engine(database.engine()));
        let writer = Writer::start(database.clone(), identity, Arc::clone(&patient_owners));
        let (stored_events, _) = broadcast::channel(1024);
        Self {
            database,
            blobs,
            vault,
            writer,
            authorizer,
            break_glass_uses: prometheus_client::metrics::counter::Counter::default(),
            stored_events,
            inline_limit: DEFAULT_INLINE_LIMIT,
            export_expiry_seconds: bulk_export::DEFAULT_EXPORT_EXPIRY_SECONDS,
            deidentification,
            stored_study_tokens: stored_study_tokens::StoredStudyTokens::default(),
            patient_owners,
        }
    }

    /// Sets how long finished Bulk Data exports stay available.
    pub fn with_export_expiry(mut self, seconds: u64) -> Self {
        self.export_expiry_seconds = seconds;
        self
    }

    /// Sets where bodies move from the database row to the blob store (tests use 0 to force blobs).
    pub fn with_inline_limit(mut self, limit: usize) -> Self {
        self.inline_limit = limit;
        self
    }

    pub fn vault(&self) -> &Vault {
        &self.vault
    }

    /// Subscribes to "record stored" events.
    pub fn subscribe(&self) -> broadcast::Receiver<RecordStored> {
        self.stored_events.subscribe()
    }

    /// Decides access; a denial is written to the journal before it is returned.
    pub async fn authorize<A: Action>(
        &self,
        principal: &Arc<Principal>,
        resource_type: &str,
    ) -> Result<Allowed<A>, RecordError> {
        self.authorize_with(principal, resource_type, &access::RequestFacts::default())
            .await
    }

    /// Decides access knowing what the surface learned from the request (see
    /// [`access::RequestFacts`]); a denial is journaled before it is returned.
    pub async fn authorize_with<A: Action>(
        &self,
        principal: &Arc<Principal>,
        resource_type: &str,
        facts: &access::RequestFacts,
    ) -> Result<Allowed<A>, RecordError> {
        match self
            .authorizer
            .decide_with::<A>(principal, resource_type, facts)
        {
            Ok(allowed) if allowed.break_glass() => {
                self.journal_break_glass(&allowed).await?;
                Ok(allowed)
            }
            Ok(allowed) => Ok(allowed),
            Err(denied) => {
                let draft = AuditDraft::by(
                    principal,
                    codes::SECURITY_ALERT,
                    A::NAME,
                    action_code::<A>(),
                )
                .on(resource_type, None)
                .decided_by(&denied.decided_by)
                .failed(Outcome::MinorFailure)
                .because("forbidden");
                self.journal(draft).await?;
                Err(RecordError::Denied(denied))
            }
        }
    }

    /// Whether `principal` may do `A` on `resource_type`, asked without journaling: for narrowing
    /// a listing (system history, `$everything`) to what the caller may see anyway. Emergency
    /// access never widens such a listing.
    pub fn permitted<A: Action>(
        &self,
        principal: &Arc<Principal>,
        resource_type: &str,
    ) -> Option<Allowed<A>> {
        self.authorizer
            .decide::<A>(principal, resource_type)
            .ok()
            .filter(|allowed| !allowed.break_glass())
    }

    /// Journals an authentication attempt (DCM 110114): a token issued, or a credential or
    /// access token refused and why (no secret or token text is ever recorded).
    pub async fn journal_authentication(
        &self,
        claimed_id: &str,
        network_address: Option<&str>,
        role: Option<Role>,
        failure_reason: Option<&str>,
    ) -> Result<(), RecordError> {
        let mut draft = AuditDraft::unauthenticated(
            claimed_id,
            network_address,
            codes::USER_AUTHENTICATION,
            "login",
            'E',
        );
        if let Some(role) = role {
            draft.agent_role = role.as_str().to_owned();
        }
        if let Some(reason) = failure_reason {
            draft = draft.failed(Outcome::MinorFailure).because(reason);
        }
        self.journal(draft).await?;
        Ok(())
    }

    /// Writes one audit leaf on its own (an access that changed no record, or a denial).
    async fn journal(&self, draft: AuditDraft) -> Result<(), RecordError> {
        self.writer
            .write(WriteUnit {
                rows: Vec::new(),
                audit: vec![draft],
            })
            .await?;
        Ok(())
    }

    /// Writes several audit leaves on their own, in one unit.
    async fn journal_many(&self, drafts: Vec<AuditDraft>) -> Result<(), RecordError> {
        self.writer
            .write(WriteUnit {
                rows: Vec::new(),
                audit: drafts,
            })
            .await?;
        Ok(())
    }

    /// Counts emergency accesses (exposed on `/metrics` for review).
    pub fn break_glass_uses(&self) -> prometheus_client::metrics::counter::Counter {
        self.break_glass_uses.clone()
    }

    /// Journals an emergency access as a security alert, its stated reason sealed (free text).
    async fn journal_break_glass<A: Action>(
        &self,
        allowed: &Allowed<A>,
    ) -> Result<(), RecordError> {
        self.break_glass_uses.inc();
        let principal = allowed.principal();
        let reason = principal.break_glass_reason.clone().unwrap_or_default();
        tracing::warn!(agent = %principal.id, resource_type = %allowed.resource_type(), "break-glass access");
        let sealed = crate::journal::sealing::seal(
            &self.vault,
            &self.vault.patient_ref(None),
            reason.as_bytes(),
        )
        .await
        .map_err(|error| RecordError::Audit(error.to_string()))?;
        let mut draft = AuditDraft::by(principal, codes::SECURITY_ALERT, "break-glass", 'E')
            .on(allowed.resource_type(), None)
            .decided_by(allowed.decided_by())
            .with_detail(sealed);
        draft.break_glass = true;
        self.journal(draft).await?;
        Ok(())
    }

    /// Decides whether `principal` may read the audit journal; a denial is journaled.
    pub async fn authorize_audit_access(
        &self,
        principal: &Arc<Principal>,
    ) -> Result<AuditJournalAccess, RecordError> {
        match self.authorizer.decide_audit_access(principal) {
            Ok(access) => Ok(access),
            Err(denied) => {
                let draft = AuditDraft::by(principal, codes::SECURITY_ALERT, "audit-query", 'R')
                    .decided_by(&denied.decided_by)
                    .failed(Outcome::MinorFailure)
                    .because("forbidden");
                self.journal(draft).await?;
                Err(RecordError::Denied(denied))
            }
        }
    }

    /// Journals a use of the audit log (DCM 110101). The query text can name a patient, so it
    /// is sealed to that patient's key (or the appliance's no-patient key).
    pub async fn journal_audit_log_used(
        &self,
        access: &AuditJournalAccess,
        subtype: &str,
        query_text: &str,
        patient_ref: Option<&str>,
    ) -> Result<(), RecordError> {
        let key_ref = patient_ref.map_or_else(|| self.vault.patient_ref(None), str::to_owned);
        let sealed = crate::journal::sealing::seal(&self.vault, &key_ref, query_text.as_bytes())
            .await
            .map_err(|error| RecordError::Audit(error.to_string()))?;
        let mut draft = AuditDraft::by(
            access.principal(),
            codes::AUDIT_LOG_USED,
            subtype,
            if subtype == "export" { 'E' } else { 'R' },
        )
        .decided_by(access.decided_by())
        .with_detail(sealed);
        draft.patient_ref = patient_ref.map(str::to_owned);
        self.journal(draft).await?;
        Ok(())
    }

    /// Creates a record with a server-assigned or client-assigned id that must be new.
    pub async fn create(
        &self,
        allowed: &Allowed<access::Create>,
        resource_id: &str,
        body: RecordBody,
    ) -> Result<RecordVersion, RecordError> {
        let key = RecordKey::new(allowed.resource_type(), resource_id);
        self.store(
            allowed,
            key,
            body,
            Precondition::MustNotExist,
            "create",
            'C',
        )
        .await
    }

    /// Writes a new version; `precondition` carries `If-Match`.
    pub async fn update(
        &self,
        allowed: &Allowed<access::Update>,
        resource_id: &str,
        body: RecordBody,
        precondition: Precondition,
    ) -> Result<RecordVersion, RecordError> {
        let key = RecordKey::new(allowed.resource_type(), resource_id);
        self.store(allowed, key, body, precondition, "update", 'U')
            .await
    }

    async fn store<A: Action>(
        &self,
        allowed: &Allowed<A>,
        key: RecordKey,
        body: RecordBody,
        precondition: Precondition,
        subtype: &str,
        action: char,
    ) -> Result<RecordVersion, RecordError> {
        let prepared = self
            .prepare_store(allowed, key, body, precondition, subtype, action)
            .await?;
        self.commit_one(prepared).await
    }

    /// Encrypts a version and makes its row, index and audit leaf, ready to commit (alone or
    /// with others, atomically, in a transaction Bundle).
    pub async fn prepare_store<A: Action>(
        &self,
        allowed: &Allowed<A>,
        key: RecordKey,
        body: RecordBody,
        precondition: Precondition,
        subtype: &str,
        action: char,
    ) -> Result<PreparedWrite, RecordError> {
        let patient_ref = self.vault.patient_ref(body.patient_id.as_deref());
        let index = search_index::index_rows(
            self.vault.blind_index(),
            &key.resource_type,
            &body.search_index,
        );
        let row = self
            .encrypted_row(
                &key,
                &patient_ref,
                body.content_type,
                &body.body,
                precondition,
                index,
            )
            .await?;
        let draft = AuditDraft::by(allowed.principal(), codes::PATIENT_RECORD, subtype, action)
            .on(&key.resource_type, Some(&key.resource_id))
            .for_patient(&patient_ref)
            .decided_by(allowed.decided_by())
            .emergency(allowed.break_glass());
        Ok(PreparedWrite { key, row, draft })
    }

    /// The row that stores `body` encrypted to the patient (in the blob store when large), with
    /// its index rows: what every write of a record body commits.
    async fn encrypted_row(
        &self,
        key: &RecordKey,
        patient_ref: &str,
        content_type: String,
        body: &[u8],
        precondition: Precondition,
        index: search_index::IndexRows,
    ) -> Result<RowWrite, RecordError> {
        let recipient = self.vault.patient_recipient(patient_ref).await?;
        let payload = self
            .encrypted_payload(&recipient, patient_ref, body)
            .await?;
        Ok(version_row(
            key,
            patient_ref,
            content_type,
            payload,
            precondition,
            index,
        ))
    }

    /// A body encrypted to the patient and placed: inline, or in the blob store when large.
    async fn encrypted_payload(
        &self,
        recipient: &crate::vault::PatientRecipient,
        patient_ref: &str,
        body: &[u8],
    ) -> Result<PlacedPayload, RecordError> {
        let ciphertext = recipient.encrypt(body)?;
        let (inline_body, blob_key) = self.place_ciphertext(patient_ref, ciphertext).await?;
        Ok(PlacedPayload {
            inline_body,
            blob_key,
        })
    }

    /// A deletion (tombstone version), ready to commit.
    pub async fn prepare_delete(
        &self,
        allowed: &Allowed<access::Delete>,
        resource_id: &str,
        precondition: Precondition,
    ) -> Result<PreparedWrite, RecordError> {
        let key = RecordKey::new(allowed.resource_type(), resource_id);
        let head = self.head(&key).await?.ok_or(RecordError::NotFound)?;
        let row = RowWrite {
            resource_type: key.resource_type.clone(),
            resource_id: key.resource_id.clone(),
            patient_ref: head.patient_ref.clone(),
            content_type: String::new(),
            deleted: true,
            inline_body: None,
            blob_key: None,
            precondition,
            index: search_index::IndexRows::default(),
            dicom: None,
        };
        let draft = AuditDraft::by(allowed.principal(), codes::PATIENT_RECORD, "delete", 'D')
            .on(&key.resource_type, Some(&key.resource_id))
            .for_patient(&head.patient_ref)
            .decided_by(allowed.decided_by())
            .emergency(allowed.break_glass());
        Ok(PreparedWrite { key, row, draft })
    }

    /// Commits one prepared write.
    async fn commit_one(&self, prepared: PreparedWrite) -> Result<RecordVersion, RecordError> {
        let mut written = self.commit(vec![prepared]).await?;
        written.pop().ok_or(RecordError::Unavailable)
    }

    /// Commits prepared writes atomically (all or none) with their audit leaves, then announces
    /// each stored version. Versions come back in the order given.
    pub async fn commit(
        &self,
        prepared: Vec<PreparedWrite>,
    ) -> Result<Vec<RecordVersion>, RecordError> {
        let mut announced = Vec::with_capacity(prepared.len());
        let mut unit = WriteUnit::default();
        for write in prepared {
            let study_key = write
                .row
                .dicom
                .as_ref()
                .map(|dicom| dicom.study_key.clone());
            announced.push((
                write.key,
                write.row.deleted,
                write.row.patient_ref.clone(),
                study_key,
            ));
            unit.rows.push(write.row);
            unit.audit.push(write.draft);
        }
        let receipt = self.writer.write(unit).await?;
        if receipt.rows.len() != announced.len() {
            return Err(RecordError::Unavailable);
        }
        let mut versions = Vec::with_capacity(announced.len());
        for ((key, deleted, patient_ref, study_key), written) in
            announced.into_iter().zip(receipt.rows)
        {
            let meta = RecordVersion {
                key,
                version: written.version,
                last_updated: written.last_updated,
                deleted,
            };
            if !deleted {
                let _ = self.stored_events.send(RecordStored {
                    meta: meta.clone(),
                    patient_ref,
                    study_key,
                });
            }
            versions.push(meta);
        }
        Ok(versions)
    }

    /// Encrypted bodies above the inline limit go to the blob store first, durably, so the row
    /// that points at them is only committed once they exist.
    async fn place_ciphertext(
        &self,
        patient_ref: &str,
        ciphertext: Vec<u8>,
    ) -> Result<(Option<Vec<u8>>, Option<String>), RecordError> {
        if ciphertext.len() <= self.inline_limit {
            return Ok((Some(ciphertext), None));
        }
        let shard: String = patient_ref.chars().take(2).collect();
        let key = format!("records/{shard}/{}", uuid::Uuid::now_v7());
        self.blobs.put_new(&key, Bytes::from(ciphertext)).await?;
        Ok((None, Some(key)))
    }

    /// Marks a record deleted (a tombstone version); earlier versions stay for history.
    pub async fn delete(
        &self,
        allowed: &Allowed<access::Delete>,
        resource_id: &str,
        precondition: Precondition,
    ) -> Result<RecordVersion, RecordError> {
        let prepared = self
            .prepare_delete(allowed, resource_id, precondition)
            .await?;
        self.commit_one(prepared).await
    }

    /// Reads the current version (in a de-identified view, `resource_id` is a pseudonym).
    pub async fn read(
        &self,
        allowed: &Allowed<access::Read>,
        resource_id: &str,
    ) -> Result<Record, RecordError> {
        let resource_id = self
            .id_in_view(allowed.view(), allowed.resource_type(), resource_id)
            .await?;
        let key = RecordKey::new(allowed.resource_type(), &resource_id);
        let head = self.head(&key).await?.ok_or(RecordError::NotFound)?;
        let record = self
            .read_version_audited(allowed, &key, head.version, "read")
            .await?;
        self.egress(allowed.view(), record)
    }

    /// Reads one version (`vread`).
    pub async fn read_version(
        &self,
        allowed: &Allowed<access::Read>,
        resource_id: &str,
        version: i64,
    ) -> Result<Record, RecordError> {
        let resource_id = self
            .id_in_view(allowed.view(), allowed.resource_type(), resource_id)
            .await?;
        let key = RecordKey::new(allowed.resource_type(), &resource_id);
        let record = self
            .read_version_audited(allowed, &key, version, "vread")
            .await?;
        self.egress(allowed.view(), record)
    }

    async fn read_version_audited(
        &self,
        allowed: &Allowed<access::Read>,
        key: &RecordKey,
        version: i64,
        subtype: &str,
    ) -> Result<Record, RecordError> {
        let stored = self.fetch_version(key, version).await?;
        let mut draft = AuditDraft::by(allowed.principal(), codes::PATIENT_RECORD, subtype, 'R')
            .on(&key.resource_type, Some(&key.resource_id))
            .for_patient(&stored.patient_ref)
            .decided_by(allowed.decided_by())
            .emergency(allowed.break_glass());
        draft.resource_version = Some(version);
        let record = self.decrypt_stored(stored).await;
        if record.is_err() {
            draft = draft.failed(Outcome::SeriousFailure);
        }
        self.journal(draft).await?;
        record
    }

    /// Every version of a record, newest first, decrypted (`_history`).
    pub async fn history(
        &self,
        allowed: &Allowed<access::Read>,
        resource_id: &str,
    ) -> Result<Vec<Record>, RecordError> {
        if allowed.view().is_deidentified() {
            return Err(history_not_in_view());
        }
        let key = RecordKey::new(allowed.resource_type(), resource_id);
        let rows = sqlx::query(
            "SELECT version FROM records WHERE resource_type = $1 AND resource_id = $2 ORDER BY version DESC",
        )
        .bind(&key.resource_type)
        .bind(&key.resource_id)
        .fetch_all(self.database.pool())
        .await?;
        if rows.is_empty() {
            return Err(RecordError::NotFound);
        }
        let mut records = Vec::with_capacity(rows.len());
        let mut patient_ref = None;
        let mut keyring = self.vault.keyring();
        for row in rows {
            let stored = self.fetch_any_version(&key, row.try_get(0)?).await?;
            patient_ref.get_or_insert_with(|| stored.patient_ref.clone());
            records.push(self.decrypt_stored_with(&mut keyring, stored).await?);
        }
        let mut draft = AuditDraft::by(
            allowed.principal(),
            codes::PATIENT_RECORD,
            "history-instance",
            'R',
        )
        .on(&key.resource_type, Some(&key.resource_id))
        .decided_by(allowed.decided_by())
        .emergency(allowed.break_glass());
        draft.patient_ref = patient_ref;
        self.journal(draft).await?;
        Ok(records)
    }

    async fn head(&self, key: &RecordKey) -> Result<Option<Head>, RecordError> {
        let row = sqlx::query(
            "SELECT version, deleted, patient_ref, last_updated FROM record_heads WHERE resource_type = $1 AND resource_id = $2",
        )
        .bind(&key.resource_type)
        .bind(&key.resource_id)
        .fetch_optional(self.database.pool())
        .await?;
        let Some(row) = row else { return Ok(None) };
        let head = Head {
            version: row.try_get(0)?,
            deleted: row.try_get::<i64, _>(1)? != 0,
            patient_ref: row.try_get(2)?,
            last_updated: row.try_get(3)?,
        };
        if head.deleted {
            return Err(RecordError::Deleted {
                version: head.version,
                last_updated: head.last_updated,
            });
        }
        Ok(Some(head))
    }

    async fn fetch_version(
        &self,
        key: &RecordKey,
        version: i64,
    ) -> Result<StoredVersion, RecordError> {
        let stored = self.fetch_any_version(key, version).await?;
        if stored.meta.deleted {
            return Err(RecordError::Deleted {
                version,
                last_updated: stored.meta.last_updated,
            });
        }
        Ok(stored)
    }

    async fn fetch_any_version(
        &self,
        key: &RecordKey,
        version: i64,
    ) -> Result<StoredVersion, RecordError> {
        let row = sqlx::query(
            "SELECT patient_ref, last_updated, deleted, content_type, body, blob_key FROM records \
             WHERE resource_type = $1 AND resource_id = $2 AND version = $3",
        )
        .bind(&key.resource_type)
        .bind(&key.resource_id)
        .bind(version)
        .fetch_optional(self.database.pool())
        .await?
        .ok_or(RecordError::NotFound)?;
        Ok(StoredVersion {
            meta: RecordVersion {
                key: key.clone(),
                version,
                last_updated: row.try_get(1)?,
                deleted: row.try_get::<i64, _>(2)? != 0,
            },
            patient_ref: row.try_get(0)?,
            content_type: row.try_get(3)?,
            inline_body: row.try_get(4)?,
            blob_key: row.try_get(5)?,
        })
    }

    /// The current version of a record, in one query (its head joined to its row); a deleted
    /// record is [`RecordError::Deleted`].
    async fn fetch_current(&self, key: &RecordKey) -> Result<StoredVersion, RecordError> {
        let row = sqlx::query(
            "SELECT r.version, r.patient_ref, r.last_updated, h.deleted, r.content_type, r.body, r.blob_key \
             FROM record_heads h JOIN records r ON r.resource_type = h.resource_type AND r.resource_id = h.resource_id AND r.version = h.version \
             WHERE h.resource_type = $1 AND h.resource_id = $2",
        )
        .bind(&key.resource_type)
        .bind(&key.resource_id)
        .fetch_optional(self.database.pool())
        .await?
        .ok_or(RecordError::NotFound)?;
        let version: i64 = row.try_get(0)?;
        let last_updated: i64 = row.try_get(2)?;
        if row.try_get::<i64, _>(3)? != 0 {
            return Err(RecordError::Deleted {
                version,
                last_updated,
            });
        }
        Ok(StoredVersion {
            meta: RecordVersion {
                key: key.clone(),
                version,
                last_updated,
                deleted: false,
            },
            patient_ref: row.try_get(1)?,
            content_type: row.try_get(4)?,
            inline_body: row.try_get(5)?,
            blob_key: row.try_get(6)?,
        })
    }

    /// The encrypted body of a stored version: inline in its row, or in the blob store.
    async fn ciphertext_of(&self, stored: &StoredVersion) -> Result<Bytes, RecordError> {
        match (&stored.inline_body, &stored.blob_key) {
            (Some(inline), _) => Ok(Bytes::from(inline.clone())),
            (None, Some(blob_key)) => Ok(self.blobs.get(blob_key).await?),
            (None, None) => Err(RecordError::Damaged),
        }
    }

    async fn decrypt_stored(&self, stored: StoredVersion) -> Result<Record, RecordError> {
        self.decrypt_stored_with(&mut self.vault.keyring(), stored)
            .await
    }

    /// Decrypts a stored version with the keyring of a read that decrypts many.
    async fn decrypt_stored_with(
        &self,
        keyring: &mut PatientKeyring<'_>,
        stored: StoredVersion,
    ) -> Result<Record, RecordError> {
        if stored.meta.deleted {
            return Ok(Record {
                meta: stored.meta,
                content_type: stored.content_type,
                body: Bytes::new(),
                view: View::Identified,
            });
        }
        let ciphertext = self.ciphertext_of(&stored).await?;
        let plaintext = keyring.decrypt(&stored.patient_ref, &ciphertext).await?;
        Ok(Record {
            meta: stored.meta,
            content_type: stored.content_type,
            body: Bytes::from(plaintext),
            view: View::Identified,
        })
    }

    /// Crypto-shreds one patient: destroys their key (their records become unreadable and say so)
    /// and journals it. Only administrators may.
    pub async fn shred_patient(
        &self,
        principal: &Arc<Principal>,
        patient_id: &str,
    ) -> Result<bool, RecordError> {
        let patient_ref = self.vault.patient_ref(Some(patient_id));
        let draft = AuditDraft::by(principal, codes::SECURITY_ALERT, "patient-shred", 'D')
            .on("Patient", None)
            .for_patient(&patient_ref);
        if principal.role != Role::Admin {
            let denied = draft.failed(Outcome::MinorFailure);
            self.journal(denied).await?;
            return Err(RecordError::Denied(Denied {
                reason: "only administrators may shred a patient".to_owned(),
                decided_by: vec!["admin-only-key-operations".to_owned()],
            }));
        }
        let destroyed = self.vault.shred_patient(&patient_ref).await?;
        self.journal(draft).await?;
        Ok(destroyed)
    }

    /// Exports one patient's age identity for the `age` CLI (audited; administrators only).
    pub async fn export_patient_identity(
        &self,
        principal: &Arc<Principal>,
        patient_id: &str,
    ) -> Result<secrecy::SecretString, RecordError> {
        if principal.role != Role::Admin {
            return Err(RecordError::Denied(Denied {
                reason: "only administrators may export a patient key".to_owned(),
                decided_by: vec!["admin-only-key-operations".to_owned()],
            }));
        }
        let patient_ref = self.vault.patient_ref(Some(patient_id));
        let draft = AuditDraft::by(principal, codes::EXPORT, "patient-key-export", 'E')
            .on("Patient", None)
            .for_patient(&patient_ref);
        self.journal(draft).await?;
        Ok(self.vault.export_patient_identity(&patient_ref).await?)
    }

    /// Where a version's ciphertext lives (blob key), for operators and tests.
    pub async fn blob_key_of(
        &self,
        key: &RecordKey,
        version: i64,
    ) -> Result<Option<String>, RecordError> {
        Ok(self.fetch_any_version(key, version).await?.blob_key)
    }
}

/// Histories carry every version's time to the second: not part of a de-identified view.
fn history_not_in_view() -> RecordError {
    RecordError::NotInView("history is not part of the de-identified view".to_owned())
}

fn action_code<A: Action>() -> char {
    match A::SCOPE_LETTER {
        'c' => 'C',
        'u' => 'U',
        'd' => 'D',
        _ => 'R',
    }
}

struct Head {
    version: i64,
    deleted: bool,
    patient_ref: String,
    last_updated: i64,
}

struct StoredVersion {
    meta: RecordVersion,
    patient_ref: String,
    content_type: String,
    inline_body: Option<Vec<u8>>,
    blob_key: Option<String>,
}
