//! Building an export from stored nodes, the selected leaves and the log's signing key.

use std::collections::BTreeSet;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::manifest::{Manifest, runs_of};
use super::{
    EXPORT_FORMAT, Export, ExportEntry, ExportRange, OpenedDetail, PreviousLink, RANGE_CHUNK,
};
use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::compact::NodeId;
use crate::error::MerkleError;
use crate::event::DetailNonce;
use crate::hash::empty_root;
use crate::nodes::NodeSource;
use crate::note::{NoteError, NoteSigner, sign_note, unverified_body};
use crate::proof::{
    ProofPlan, consistency_plan, inclusion_plan, range_plan, root_plan, verify_consistency,
};

/// One selected leaf, as read from storage.
#[derive(Debug)]
pub struct ExportEntryInput {
    /// Leaf index.
    pub index: u64,
    /// Canonical leaf bytes.
    pub leaf: Vec<u8>,
    /// The sealed detail's nonce and plaintext, when the officer is to see it.
    pub detail: Option<(DetailNonce, Vec<u8>)>,
}

/// What to export.
#[derive(Debug)]
pub struct ExportRequest {
    /// Log origin (checkpoint first line).
    pub origin: String,
    /// Tree size to prove against (all entries must be below it).
    pub tree_size: u64,
    /// One-line, PHI-free description of the selection query, signed into the manifest.
    pub query: String,
    /// Selected leaves, strictly increasing by index.
    pub entries: Vec<ExportEntryInput>,
    /// The previous export's signed checkpoint note, to chain with a consistency proof.
    pub previous_checkpoint: Option<String>,
}

/// Why an export could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ExportBuildError {
    /// Entries are not strictly increasing.
    #[error("entry {index}: entries must be strictly increasing by index")]
    Unsorted {
        /// The offending index.
        index: u64,
    },
    /// An entry is beyond the tree size.
    #[error("entry {index}: not below tree size {size}")]
    OutOfRange {
        /// The offending index.
        index: u64,
        /// The tree size.
        size: u64,
    },
    /// The query description is not a single line.
    #[error("query description must be one line without control characters")]
    BadQuery,
    /// Proof generation failed (usually a missing stored node).
    #[error(transparent)]
    Merkle(#[from] MerkleError),
    /// Signing failed.
    #[error(transparent)]
    Sign(#[from] CheckpointError),
    /// The previous checkpoint is unreadable or from another log.
    #[error("previous checkpoint: {0}")]
    Previous(&'static str),
    /// The stored tree is not consistent with the previous checkpoint (a fork or rewrite).
    #[error("stored tree is not consistent with the previous checkpoint: {0}")]
    Inconsistent(MerkleError),
}

impl From<NoteError> for ExportBuildError {
    fn from(err: NoteError) -> Self {
        Self::Sign(CheckpointError::Note(err))
    }
}

/// How the entries are proven: one plan per single entry or per range chunk.
enum Segment {
    Single {
        position: usize,
        plan: ProofPlan,
    },
    Range {
        begin: u64,
        end: u64,
        plan: ProofPlan,
    },
}

/// Every proof the export needs, before any node is read.
struct Layout {
    root: ProofPlan,
    segments: Vec<Segment>,
    previous: Option<(String, Checkpoint, ProofPlan)>,
}

/// The stored nodes [`build_export`] will read, sorted and deduplicated, so an async caller
/// can fetch them in bulk and pass a `HashMap<NodeId, Hash>` as the node source.
pub fn export_nodes_needed(request: &ExportRequest) -> Result<Vec<NodeId>, ExportBuildError> {
    let layout = plan_layout(request)?;
    let mut ids: BTreeSet<NodeId> = layout.root.nodes().into_iter().collect();
    for segment in &layout.segments {
        match segment {
            Segment::Single { plan, .. } | Segment::Range { plan, .. } => ids.extend(plan.nodes()),
        }
    }
    if let Some((_, _, plan)) = &layout.previous {
        ids.extend(plan.nodes());
    }
    Ok(ids.into_iter().collect())
}

/// Builds and signs an export: checkpoint and manifest signed by `signer`, range proofs for
/// contiguous runs (in [`RANGE_CHUNK`] windows), inclusion proofs for single entries, and a
/// consistency proof from `previous_checkpoint`. Verify the result with
/// [`super::verify_export`] before handing it out if the leaves came from untrusted storage.
pub fn build_export(
    request: ExportRequest,
    nodes: &dyn NodeSource,
    signer: &NoteSigner,
) -> Result<Export, ExportBuildError> {
    let layout = plan_layout(&request)?;
    let root = layout
        .root
        .assemble(nodes)?
        .first()
        .copied()
        .unwrap_or_else(empty_root);
    let checkpoint = Checkpoint {
        origin: request.origin.clone(),
        size: request.tree_size,
        root,
    };
    let previous = match &layout.previous {
        Some((note, old, plan)) => Some(link_previous(note, old, plan, &checkpoint, nodes)?),
        None => None,
    };
    let manifest = Manifest {
        origin: request.origin.clone(),
        size: request.tree_size,
        root,
        query: request.query.clone(),
        runs: runs_of(request.entries.iter().map(|entry| entry.index)),
        leaf_hashes: request
            .entries
            .iter()
            .map(|entry| crate::hash::leaf_hash(&entry.leaf))
            .collect(),
    };
    let mut entries: Vec<ExportEntry> = request.entries.into_iter().map(export_entry).collect();
    let mut ranges = Vec::new();
    for segment in layout.segments {
        match segment {
            Segment::Single { position, plan } => {
                if let Some(entry) = entries.get_mut(position) {
                    entry.inclusion = Some(plan.assemble(nodes)?);
                }
            }
            Segment::Range { begin, end, plan } => {
                ranges.push(ExportRange {
                    begin,
                    end,
                    proof: plan.assemble(nodes)?,
                });
            }
        }
    }
    Ok(Export {
        format: EXPORT_FORMAT.to_owned(),
        checkpoint: checkpoint.sign(&[signer])?,
        manifest: sign_note(&manifest.body(), &[signer])?,
        entries,
        ranges,
        previous,
    })
}

fn export_entry(input: ExportEntryInput) -> ExportEntry {
    ExportEntry {
        index: input.index,
        leaf: BASE64.encode(&input.leaf),
        detail: input.detail.map(|(nonce, plaintext)| OpenedDetail {
            nonce: BASE64.encode(nonce.as_bytes()),
            plaintext: BASE64.encode(plaintext),
        }),
        inclusion: None,
    }
}

fn link_previous(
    note: &str,
    old: &Checkpoint,
    plan: &ProofPlan,
    current: &Checkpoint,
    nodes: &dyn NodeSource,
) -> Result<PreviousLink, ExportBuildError> {
    let consistency = plan.assemble(nodes)?;
    if old.size > 0 {
        verify_consistency(
            old.size,
            current.size,
            &old.root,
            &current.root,
            &consistency,
        )
        .map_err(ExportBuildError::Inconsistent)?;
    }
    Ok(PreviousLink {
        checkpoint: note.to_owned(),
        consistency,
    })
}

fn plan_layout(request: &ExportRequest) -> Result<Layout, ExportBuildError> {
    if request.query.chars().any(char::is_control) {
        return Err(ExportBuildError::BadQuery);
    }
    check_entries(request)?;
    let runs = runs_of(request.entries.iter().map(|entry| entry.index));
    let mut segments = Vec::new();
    let mut position = 0usize;
    for (first, last) in runs {
        let end = last.checked_add(1).ok_or(MerkleError::Overflow)?;
        plan_run(first, end, request.tree_size, &mut position, &mut segments)?;
    }
    let previous = match &request.previous_checkpoint {
        Some(note) => Some(plan_previous(note, request)?),
        None => None,
    };
    Ok(Layout {
        root: root_plan(request.tree_size),
        segments,
        previous,
    })
}

/// Plans one maximal run `first..end`, cut at [`RANGE_CHUNK`] boundaries; single leaves get
/// inclusion proofs.
fn plan_run(
    first: u64,
    end: u64,
    size: u64,
    position: &mut usize,
    segments: &mut Vec<Segment>,
) -> Result<(), ExportBuildError> {
    let mut begin = first;
    while begin < end {
        let boundary = (begin / RANGE_CHUNK)
            .saturating_add(1)
            .saturating_mul(RANGE_CHUNK);
        let stop = boundary.min(end);
        if stop - begin == 1 {
            segments.push(Segment::Single {
                position: *position,
                plan: inclusion_plan(begin, size)?,
            });
        } else {
            segments.push(Segment::Range {
                begin,
                end: stop,
                plan: range_plan(begin, stop, size)?,
            });
        }
        *position += usize::try_from(stop - begin).map_err(|_| MerkleError::Overflow)?;
        begin = stop;
    }
    Ok(())
}

fn check_entries(request: &ExportRequest) -> Result<(), ExportBuildError> {
    let mut previous: Option<u64> = None;
    for entry in &request.entries {
        if previous.is_some_and(|prev| prev >= entry.index) {
            return Err(ExportBuildError::Unsorted { index: entry.index });
        }
        if entry.index >= request.tree_size {
            return Err(ExportBuildError::OutOfRange {
                index: entry.index,
                size: request.tree_size,
            });
        }
        previous = Some(entry.index);
    }
    Ok(())
}

fn plan_previous(
    note: &str,
    request: &ExportRequest,
) -> Result<(String, Checkpoint, ProofPlan), ExportBuildError> {
    let body =
        unverified_body(note).map_err(|_| ExportBuildError::Previous("not a signed note"))?;
    let old =
        Checkpoint::parse_body(body).map_err(|_| ExportBuildError::Previous("not a checkpoint"))?;
    if old.origin != request.origin {
        return Err(ExportBuildError::Previous("different origin"));
    }
    if old.size > request.tree_size {
        return Err(ExportBuildError::Previous("larger than the current tree"));
    }
    let plan = consistency_plan(old.size, request.tree_size)?;
    Ok((note.to_owned(), old, plan))
}
