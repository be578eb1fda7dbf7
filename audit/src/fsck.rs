//! Consistency check of stored journal state: re-derives the tree from the stored leaves and
//! compares it with the stored nodes and the signed checkpoints, stopping at the first
//! divergence.

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::compact::{CompactRange, NodeId, StoredNode};
use crate::error::MerkleError;
use crate::hash::{Hash, leaf_hash};
use crate::nodes::NodeSource;
use crate::note::NoteVerifier;

/// The first place stored state and recomputed state disagree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FsckError {
    /// A node completed by `leaf` is not stored.
    #[error("after leaf {leaf}: stored node at level {} index {} is missing", .node.level, .node.index)]
    MissingNode {
        /// The leaf whose append completed the node.
        leaf: u64,
        /// The node.
        node: NodeId,
    },
    /// A stored node differs from the one recomputed from the leaves (level 0: the leaf hash).
    #[error("after leaf {leaf}: stored node at level {} index {} differs from the recomputed hash", .node.level, .node.index)]
    NodeMismatch {
        /// The leaf whose append completed the node.
        leaf: u64,
        /// The node.
        node: NodeId,
    },
    /// A checkpoint's signature or format is bad.
    #[error("checkpoint {position}: {source}")]
    CheckpointInvalid {
        /// Position in the list given to fsck.
        position: usize,
        /// Why.
        source: CheckpointError,
    },
    /// A checkpoint's root differs from the root recomputed at its size.
    #[error("checkpoint {position} (size {size}): root differs from the recomputed tree")]
    CheckpointRoot {
        /// Position in the list given to fsck.
        position: usize,
        /// Its tree size.
        size: u64,
    },
    /// A checkpoint is larger than the stored log.
    #[error("checkpoint {position} (size {size}) is beyond the {leaves} stored leaves")]
    CheckpointBeyondLog {
        /// Position in the list given to fsck.
        position: usize,
        /// Its tree size.
        size: u64,
        /// Leaves stored.
        leaves: u64,
    },
    /// The log is too large to count.
    #[error(transparent)]
    Merkle(#[from] MerkleError),
}

/// What a clean fsck covered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsckReport {
    /// Leaves re-hashed.
    pub leaves: u64,
    /// Stored nodes compared.
    pub nodes_checked: u64,
    /// Checkpoints whose signature and root matched.
    pub checkpoints_checked: usize,
    /// Root of the whole stored log.
    pub root: Hash,
}

/// Incremental fsck, for callers that stream leaves in chunks. Appending leaf `i` completes
/// the nodes `(l, i >> l)` for `l` in `0..=trailing_ones(i)`; prefetch those for each chunk.
#[derive(Debug)]
pub struct Fsck {
    range: CompactRange,
    /// (position in the caller's list, checkpoint), sorted by size.
    checkpoints: Vec<(usize, Checkpoint)>,
    next_checkpoint: usize,
    nodes_checked: u64,
    completed: Vec<StoredNode>,
}

impl Fsck {
    /// Starts a check; every checkpoint note must verify against `trusted`.
    pub fn new(checkpoint_notes: &[String], trusted: &[NoteVerifier]) -> Result<Self, FsckError> {
        let mut checkpoints = Vec::with_capacity(checkpoint_notes.len());
        for (position, note) in checkpoint_notes.iter().enumerate() {
            let checkpoint = Checkpoint::open(note, trusted)
                .map_err(|source| FsckError::CheckpointInvalid { position, source })?;
            checkpoints.push((position, checkpoint));
        }
        checkpoints.sort_by_key(|(position, checkpoint)| (checkpoint.size, *position));
        let mut fsck = Self {
            range: CompactRange::new(),
            checkpoints,
            next_checkpoint: 0,
            nodes_checked: 0,
            completed: Vec::new(),
        };
        fsck.check_checkpoints()?;
        Ok(fsck)
    }

    /// Re-hashes the next stored leaf and compares every node it completes with `nodes`.
    pub fn push_leaf(&mut self, leaf: &[u8], nodes: &dyn NodeSource) -> Result<(), FsckError> {
        self.completed.clear();
        let index = self.range.append(leaf_hash(leaf), &mut self.completed)?;
        for node in &self.completed {
            match nodes.node(node.id) {
                None => {
                    return Err(FsckError::MissingNode {
                        leaf: index,
                        node: node.id,
                    });
                }
                Some(stored) if stored != node.hash => {
                    return Err(FsckError::NodeMismatch {
                        leaf: index,
                        node: node.id,
                    });
                }
                Some(_) => self.nodes_checked += 1,
            }
        }
        self.check_checkpoints()
    }

    /// Ends the check: every checkpoint must have been reached.
    pub fn finish(self) -> Result<FsckReport, FsckError> {
        if let Some((position, checkpoint)) = self.checkpoints.get(self.next_checkpoint) {
            return Err(FsckError::CheckpointBeyondLog {
                position: *position,
                size: checkpoint.size,
                leaves: self.range.size(),
            });
        }
        Ok(FsckReport {
            leaves: self.range.size(),
            nodes_checked: self.nodes_checked,
            checkpoints_checked: self.checkpoints.len(),
            root: self.range.root(),
        })
    }

    /// Compares the checkpoints whose size equals the current size.
    fn check_checkpoints(&mut self) -> Result<(), FsckError> {
        while let Some((position, checkpoint)) = self.checkpoints.get(self.next_checkpoint) {
            if checkpoint.size != self.range.size() {
                break;
            }
            if checkpoint.root != self.range.root() {
                return Err(FsckError::CheckpointRoot {
                    position: *position,
                    size: checkpoint.size,
                });
            }
            self.next_checkpoint += 1;
        }
        Ok(())
    }
}

/// Checks a whole stored log: the leaves in index order, the stored nodes, and the signed
/// checkpoint notes (verified against `trusted`). Returns the first divergence.
pub fn fsck<I>(
    leaves: I,
    nodes: &dyn NodeSource,
    checkpoint_notes: &[String],
    trusted: &[NoteVerifier],
) -> Result<FsckReport, FsckError>
where
    I: IntoIterator,
    I::Item: AsRef<[u8]>,
{
    let mut check = Fsck::new(checkpoint_notes, trusted)?;
    for leaf in leaves {
        check.push_leaf(leaf.as_ref(), nodes)?;
    }
    check.finish()
}
