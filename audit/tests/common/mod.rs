//! Helpers shared by the integration tests: small trees held in memory.

#![allow(dead_code)]

use glastonbury_audit::{CompactRange, Hash, MemoryNodeStore, leaf_hash};

/// The leaf data used for test trees: distinct short byte strings.
pub fn leaf_data(index: u64) -> Vec<u8> {
    format!("leaf-{index}").into_bytes()
}

/// A tree of `size` leaves, its node store and the leaf hashes.
pub struct TestTree {
    pub range: CompactRange,
    pub store: MemoryNodeStore,
    pub leaves: Vec<Hash>,
}

impl TestTree {
    pub fn new(size: u64) -> Self {
        let mut tree = Self {
            range: CompactRange::new(),
            store: MemoryNodeStore::new(),
            leaves: Vec::new(),
        };
        tree.grow(size);
        tree
    }

    pub fn grow(&mut self, size: u64) {
        let mut nodes = Vec::new();
        while self.range.size() < size {
            let hash = leaf_hash(&leaf_data(self.range.size()));
            self.range.append(hash, &mut nodes).expect("append");
            self.leaves.push(hash);
        }
        self.store.extend(&nodes).expect("store nodes");
    }
}
