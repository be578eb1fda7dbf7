//! Property tests: every proof the log emits verifies, and any mutation of proof, leaf, index,
//! size or root, any extra hash and any truncation makes verification fail.

mod common;

use std::sync::OnceLock;

use common::TestTree;
use glastonbury_audit::{
    Hash, consistency_proof, inclusion_proof, range_proof, root_at, verify_consistency,
    verify_inclusion, verify_range,
};
use proptest::prelude::*;

const TREE: u64 = 1500;

fn tree() -> &'static TestTree {
    static TREE_CELL: OnceLock<TestTree> = OnceLock::new();
    TREE_CELL.get_or_init(|| TestTree::new(TREE))
}

fn root(size: u64) -> Hash {
    root_at(&tree().store, size).expect("root")
}

fn flip(hash: &Hash, bit: usize) -> Hash {
    let mut out = *hash;
    out[bit / 8 % 32] ^= 1 << (bit % 8);
    out
}

/// Left/right pattern of an inclusion proof (true: sibling on the left). RFC 9162 proofs do
/// not commit to the tree size by themselves: two sizes with the same pattern run the very same
/// hash computation (the signed checkpoint is what binds the size), so a size mutation can only
/// be required to fail when the pattern changes.
fn inclusion_shape(index: u64, size: u64) -> Option<Vec<bool>> {
    if index >= size {
        return None;
    }
    let inner = 64 - (index ^ (size - 1)).leading_zeros() as usize;
    let border = index.checked_shr(inner as u32).unwrap_or(0).count_ones() as usize;
    let mut shape: Vec<bool> = (0..inner).map(|i| (index >> i) & 1 == 1).collect();
    shape.extend(std::iter::repeat_n(true, border));
    Some(shape)
}

/// The same for consistency proofs: (seed taken from the proof, inner pattern, border length).
fn consistency_shape(size1: u64, size2: u64) -> Option<(bool, Vec<bool>, usize)> {
    if size1 == 0 || size1 >= size2 {
        return None;
    }
    let level = size1.trailing_zeros();
    let full = inclusion_shape(size1 - 1, size2)?;
    let inner = 64 - ((size1 - 1) ^ (size2 - 1)).leading_zeros() as usize;
    let mask = (size1 - 1) >> level;
    let pattern = (0..inner - level as usize)
        .map(|i| (mask >> i) & 1 == 1)
        .collect();
    Some((size1 != 1 << level, pattern, full.len() - inner))
}

fn inclusion_case() -> impl Strategy<Value = (u64, u64)> {
    (1..=TREE).prop_flat_map(|size| (0..size, Just(size)))
}

fn consistency_case() -> impl Strategy<Value = (u64, u64)> {
    (1..=TREE).prop_flat_map(|size2| (1..=size2, Just(size2)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn inclusion_proofs_verify((index, size) in inclusion_case()) {
        let proof = inclusion_proof(&tree().store, index, size).unwrap();
        let leaf = tree().leaves[index as usize];
        prop_assert!(verify_inclusion(&leaf, index, size, &proof, &root(size)).is_ok());
    }

    #[test]
    fn inclusion_mutations_fail((index, size) in inclusion_case(), bit in 0usize..256, pick in any::<usize>(), other in 0..TREE * 2) {
        let proof = inclusion_proof(&tree().store, index, size).unwrap();
        let leaf = tree().leaves[index as usize];
        let root = root(size);
        if !proof.is_empty() {
            let mut bad = proof.clone();
            let at = pick % bad.len();
            bad[at] = flip(&bad[at], bit);
            prop_assert!(verify_inclusion(&leaf, index, size, &bad, &root).is_err());
        }
        prop_assert!(verify_inclusion(&flip(&leaf, bit), index, size, &proof, &root).is_err());
        prop_assert!(verify_inclusion(&leaf, index, size, &proof, &flip(&root, bit)).is_err());
        if other != index {
            prop_assert!(verify_inclusion(&leaf, other, size, &proof, &root).is_err());
        }
        if inclusion_shape(index, other) != inclusion_shape(index, size) {
            prop_assert!(verify_inclusion(&leaf, index, other, &proof, &root).is_err());
        }
        let mut longer = proof.clone();
        longer.push(proof.first().copied().unwrap_or(leaf));
        prop_assert!(verify_inclusion(&leaf, index, size, &longer, &root).is_err());
        if !proof.is_empty() {
            let shorter = &proof[..proof.len() - 1];
            prop_assert!(verify_inclusion(&leaf, index, size, shorter, &root).is_err());
        }
    }

    #[test]
    fn consistency_proofs_verify((size1, size2) in consistency_case()) {
        let proof = consistency_proof(&tree().store, size1, size2).unwrap();
        prop_assert!(verify_consistency(size1, size2, &root(size1), &root(size2), &proof).is_ok());
    }

    #[test]
    fn consistency_mutations_fail((size1, size2) in consistency_case(), bit in 0usize..256, pick in any::<usize>(), other in 1..TREE * 2) {
        let proof = consistency_proof(&tree().store, size1, size2).unwrap();
        let (root1, root2) = (root(size1), root(size2));
        if !proof.is_empty() {
            let mut bad = proof.clone();
            let at = pick % bad.len();
            bad[at] = flip(&bad[at], bit);
            prop_assert!(verify_consistency(size1, size2, &root1, &root2, &bad).is_err());
            let shorter = &proof[..proof.len() - 1];
            prop_assert!(verify_consistency(size1, size2, &root1, &root2, shorter).is_err());
        }
        prop_assert!(verify_consistency(size1, size2, &flip(&root1, bit), &root2, &proof).is_err());
        prop_assert!(verify_consistency(size1, size2, &root1, &flip(&root2, bit), &proof).is_err());
        let shape = consistency_shape(size1, size2);
        if other != size1 && (shape.is_none() || consistency_shape(other, size2) != shape) {
            prop_assert!(verify_consistency(other, size2, &root1, &root2, &proof).is_err());
        }
        if other != size2 && (shape.is_none() || consistency_shape(size1, other) != shape) {
            prop_assert!(verify_consistency(size1, other, &root1, &root2, &proof).is_err());
        }
        let mut longer = proof.clone();
        longer.push(root1);
        prop_assert!(verify_consistency(size1, size2, &root1, &root2, &longer).is_err());
    }

    #[test]
    fn range_proofs_verify_and_detect_changes((begin, size) in inclusion_case(), len in 1u64..300, bit in 0usize..256, pick in any::<usize>()) {
        let end = (begin + len).min(size);
        let proof = range_proof(&tree().store, begin, end, size).unwrap();
        let leaves = &tree().leaves[begin as usize..end as usize];
        let root = root(size);
        prop_assert!(verify_range(begin, leaves, size, &proof, &root).is_ok());
        let mut changed = leaves.to_vec();
        let at = pick % changed.len();
        changed[at] = flip(&changed[at], bit);
        prop_assert!(verify_range(begin, &changed, size, &proof, &root).is_err());
        if leaves.len() > 1 {
            prop_assert!(verify_range(begin, &leaves[1..], size, &proof, &root).is_err());
            prop_assert!(verify_range(begin, &leaves[..leaves.len() - 1], size, &proof, &root).is_err());
        }
        let mut longer = proof.clone();
        longer.push(root);
        prop_assert!(verify_range(begin, leaves, size, &longer, &root).is_err());
    }

    /// Verifiers return errors, never panic, on arbitrary sizes, indexes and proofs.
    #[test]
    fn verifiers_never_panic(index in any::<u64>(), size in any::<u64>(), size2 in any::<u64>(), len in 0usize..70) {
        let proof = vec![[7u8; 32]; len];
        let hash = [1u8; 32];
        let _ = verify_inclusion(&hash, index, size, &proof, &hash);
        let _ = verify_consistency(size, size2, &hash, &hash, &proof);
        let _ = verify_consistency(size.min(size2), size.max(size2), &hash, &hash, &proof);
        let _ = verify_range(index, &[hash, hash], size, &proof, &hash);
        let _ = glastonbury_audit::inclusion_plan(index, size);
        let _ = glastonbury_audit::consistency_plan(size.min(size2), size.max(size2));
        let _ = glastonbury_audit::range_plan(index.min(size), index.max(size), size2);
    }
}
