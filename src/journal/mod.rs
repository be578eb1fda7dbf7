//! The audit journal as the appliance uses it: turning what happened into a canonical leaf,
//! appending leaves and Merkle nodes inside the same database transaction as the effect they
//! record, signing checkpoints, and reading the log back for queries, exports and fsck.
//!
//! The algorithms (tree, proofs, notes, export format) live in the `glastonbury-audit` crate;
//! this module is its persistence.

pub mod append;
pub mod checkpoints;
pub mod disclosures;
pub mod draft;
pub mod export;
pub mod fsck;
pub mod query;
pub mod sealing;
pub mod store;

pub use append::{
    Finish, LOCK_HEAD, PendingLeaf, append_leaves, lock_head, sqlite_append_statements_after,
};
pub use checkpoints::{CheckpointService, SigningKeys};
pub use draft::{AuditDraft, JournalIdentity, Outcome};

/// The event codes the appliance emits (DICOM DCM, FHIR restful-interaction).
pub mod codes {
    pub use glastonbury_audit::codes::{
        AUDIT_LOG_USED, Code, EXPORT, INSTANCES_TRANSFERRED, PATIENT_RECORD, QUERY, SECURITY_ALERT,
        USER_AUTHENTICATION,
    };
}

/// Why the journal could not be written or read. No PHI.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error("audit tree: {0}")]
    Merkle(#[from] glastonbury_audit::MerkleError),
    #[error("audit leaf: {0}")]
    Event(#[from] glastonbury_audit::EventError),
    #[error("audit checkpoint: {0}")]
    Checkpoint(#[from] glastonbury_audit::CheckpointError),
    #[error("audit signing key: {0}")]
    Note(#[from] glastonbury_audit::NoteError),
    #[error(transparent)]
    Vault(#[from] crate::vault::VaultError),
    #[error("stored audit state is damaged: {0}")]
    Damaged(String),
    #[error(
        "the stored audit tree of size {size} is not consistent with the signed checkpoint of size {checkpoint_size}: history was rewritten"
    )]
    Inconsistent { checkpoint_size: u64, size: u64 },
}

impl From<sqlx::Error> for JournalError {
    fn from(error: sqlx::Error) -> Self {
        Self::Storage(crate::storage::StorageError::from(error))
    }
}
