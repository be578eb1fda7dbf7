//! `audit fsck` over the database: streams every stored leaf, re-derives the tree, and compares
//! it with the stored nodes, the journal head and the signed checkpoints, naming the first entry
//! that diverges.

use std::collections::HashMap;

use glastonbury_audit::{Checkpoint, Fsck, FsckError, Hash, NodeId, NoteVerifier};
use sqlx::AnyConnection;

use super::{JournalError, store};

/// Leaves read per query.
const CHUNK: u64 = 4096;

/// What a clean check covered.
#[derive(Debug, Clone)]
pub struct FsckSummary {
    pub leaves: u64,
    pub nodes_checked: u64,
    pub checkpoints_checked: usize,
    pub root: Hash,
}

/// The first divergence found.
#[derive(Debug, thiserror::Error)]
pub enum FsckFailure {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("entry {index} is missing (the next stored entry is {found})")]
    MissingEntry { index: u64, found: u64 },
    #[error("entry {index}: {source}")]
    Tree { index: u64, source: FsckError },
    #[error("checkpoint stored under size {row_size} is a checkpoint of size {note_size}")]
    MisfiledCheckpoint { row_size: u64, note_size: u64 },
    #[error("checkpoint stored under size {row_size} does not verify: {reason}")]
    BadCheckpoint { row_size: u64, reason: String },
    #[error(
        "entry {index} is missing: the log ends after {leaves} entries but a signed checkpoint covers {size}"
    )]
    Truncated { index: u64, leaves: u64, size: u64 },
    #[error("journal head says {head_size} entries but {leaves} are stored")]
    HeadSize { head_size: u64, leaves: u64 },
    #[error("journal head root differs from the root recomputed from the {leaves} stored entries")]
    HeadRoot { leaves: u64 },
}

/// Checks the whole stored journal.
pub async fn check(
    connection: &mut AnyConnection,
    verifiers: &[NoteVerifier],
) -> Result<FsckSummary, FsckFailure> {
    let checkpoints = store::all_checkpoints(connection).await?;
    let mut notes = Vec::with_capacity(checkpoints.len());
    for stored in &checkpoints {
        let opened = Checkpoint::open(&stored.note, verifiers).map_err(|error| {
            FsckFailure::BadCheckpoint {
                row_size: stored.tree_size,
                reason: error.to_string(),
            }
        })?;
        if opened.size != stored.tree_size {
            return Err(FsckFailure::MisfiledCheckpoint {
                row_size: stored.tree_size,
                note_size: opened.size,
            });
        }
        notes.push(stored.note.clone());
    }
    let largest_checkpoint = checkpoints.last().map_or(0, |stored| stored.tree_size);
    let mut check =
        Fsck::new(&notes, verifiers).map_err(|source| FsckFailure::Tree { index: 0, source })?;
    let mut expected = 0u64;
    loop {
        let leaves = store::leaves_between(connection, expected, expected + CHUNK).await?;
        if leaves.is_empty() {
            if let Some(found) = store::first_leaf_from(connection, expected).await? {
                return Err(FsckFailure::MissingEntry {
                    index: expected,
                    found,
                });
            }
            break;
        }
        let needed: Vec<NodeId> = leaves
            .iter()
            .flat_map(|leaf| completed_by(leaf.index))
            .collect();
        let nodes: HashMap<NodeId, Hash> = store::fetch_nodes(connection, &needed).await?;
        for leaf in &leaves {
            if leaf.index != expected {
                return Err(FsckFailure::MissingEntry {
                    index: expected,
                    found: leaf.index,
                });
            }
            check
                .push_leaf(&leaf.bytes, &nodes)
                .map_err(|source| FsckFailure::Tree {
                    index: leaf.index,
                    source,
                })?;
            expected += 1;
        }
    }
    if largest_checkpoint > expected {
        return Err(FsckFailure::Truncated {
            index: expected,
            leaves: expected,
            size: largest_checkpoint,
        });
    }
    let report = check.finish().map_err(|source| FsckFailure::Tree {
        index: expected,
        source,
    })?;
    let head = store::read_head(connection).await?;
    if head.size() != report.leaves {
        return Err(FsckFailure::HeadSize {
            head_size: head.size(),
            leaves: report.leaves,
        });
    }
    if head.root() != report.root {
        return Err(FsckFailure::HeadRoot {
            leaves: report.leaves,
        });
    }
    Ok(FsckSummary {
        leaves: report.leaves,
        nodes_checked: report.nodes_checked,
        checkpoints_checked: report.checkpoints_checked,
        root: report.root,
    })
}

/// The nodes appending leaf `index` completes: `(level, index >> level)` up its trailing ones.
fn completed_by(index: u64) -> impl Iterator<Item = NodeId> {
    (0..=index.trailing_ones()).map(move |level| NodeId::new(level as u8, index >> level))
}
