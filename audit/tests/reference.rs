//! Checks the crate against a naive recursive implementation of RFC 9162 §2.1 (MTH, PATH,
//! PROOF) written straight from the RFC text, for every size up to 70 and every index.

mod common;

use common::{TestTree, leaf_data};
use glastonbury_audit::{
    CompactRange, Hash, consistency_proof, inclusion_proof, range_proof, root_at,
    verify_consistency, verify_inclusion, verify_range,
};
use sha2::{Digest, Sha256};

const MAX_SIZE: u64 = 70;

fn reference_leaf(data: &[u8]) -> Hash {
    Sha256::new()
        .chain_update([0u8])
        .chain_update(data)
        .finalize()
        .into()
}

fn reference_node(left: &Hash, right: &Hash) -> Hash {
    Sha256::new()
        .chain_update([1u8])
        .chain_update(left)
        .chain_update(right)
        .finalize()
        .into()
}

/// The largest power of two smaller than n.
fn split(n: usize) -> usize {
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

/// MTH(D[n]).
fn mth(leaves: &[Vec<u8>]) -> Hash {
    match leaves.len() {
        0 => Sha256::digest([]).into(),
        1 => reference_leaf(&leaves[0]),
        n => {
            let k = split(n);
            reference_node(&mth(&leaves[..k]), &mth(&leaves[k..]))
        }
    }
}

/// PATH(m, D[n]).
fn path(m: usize, leaves: &[Vec<u8>]) -> Vec<Hash> {
    let n = leaves.len();
    if n <= 1 {
        return Vec::new();
    }
    let k = split(n);
    if m < k {
        let mut proof = path(m, &leaves[..k]);
        proof.push(mth(&leaves[k..]));
        proof
    } else {
        let mut proof = path(m - k, &leaves[k..]);
        proof.push(mth(&leaves[..k]));
        proof
    }
}

/// SUBPROOF(m, D[n], b).
fn subproof(m: usize, leaves: &[Vec<u8>], whole: bool) -> Vec<Hash> {
    let n = leaves.len();
    if m == n {
        return if whole { Vec::new() } else { vec![mth(leaves)] };
    }
    let k = split(n);
    if m <= k {
        let mut proof = subproof(m, &leaves[..k], whole);
        proof.push(mth(&leaves[k..]));
        proof
    } else {
        let mut proof = subproof(m - k, &leaves[k..], false);
        proof.push(mth(&leaves[..k]));
        proof
    }
}

fn all_leaves() -> Vec<Vec<u8>> {
    (0..MAX_SIZE).map(leaf_data).collect()
}

#[test]
fn roots_match_reference() {
    let data = all_leaves();
    let tree = TestTree::new(MAX_SIZE);
    let mut range = CompactRange::new();
    let mut nodes = Vec::new();
    assert_eq!(range.root(), mth(&[]));
    for n in 1..=MAX_SIZE as usize {
        range
            .append(reference_leaf(&data[n - 1]), &mut nodes)
            .unwrap();
        let want = mth(&data[..n]);
        assert_eq!(range.root(), want, "compact range root at size {n}");
        assert_eq!(
            root_at(&tree.store, n as u64).unwrap(),
            want,
            "stored root at size {n}"
        );
        let restored = CompactRange::from_hashes(
            n as u64,
            CompactRange::nodes_needed(n as u64)
                .into_iter()
                .map(|id| glastonbury_audit::NodeSource::node(&tree.store, id).unwrap())
                .collect(),
        )
        .unwrap();
        assert_eq!(restored.root(), want, "restored root at size {n}");
    }
}

#[test]
fn inclusion_proofs_match_reference() {
    let data = all_leaves();
    let tree = TestTree::new(MAX_SIZE);
    for n in 1..=MAX_SIZE {
        let root = mth(&data[..n as usize]);
        for m in 0..n {
            let proof = inclusion_proof(&tree.store, m, n).unwrap();
            assert_eq!(
                proof,
                path(m as usize, &data[..n as usize]),
                "PATH({m}, D[{n}])"
            );
            verify_inclusion(&tree.leaves[m as usize], m, n, &proof, &root).unwrap();
        }
    }
}

#[test]
fn consistency_proofs_match_reference() {
    let data = all_leaves();
    let tree = TestTree::new(MAX_SIZE);
    for n in 1..=MAX_SIZE {
        let root2 = mth(&data[..n as usize]);
        for m in 1..=n {
            let root1 = mth(&data[..m as usize]);
            let proof = consistency_proof(&tree.store, m, n).unwrap();
            let want = if m == n {
                Vec::new()
            } else {
                subproof(m as usize, &data[..n as usize], true)
            };
            assert_eq!(proof, want, "PROOF({m}, D[{n}])");
            verify_consistency(m, n, &root1, &root2, &proof).unwrap();
        }
    }
}

#[test]
fn range_proofs_verify_for_every_range() {
    let data = all_leaves();
    let tree = TestTree::new(40);
    for n in 1..=40u64 {
        let root = mth(&data[..n as usize]);
        for begin in 0..n {
            for end in begin + 1..=n {
                let proof = range_proof(&tree.store, begin, end, n).unwrap();
                let leaves = &tree.leaves[begin as usize..end as usize];
                verify_range(begin, leaves, n, &proof, &root).unwrap();
            }
        }
    }
}

#[test]
fn batch_append_reports_the_same_nodes() {
    let hashes: Vec<Hash> = (0..MAX_SIZE)
        .map(|i| reference_leaf(&leaf_data(i)))
        .collect();
    let mut one_by_one = CompactRange::new();
    let mut nodes = Vec::new();
    for hash in &hashes {
        one_by_one.append(*hash, &mut nodes).unwrap();
    }
    let mut batched = CompactRange::new();
    let mut batch_nodes = Vec::new();
    for chunk in hashes.chunks(7) {
        let batch = batched.append_batch(chunk).unwrap();
        assert_eq!(batch.root, batched.root());
        assert_eq!(batch.size, batched.size());
        batch_nodes.extend(batch.nodes);
    }
    assert_eq!(batch_nodes, nodes);
    assert_eq!(batched, one_by_one);
    // Every complete subtree of a 70-leaf tree is reported exactly once: 70 + 35 + 17 + 8 + 4 + 2 + 1.
    assert_eq!(nodes.len(), 137);
}
