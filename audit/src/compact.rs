//! Compact ranges: O(log n) append state for the RFC 9162 tree, and the node coordinates used to
//! persist its complete subtrees.

use serde::{Deserialize, Serialize};

use crate::error::MerkleError;
use crate::hash::{Hash, empty_root, node_hash};

/// Coordinates of a complete (perfect) subtree: level 0 holds the leaf hashes, and node
/// `(level, index)` covers leaves `index·2^level .. (index+1)·2^level`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId {
    /// Height above the leaves (0 = leaf hash).
    pub level: u8,
    /// Position among the nodes of this level, counted from the left.
    pub index: u64,
}

impl NodeId {
    /// A node id from its level and index.
    pub fn new(level: u8, index: u64) -> Self {
        Self { level, index }
    }

    /// The half-open leaf range `begin..end` this node covers (u128, so no overflow).
    pub fn coverage(self) -> (u128, u128) {
        let width = 1u128 << self.level.min(64);
        let begin = u128::from(self.index) * width;
        (begin, begin + width)
    }
}

/// The hash of one complete subtree, as the caller should persist it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredNode {
    /// Where the subtree sits.
    pub id: NodeId,
    /// Its RFC 9162 hash.
    pub hash: Hash,
}

/// The outcome of [`CompactRange::append_batch`] (one group commit).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchAppend {
    /// Leaf index given to the first leaf of the batch.
    pub first_index: u64,
    /// Tree size after the batch.
    pub size: u64,
    /// Tree root after the batch.
    pub root: Hash,
    /// Every subtree completed by the batch (leaves at level 0 included), in completion order.
    pub nodes: Vec<StoredNode>,
}

/// The compact range `[0, size)`: one hash per set bit of `size`, which is all the state an
/// appender needs. Appends cost O(1) amortized hashing and report completed subtrees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompactRange {
    size: u64,
    /// Perfect subtree hashes for the set bits of `size`, highest level first.
    hashes: Vec<Hash>,
}

impl Default for CompactRange {
    fn default() -> Self {
        Self::new()
    }
}

impl CompactRange {
    /// The empty tree.
    pub fn new() -> Self {
        Self {
            size: 0,
            hashes: Vec::new(),
        }
    }

    /// The stored nodes needed to restore the range for `size`: the binary decomposition of
    /// `[0, size)`, left to right. Fetch them and call [`CompactRange::from_hashes`].
    pub fn nodes_needed(size: u64) -> Vec<NodeId> {
        decompose(0, size)
    }

    /// Restores a range from the hashes of [`CompactRange::nodes_needed`], in that order.
    pub fn from_hashes(size: u64, hashes: Vec<Hash>) -> Result<Self, MerkleError> {
        let expected = size.count_ones() as usize;
        if hashes.len() != expected {
            return Err(MerkleError::WrongLength {
                got: hashes.len(),
                expected,
            });
        }
        Ok(Self { size, hashes })
    }

    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The border nodes (the decomposition of `[0, size)`) with their hashes.
    pub fn border(&self) -> Vec<StoredNode> {
        decompose(0, self.size)
            .into_iter()
            .zip(self.hashes.iter())
            .map(|(id, hash)| StoredNode { id, hash: *hash })
            .collect()
    }

    /// The RFC 9162 root of the tree of the current size.
    pub fn root(&self) -> Hash {
        fold_right(&self.hashes).unwrap_or_else(empty_root)
    }

    /// Appends one leaf hash, pushes every subtree it completes (the leaf itself at level 0
    /// first) onto `completed`, and returns the new leaf's index.
    pub fn append(
        &mut self,
        leaf_hash: Hash,
        completed: &mut Vec<StoredNode>,
    ) -> Result<u64, MerkleError> {
        let index = self.size;
        self.push_subtree(0, leaf_hash, Some(completed))?;
        Ok(index)
    }

    /// Appends many leaf hashes at once (group commit) and reports all completed nodes and the
    /// new root. On error nothing is appended.
    pub fn append_batch(&mut self, leaf_hashes: &[Hash]) -> Result<BatchAppend, MerkleError> {
        let first_index = self.size;
        let count = u64::try_from(leaf_hashes.len()).map_err(|_| MerkleError::Overflow)?;
        first_index
            .checked_add(count)
            .ok_or(MerkleError::Overflow)?;
        let mut nodes = Vec::with_capacity(leaf_hashes.len().saturating_mul(2));
        for leaf in leaf_hashes {
            self.push_subtree(0, *leaf, Some(&mut nodes))?;
        }
        Ok(BatchAppend {
            first_index,
            size: self.size,
            root: self.root(),
            nodes,
        })
    }

    /// Appends a leaf hash without reporting nodes (verifier hot path).
    pub(crate) fn push_leaf(&mut self, leaf_hash: Hash) -> Result<(), MerkleError> {
        self.push_subtree(0, leaf_hash, None)
    }

    /// Appends a perfect subtree of height `level`; `size` must be a multiple of `2^level`.
    pub(crate) fn push_subtree(
        &mut self,
        level: u8,
        hash: Hash,
        mut completed: Option<&mut Vec<StoredNode>>,
    ) -> Result<(), MerkleError> {
        if level >= 64 || self.size.trailing_zeros() < u32::from(level) {
            return Err(MerkleError::Misaligned);
        }
        let new_size = self
            .size
            .checked_add(1u64 << level)
            .ok_or(MerkleError::Overflow)?;
        let mut id = NodeId::new(level, self.size >> level);
        let mut hash = hash;
        report(&mut completed, id, hash);
        while id.index & 1 == 1 {
            let left = self.hashes.pop().ok_or(MerkleError::Misaligned)?;
            hash = node_hash(&left, &hash);
            id = NodeId::new(id.level + 1, id.index >> 1);
            report(&mut completed, id, hash);
        }
        self.hashes.push(hash);
        self.size = new_size;
        Ok(())
    }
}

fn report(completed: &mut Option<&mut Vec<StoredNode>>, id: NodeId, hash: Hash) {
    if let Some(out) = completed.as_deref_mut() {
        out.push(StoredNode { id, hash });
    }
}

/// Decomposes `[begin, end)` into the fewest aligned perfect subtrees, left to right.
pub(crate) fn decompose(begin: u64, end: u64) -> Vec<NodeId> {
    let mut nodes = Vec::new();
    let mut begin = begin;
    while begin < end {
        let align = begin.trailing_zeros().min(63);
        let fit = 63 - (end - begin).leading_zeros();
        let level = align.min(fit);
        // level <= 63, so it fits in u8 and the shift cannot overflow.
        nodes.push(NodeId::new(level as u8, begin >> level));
        begin += 1u64 << level;
    }
    nodes
}

/// Combines the hashes of a right-edge decomposition into the RFC 9162 subtree hash.
pub(crate) fn fold_right(hashes: &[Hash]) -> Option<Hash> {
    let (last, rest) = hashes.split_last()?;
    Some(
        rest.iter()
            .rev()
            .fold(*last, |acc, left| node_hash(left, &acc)),
    )
}
