//! Tamper-evident audit journal for Glastonbury: an RFC 9162 Merkle log with compact-range
//! appends, inclusion / consistency / range proofs, C2SP signed checkpoints, a canonical
//! (RFC 8785) audit leaf with sealed PHI details, a self-verifying export format and fsck.
//!
//! Pure algorithms: storage comes in through [`NodeSource`], and every proof can be planned
//! first ([`ProofPlan::nodes`]) so async callers fetch the O(log n) nodes in one query.
//!
//! Persisting: keep every [`StoredNode`] that [`CompactRange::append`] or
//! [`CompactRange::append_batch`] reports (level 0 is the leaf hash), keyed by
//! `(level, index)`, in the same transaction as the leaves. Restore the appender with
//! [`CompactRange::nodes_needed`] + [`CompactRange::from_hashes`].

mod canonical;
mod checkpoint;
mod compact;
mod error;
mod event;
mod export;
mod fsck;
mod hash;
mod nodes;
mod note;
mod proof;

pub use canonical::{CanonicalError, canonical_json, parse_canonical};
pub use checkpoint::{Checkpoint, CheckpointError};
pub use compact::{BatchAppend, CompactRange, NodeId, StoredNode};
pub use error::MerkleError;
pub use event::{
    AUDIT_EVENT_SCHEMA, AuditAction, AuditAgent, AuditEntity, AuditEvent, AuditOutcome, Coding,
    DETAIL_COMMITMENT_TAG, DetailCommitment, DetailError, DetailNonce, EventError, SealedDetail,
    codes,
};
pub use export::{
    EXPORT_FORMAT, Export, ExportBuildError, ExportEntry, ExportEntryInput, ExportRange,
    ExportRequest, OpenedDetail, PreviousLink, RANGE_CHUNK, VerifyError, VerifySummary,
    build_export, export_nodes_needed, verify_export,
};
pub use fsck::{Fsck, FsckError, FsckReport, fsck};
pub use hash::{Hash, empty_root, leaf_hash, node_hash};
pub use nodes::{MemoryNodeStore, NodeSource};
pub use note::{NoteError, NoteSigner, NoteVerifier, VerifiedNote, open_note, sign_note};
pub use proof::{
    ProofPlan, consistency_plan, consistency_proof, inclusion_plan, inclusion_proof, range_plan,
    range_proof, root_at, root_from_inclusion, root_from_range, root_plan, verify_consistency,
    verify_inclusion, verify_range,
};
