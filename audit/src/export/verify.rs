//! The offline export verifier: signatures, manifest, selection, leaves, opened details,
//! range and inclusion proofs, and consistency with the previous export.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::manifest::Manifest;
use super::{EXPORT_FORMAT, Export, ExportEntry, ExportRange};
use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::error::MerkleError;
use crate::event::{AuditEvent, DetailCommitment, DetailNonce, EventError};
use crate::hash::{Hash, empty_root, leaf_hash};
use crate::note::{NoteError, NoteVerifier, open_note};
use crate::proof::{root_from_range, verify_consistency, verify_inclusion};

/// What a successful verification established.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifySummary {
    /// Log origin.
    pub origin: String,
    /// Checkpoint tree size.
    pub tree_size: u64,
    /// Checkpoint root.
    pub root: Hash,
    /// Trusted keys whose checkpoint signatures verified.
    pub verified_by: Vec<String>,
    /// The query description from the signed manifest.
    pub query: String,
    /// Number of entries verified.
    pub entries: u64,
    /// Range proofs checked.
    pub range_proofs: usize,
    /// Inclusion proofs checked.
    pub inclusion_proofs: usize,
    /// Opened details checked against their commitments.
    pub details_checked: usize,
    /// Size of the previous checkpoint this export was proven consistent with.
    pub previous_size: Option<u64>,
}

/// The first reason an export failed verification; entry-level variants name the leaf index.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// Not an export this verifier understands.
    #[error("unsupported export format {0:?}")]
    Format(String),
    /// The checkpoint is unsigned, badly signed or malformed.
    #[error("checkpoint: {0}")]
    Checkpoint(CheckpointError),
    /// The manifest is unsigned, badly signed or malformed.
    #[error("manifest: {0}")]
    Manifest(String),
    /// The manifest names another tree than the checkpoint.
    #[error("manifest does not match the checkpoint ({0} differs)")]
    ManifestMismatch(&'static str),
    /// Entries are not strictly increasing.
    #[error("entry {index}: out of order (follows entry {previous})")]
    OutOfOrder {
        /// The misplaced entry.
        index: u64,
        /// The entry before it.
        previous: u64,
    },
    /// An entry index is outside the checkpoint's tree.
    #[error("entry {index}: not below the checkpoint tree size {size}")]
    IndexOutOfRange {
        /// The entry.
        index: u64,
        /// The tree size.
        size: u64,
    },
    /// The signed manifest lists an entry the export lacks.
    #[error("entry {index}: missing (listed in the signed manifest)")]
    MissingEntry {
        /// The missing entry.
        index: u64,
    },
    /// The export holds an entry the signed manifest does not list.
    #[error("entry {index}: not listed in the signed manifest")]
    UnexpectedEntry {
        /// The extra entry.
        index: u64,
    },
    /// The leaf is not base64.
    #[error("entry {index}: leaf is not valid base64")]
    LeafEncoding {
        /// The entry.
        index: u64,
    },
    /// The leaf could not be read to check its opened detail.
    #[error("entry {index}: {reason}")]
    Leaf {
        /// The entry.
        index: u64,
        /// Why.
        reason: String,
    },
    /// An opened detail is malformed or its leaf has no sealed detail.
    #[error("entry {index}: opened detail is malformed or the leaf has no sealed detail")]
    DetailMalformed {
        /// The entry.
        index: u64,
    },
    /// An opened detail does not match the leaf's commitment.
    #[error("entry {index}: opened detail does not match the leaf's commitment")]
    DetailMismatch {
        /// The entry.
        index: u64,
    },
    /// No range or inclusion proof covers the entry.
    #[error("entry {index}: no proof covers this entry")]
    MissingProof {
        /// The entry.
        index: u64,
    },
    /// Both a range proof and an inclusion proof cover the entry.
    #[error("entry {index}: covered by both a range proof and an inclusion proof")]
    DuplicateProof {
        /// The entry.
        index: u64,
    },
    /// The entry's inclusion proof does not lead to the checkpoint root.
    #[error("entry {index}: inclusion proof failed: {source}")]
    Inclusion {
        /// The entry.
        index: u64,
        /// Why.
        source: MerkleError,
    },
    /// A range proof does not lead to the checkpoint root: one of its leaves was changed.
    #[error("entry {begin}: range proof for entries {begin}..{end} failed: {source}")]
    Range {
        /// First entry of the range.
        begin: u64,
        /// One past the last entry.
        end: u64,
        /// Why.
        source: MerkleError,
    },
    /// A range is empty, unsorted, overlapping or covers leaves that are not exported.
    #[error("entry {begin}: range {begin}..{end} is malformed, overlapping or not fully exported")]
    BadRange {
        /// First leaf of the range.
        begin: u64,
        /// One past the last leaf.
        end: u64,
    },
    /// The previous checkpoint is unsigned, badly signed or malformed.
    #[error("previous checkpoint: {0}")]
    PreviousCheckpoint(CheckpointError),
    /// The previous checkpoint belongs to another log.
    #[error("previous checkpoint is for another origin {0:?}")]
    PreviousOrigin(String),
    /// The tree is smaller than at the previous export.
    #[error("tree size went backwards from {previous} to {current}")]
    SizeWentBackwards {
        /// Previous size.
        previous: u64,
        /// Current size.
        current: u64,
    },
    /// The consistency proof from the previous checkpoint failed (history was rewritten).
    #[error("not consistent with the previous checkpoint: {0}")]
    Inconsistent(MerkleError),
    /// The previous export given does not match the checkpoint this export chains from.
    #[error("the given previous export is not the one this export chains from")]
    PreviousMismatch,
    /// A previous export was given but this export carries no consistency proof.
    #[error("export carries no consistency proof from the previous export")]
    MissingConsistency,
}

impl VerifyError {
    /// The leaf index the error is about, when it is about one entry (or the first entry of
    /// a range).
    pub fn entry_index(&self) -> Option<u64> {
        match self {
            Self::OutOfOrder { index, .. }
            | Self::IndexOutOfRange { index, .. }
            | Self::MissingEntry { index }
            | Self::UnexpectedEntry { index }
            | Self::LeafEncoding { index }
            | Self::Leaf { index, .. }
            | Self::DetailMalformed { index }
            | Self::DetailMismatch { index }
            | Self::MissingProof { index }
            | Self::DuplicateProof { index }
            | Self::Inclusion { index, .. } => Some(*index),
            Self::Range { begin, .. } | Self::BadRange { begin, .. } => Some(*begin),
            _ => None,
        }
    }
}

/// Verifies an export offline against trusted checkpoint keys. With `previous`, the export
/// must also chain from that export's checkpoint by a valid consistency proof (only the
/// previous export's checkpoint is used; verify it separately).
pub fn verify_export(
    export: &Export,
    trusted_keys: &[NoteVerifier],
    previous: Option<&Export>,
) -> Result<VerifySummary, VerifyError> {
    if export.format != EXPORT_FORMAT {
        return Err(VerifyError::Format(export.format.clone()));
    }
    let opened = open_note(&export.checkpoint, trusted_keys)
        .map_err(|err| VerifyError::Checkpoint(CheckpointError::Note(err)))?;
    let checkpoint = Checkpoint::parse_body(&opened.body).map_err(VerifyError::Checkpoint)?;
    let manifest = open_manifest(&export.manifest, trusted_keys)?;
    check_manifest(&manifest, &checkpoint)?;
    check_order(&export.entries, checkpoint.size)?;
    check_selection(&export.entries, &manifest.runs)?;
    check_leaf_hashes(&export.entries, &manifest.leaf_hashes)?;
    let counts = verify_entries(export, &checkpoint)?;
    let previous_size = verify_previous(export, &checkpoint, trusted_keys, previous)?;
    Ok(VerifySummary {
        origin: checkpoint.origin,
        tree_size: checkpoint.size,
        root: checkpoint.root,
        verified_by: opened.verified_by,
        query: manifest.query,
        entries: export.entries.len() as u64,
        range_proofs: counts.ranges,
        inclusion_proofs: counts.inclusions,
        details_checked: counts.details,
        previous_size,
    })
}

fn open_manifest(note: &str, trusted: &[NoteVerifier]) -> Result<Manifest, VerifyError> {
    let opened = open_note(note, trusted)
        .map_err(|err: NoteError| VerifyError::Manifest(err.to_string()))?;
    Manifest::parse(&opened.body).map_err(|reason| VerifyError::Manifest(reason.to_owned()))
}

fn check_manifest(manifest: &Manifest, checkpoint: &Checkpoint) -> Result<(), VerifyError> {
    if manifest.origin != checkpoint.origin {
        return Err(VerifyError::ManifestMismatch("origin"));
    }
    if manifest.size != checkpoint.size {
        return Err(VerifyError::ManifestMismatch("tree size"));
    }
    if manifest.root != checkpoint.root {
        return Err(VerifyError::ManifestMismatch("root"));
    }
    Ok(())
}

fn check_order(entries: &[ExportEntry], size: u64) -> Result<(), VerifyError> {
    let mut previous: Option<u64> = None;
    for entry in entries {
        if let Some(prev) = previous.filter(|prev| *prev >= entry.index) {
            return Err(VerifyError::OutOfOrder {
                index: entry.index,
                previous: prev,
            });
        }
        if entry.index >= size {
            return Err(VerifyError::IndexOutOfRange {
                index: entry.index,
                size,
            });
        }
        previous = Some(entry.index);
    }
    Ok(())
}

/// Walks the signed selection and the (sorted) entries together.
fn check_selection(entries: &[ExportEntry], runs: &[(u64, u64)]) -> Result<(), VerifyError> {
    let mut runs = runs.iter().copied();
    let mut current = runs.next();
    let mut expected = current.map(|(first, _)| first);
    for entry in entries {
        let Some(want) = expected else {
            return Err(VerifyError::UnexpectedEntry { index: entry.index });
        };
        if entry.index < want {
            return Err(VerifyError::UnexpectedEntry { index: entry.index });
        }
        if entry.index > want {
            return Err(VerifyError::MissingEntry { index: want });
        }
        match current {
            Some((_, last)) if want < last => expected = Some(want + 1),
            _ => {
                current = runs.next();
                expected = current.map(|(first, _)| first);
            }
        }
    }
    match expected {
        Some(index) => Err(VerifyError::MissingEntry { index }),
        None => Ok(()),
    }
}

#[derive(Default)]
struct Counts {
    ranges: usize,
    inclusions: usize,
    details: usize,
}

/// One pass over the entries: each is proven by the range starting at it or by its own
/// inclusion proof.
fn verify_entries(export: &Export, checkpoint: &Checkpoint) -> Result<Counts, VerifyError> {
    let mut counts = Counts::default();
    let mut ranges = export.ranges.iter().peekable();
    let mut covered_until = 0u64;
    let mut position = 0usize;
    let mut buffer = Vec::new();
    while let Some(entry) = export.entries.get(position) {
        match ranges.next_if(|range| range.begin <= entry.index) {
            Some(range) => {
                if range.begin < covered_until || range.begin != entry.index {
                    return Err(VerifyError::BadRange {
                        begin: range.begin,
                        end: range.end,
                    });
                }
                let count = verify_range_entries(export, position, range, checkpoint, &mut counts)?;
                position += count;
                covered_until = range.end;
            }
            None => {
                verify_single(entry, checkpoint, &mut buffer, &mut counts)?;
                position += 1;
                covered_until = entry.index.saturating_add(1);
            }
        }
    }
    match ranges.next() {
        Some(range) => Err(VerifyError::BadRange {
            begin: range.begin,
            end: range.end,
        }),
        None => Ok(counts),
    }
}

fn verify_single(
    entry: &ExportEntry,
    checkpoint: &Checkpoint,
    buffer: &mut Vec<u8>,
    counts: &mut Counts,
) -> Result<(), VerifyError> {
    let index = entry.index;
    let proof = entry
        .inclusion
        .as_ref()
        .ok_or(VerifyError::MissingProof { index })?;
    let hash = entry_leaf_hash(entry, buffer, counts)?;
    verify_inclusion(&hash, index, checkpoint.size, proof, &checkpoint.root)
        .map_err(|source| VerifyError::Inclusion { index, source })?;
    counts.inclusions += 1;
    Ok(())
}

/// Verifies the range starting at entry `position`; returns how many entries it covered.
fn verify_range_entries(
    export: &Export,
    position: usize,
    range: &ExportRange,
    checkpoint: &Checkpoint,
    counts: &mut Counts,
) -> Result<usize, VerifyError> {
    let bad_range = || VerifyError::BadRange {
        begin: range.begin,
        end: range.end,
    };
    if range.end <= range.begin || range.end > checkpoint.size {
        return Err(bad_range());
    }
    let count = usize::try_from(range.end - range.begin).map_err(|_| bad_range())?;
    let slice = position
        .checked_add(count)
        .and_then(|stop| export.entries.get(position..stop))
        .ok_or_else(bad_range)?;
    let mut hashes = Vec::with_capacity(count);
    let mut buffer = Vec::new();
    for (offset, entry) in slice.iter().enumerate() {
        if entry.index != range.begin + offset as u64 {
            return Err(bad_range());
        }
        if entry.inclusion.is_some() {
            return Err(VerifyError::DuplicateProof { index: entry.index });
        }
        hashes.push(entry_leaf_hash(entry, &mut buffer, counts)?);
    }
    let root =
        root_from_range(range.begin, &hashes, checkpoint.size, &range.proof).map_err(|source| {
            VerifyError::Range {
                begin: range.begin,
                end: range.end,
                source,
            }
        })?;
    if root != checkpoint.root {
        let source = MerkleError::RootMismatch;
        return Err(VerifyError::Range {
            begin: range.begin,
            end: range.end,
            source,
        });
    }
    counts.ranges += 1;
    Ok(count)
}

/// Decodes the leaf, checks its opened detail if any, and returns its leaf hash.
/// Every entry's leaf must hash to what the signed manifest lists for its position.
fn check_leaf_hashes(entries: &[ExportEntry], listed: &[Hash]) -> Result<(), VerifyError> {
    let mut buffer = Vec::new();
    for (position, entry) in entries.iter().enumerate() {
        let index = entry.index;
        buffer.clear();
        BASE64
            .decode_vec(entry.leaf.as_bytes(), &mut buffer)
            .map_err(|_| VerifyError::LeafEncoding { index })?;
        if listed.get(position) != Some(&leaf_hash(&buffer)) {
            return Err(VerifyError::Leaf {
                index,
                reason: "leaf differs from the hash the signed manifest lists for it (the entry was changed)".to_owned(),
            });
        }
    }
    if listed.len() != entries.len() {
        return Err(VerifyError::ManifestMismatch("number of leaf hashes"));
    }
    Ok(())
}

fn entry_leaf_hash(
    entry: &ExportEntry,
    buffer: &mut Vec<u8>,
    counts: &mut Counts,
) -> Result<Hash, VerifyError> {
    let index = entry.index;
    buffer.clear();
    BASE64
        .decode_vec(entry.leaf.as_bytes(), buffer)
        .map_err(|_| VerifyError::LeafEncoding { index })?;
    if entry.detail.is_some() {
        check_detail(entry, buffer)?;
        counts.details += 1;
    }
    Ok(leaf_hash(buffer))
}

fn check_detail(entry: &ExportEntry, leaf: &[u8]) -> Result<(), VerifyError> {
    let index = entry.index;
    let malformed = || VerifyError::DetailMalformed { index };
    let detail = entry.detail.as_ref().ok_or_else(malformed)?;
    let event = AuditEvent::from_leaf_bytes(leaf).map_err(|err: EventError| VerifyError::Leaf {
        index,
        reason: err.to_string(),
    })?;
    let sealed = event.sealed_detail.ok_or_else(malformed)?;
    let commitment = DetailCommitment::from_base64(&sealed.commitment).map_err(|_| malformed())?;
    let nonce = BASE64.decode(&detail.nonce).map_err(|_| malformed())?;
    let nonce = DetailNonce::from_bytes(nonce.try_into().map_err(|_| malformed())?);
    let plaintext = BASE64.decode(&detail.plaintext).map_err(|_| malformed())?;
    commitment
        .check(&nonce, &plaintext)
        .map_err(|_| VerifyError::DetailMismatch { index })
}

fn verify_previous(
    export: &Export,
    checkpoint: &Checkpoint,
    trusted: &[NoteVerifier],
    previous: Option<&Export>,
) -> Result<Option<u64>, VerifyError> {
    let given = previous
        .map(|prev| Checkpoint::open(&prev.checkpoint, trusted))
        .transpose()
        .map_err(VerifyError::PreviousCheckpoint)?;
    if let Some(given) = &given {
        check_not_backwards(given.size, checkpoint.size)?;
    }
    let Some(link) = &export.previous else {
        return match given {
            Some(given) if &given == checkpoint => Ok(Some(given.size)),
            Some(_) => Err(VerifyError::MissingConsistency),
            None => Ok(None),
        };
    };
    let old =
        Checkpoint::open(&link.checkpoint, trusted).map_err(VerifyError::PreviousCheckpoint)?;
    if old.origin != checkpoint.origin {
        return Err(VerifyError::PreviousOrigin(old.origin));
    }
    check_not_backwards(old.size, checkpoint.size)?;
    if given.is_some_and(|given| given != old) {
        return Err(VerifyError::PreviousMismatch);
    }
    if old.size == 0 {
        if !link.consistency.is_empty() {
            return Err(VerifyError::Inconsistent(MerkleError::UnexpectedProof));
        }
        if old.root != empty_root() {
            return Err(VerifyError::Inconsistent(MerkleError::FirstRootMismatch));
        }
        return Ok(Some(0));
    }
    verify_consistency(
        old.size,
        checkpoint.size,
        &old.root,
        &checkpoint.root,
        &link.consistency,
    )
    .map_err(VerifyError::Inconsistent)?;
    Ok(Some(old.size))
}

fn check_not_backwards(previous: u64, current: u64) -> Result<(), VerifyError> {
    if previous > current {
        return Err(VerifyError::SizeWentBackwards { previous, current });
    }
    Ok(())
}
