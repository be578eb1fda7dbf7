//! Where proofs get their hashes: the [`NodeSource`] trait over stored complete subtrees, and an
//! in-memory store for tests, tools and benchmarks.

use std::collections::HashMap;

use crate::compact::{NodeId, StoredNode};
use crate::error::MerkleError;
use crate::hash::Hash;

/// Read access to persisted complete-subtree hashes. Proof generation asks for O(log n) of
/// them; incomplete right-edge subtrees are computed from complete ones, never looked up.
pub trait NodeSource {
    /// The stored hash of the complete subtree `id`, or `None` when it is not stored.
    fn node(&self, id: NodeId) -> Option<Hash>;
}

impl<T: NodeSource + ?Sized> NodeSource for &T {
    fn node(&self, id: NodeId) -> Option<Hash> {
        (**self).node(id)
    }
}

/// A prefetched set of nodes (e.g. the rows a database query returned for a plan's node list).
impl NodeSource for HashMap<NodeId, Hash> {
    fn node(&self, id: NodeId) -> Option<Hash> {
        self.get(&id).copied()
    }
}

/// Nodes held in memory, one vector per level; nodes must arrive in index order per level
/// (as [`crate::CompactRange`] reports them).
#[derive(Clone, Debug, Default)]
pub struct MemoryNodeStore {
    levels: Vec<Vec<Hash>>,
}

impl MemoryNodeStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores one node: a new one at the end of its level, or a replacement of an existing one.
    pub fn insert(&mut self, node: StoredNode) -> Result<(), MerkleError> {
        let level = usize::from(node.id.level);
        if self.levels.len() <= level {
            self.levels.resize_with(level + 1, Vec::new);
        }
        let row = &mut self.levels[level];
        let index = usize::try_from(node.id.index).map_err(|_| MerkleError::Overflow)?;
        match index.cmp(&row.len()) {
            std::cmp::Ordering::Less => row[index] = node.hash,
            std::cmp::Ordering::Equal => row.push(node.hash),
            std::cmp::Ordering::Greater => return Err(MerkleError::StoreGap(node.id)),
        }
        Ok(())
    }

    /// Stores many nodes, in order.
    pub fn extend(&mut self, nodes: &[StoredNode]) -> Result<(), MerkleError> {
        nodes.iter().try_for_each(|node| self.insert(*node))
    }

    /// Number of stored leaf hashes (level 0).
    pub fn leaf_count(&self) -> u64 {
        self.levels.first().map_or(0, |row| row.len() as u64)
    }
}

impl NodeSource for MemoryNodeStore {
    fn node(&self, id: NodeId) -> Option<Hash> {
        let row = self.levels.get(usize::from(id.level))?;
        row.get(usize::try_from(id.index).ok()?).copied()
    }
}
