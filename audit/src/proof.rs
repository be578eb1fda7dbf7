//! RFC 9162 inclusion, consistency and range proofs: generation from a [`NodeSource`] and
//! canonical verification (exactly one proof length is accepted for given sizes).

use crate::compact::{CompactRange, NodeId, decompose, fold_right};
use crate::error::MerkleError;
use crate::hash::{Hash, empty_root, node_hash};
use crate::nodes::NodeSource;

/// The stored nodes a proof needs and how they become proof hashes. Async callers list
/// [`ProofPlan::nodes`], fetch them in one query, then [`ProofPlan::assemble`] from the result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProofPlan {
    elements: Vec<PlanElement>,
}

/// One proof hash: a stored complete subtree, or an incomplete right-edge subtree whose hash is
/// folded from its complete parts.
#[derive(Clone, Debug, PartialEq, Eq)]
enum PlanElement {
    Node(NodeId),
    Fold(Vec<NodeId>),
}

impl ProofPlan {
    /// Every stored node the proof reads, in proof order.
    pub fn nodes(&self) -> Vec<NodeId> {
        let mut ids = Vec::new();
        for element in &self.elements {
            match element {
                PlanElement::Node(id) => ids.push(*id),
                PlanElement::Fold(parts) => ids.extend_from_slice(parts),
            }
        }
        ids
    }

    /// Number of hashes in the finished proof.
    pub fn len(&self) -> usize {
        self.elements.len()
    }

    /// Whether the proof is empty.
    pub fn is_empty(&self) -> bool {
        self.elements.is_empty()
    }

    /// Builds the proof hashes from stored nodes.
    pub fn assemble(&self, source: &dyn NodeSource) -> Result<Vec<Hash>, MerkleError> {
        self.elements
            .iter()
            .map(|element| element_hash(element, source))
            .collect()
    }
}

fn element_hash(element: &PlanElement, source: &dyn NodeSource) -> Result<Hash, MerkleError> {
    match element {
        PlanElement::Node(id) => fetch(source, *id),
        PlanElement::Fold(parts) => {
            let hashes = parts
                .iter()
                .map(|id| fetch(source, *id))
                .collect::<Result<Vec<_>, _>>()?;
            fold_right(&hashes).ok_or(MerkleError::Misaligned)
        }
    }
}

fn fetch(source: &dyn NodeSource, id: NodeId) -> Result<Hash, MerkleError> {
    source.node(id).ok_or(MerkleError::MissingNode(id))
}

/// The plan element for the RFC 9162 subtree over leaves `lo..hi`.
fn subtree_element(lo: u64, hi: u64) -> PlanElement {
    let mut parts = decompose(lo, hi);
    match (parts.pop(), parts.is_empty()) {
        (Some(only), true) => PlanElement::Node(only),
        (Some(last), false) => {
            parts.push(last);
            PlanElement::Fold(parts)
        }
        (None, _) => PlanElement::Fold(parts),
    }
}

/// The largest power of two strictly below `n` (`n >= 2`).
fn split_point(n: u64) -> u64 {
    1u64 << (63 - (n - 1).leading_zeros())
}

/// Plans the RFC 9162 inclusion proof (PATH) for leaf `index` in the tree of `size` leaves.
pub fn inclusion_plan(index: u64, size: u64) -> Result<ProofPlan, MerkleError> {
    if index >= size {
        return Err(MerkleError::IndexOutOfRange { index, size });
    }
    let mut elements = Vec::new();
    let (mut lo, mut hi) = (0u64, size);
    while hi - lo > 1 {
        let k = split_point(hi - lo);
        if index < lo + k {
            elements.push(subtree_element(lo + k, hi));
            hi = lo + k;
        } else {
            elements.push(subtree_element(lo, lo + k));
            lo += k;
        }
    }
    elements.reverse();
    Ok(ProofPlan { elements })
}

/// Plans the RFC 9162 consistency proof (PROOF) from `size1` to `size2`. Equal sizes and
/// `size1 == 0` give an empty plan.
pub fn consistency_plan(size1: u64, size2: u64) -> Result<ProofPlan, MerkleError> {
    if size1 > size2 {
        return Err(MerkleError::SizeWentBackwards { size1, size2 });
    }
    let mut elements = Vec::new();
    if size1 == 0 || size1 == size2 {
        return Ok(ProofPlan { elements });
    }
    let (mut lo, mut hi, mut whole) = (0u64, size2, true);
    loop {
        if size1 == hi {
            if !whole {
                elements.push(subtree_element(lo, hi));
            }
            break;
        }
        let k = split_point(hi - lo);
        if size1 - lo <= k {
            elements.push(subtree_element(lo + k, hi));
            hi = lo + k;
        } else {
            elements.push(subtree_element(lo, lo + k));
            lo += k;
            whole = false;
        }
    }
    elements.reverse();
    Ok(ProofPlan { elements })
}

/// Plans the root of the tree of `size` leaves (one folded element; empty for size 0).
pub fn root_plan(size: u64) -> ProofPlan {
    let elements = if size == 0 {
        Vec::new()
    } else {
        vec![subtree_element(0, size)]
    };
    ProofPlan { elements }
}

/// Plans a range proof for leaves `begin..end` of the tree of `size` leaves: the left border
/// (decomposition of `0..begin`) followed by the right border (decomposition of `end..size`).
pub fn range_plan(begin: u64, end: u64, size: u64) -> Result<ProofPlan, MerkleError> {
    if begin >= end || end > size {
        return Err(MerkleError::BadRange { begin, end, size });
    }
    let elements = decompose(0, begin)
        .into_iter()
        .chain(decompose(end, size))
        .map(PlanElement::Node)
        .collect();
    Ok(ProofPlan { elements })
}

/// The root of the tree of `size` leaves, from stored nodes (O(log n) lookups).
pub fn root_at(source: &dyn NodeSource, size: u64) -> Result<Hash, MerkleError> {
    let hashes = root_plan(size).assemble(source)?;
    Ok(hashes.first().copied().unwrap_or_else(empty_root))
}

/// Generates the inclusion proof of leaf `index` in the tree of `size` leaves.
pub fn inclusion_proof(
    source: &dyn NodeSource,
    index: u64,
    size: u64,
) -> Result<Vec<Hash>, MerkleError> {
    inclusion_plan(index, size)?.assemble(source)
}

/// Generates the consistency proof from `size1` to `size2`.
pub fn consistency_proof(
    source: &dyn NodeSource,
    size1: u64,
    size2: u64,
) -> Result<Vec<Hash>, MerkleError> {
    consistency_plan(size1, size2)?.assemble(source)
}

/// Generates the range proof for leaves `begin..end` of the tree of `size` leaves.
pub fn range_proof(
    source: &dyn NodeSource,
    begin: u64,
    end: u64,
    size: u64,
) -> Result<Vec<Hash>, MerkleError> {
    range_plan(begin, end, size)?.assemble(source)
}

/// Inner and border lengths of the inclusion proof of `index` in a tree of `size` (index < size).
fn inclusion_shape(index: u64, size: u64) -> (usize, usize) {
    let inner = (64 - (index ^ (size - 1)).leading_zeros()) as usize;
    let border = index.checked_shr(inner as u32).unwrap_or(0).count_ones() as usize;
    (inner, border)
}

fn chain_inner(seed: Hash, proof: &[Hash], index: u64) -> Hash {
    proof.iter().enumerate().fold(seed, |acc, (i, sibling)| {
        if (index >> i) & 1 == 0 {
            node_hash(&acc, sibling)
        } else {
            node_hash(sibling, &acc)
        }
    })
}

fn chain_inner_right(seed: Hash, proof: &[Hash], index: u64) -> Hash {
    proof.iter().enumerate().fold(seed, |acc, (i, sibling)| {
        if (index >> i) & 1 == 1 {
            node_hash(sibling, &acc)
        } else {
            acc
        }
    })
}

fn chain_border_right(seed: Hash, proof: &[Hash]) -> Hash {
    proof
        .iter()
        .fold(seed, |acc, sibling| node_hash(sibling, &acc))
}

/// Recomputes the root implied by an inclusion proof; the proof length must be exact.
pub fn root_from_inclusion(
    leaf_hash: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
) -> Result<Hash, MerkleError> {
    if index >= size {
        return Err(MerkleError::IndexOutOfRange { index, size });
    }
    let (inner, border) = inclusion_shape(index, size);
    if proof.len() != inner + border {
        return Err(MerkleError::WrongLength {
            got: proof.len(),
            expected: inner + border,
        });
    }
    let (inner_part, border_part) = proof.split_at(inner);
    Ok(chain_border_right(
        chain_inner(*leaf_hash, inner_part, index),
        border_part,
    ))
}

/// Verifies an RFC 9162 inclusion proof of `leaf_hash` at `index` in the tree `(size, root)`.
pub fn verify_inclusion(
    leaf_hash: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), MerkleError> {
    let computed = root_from_inclusion(leaf_hash, index, size, proof)?;
    if &computed == root {
        Ok(())
    } else {
        Err(MerkleError::RootMismatch)
    }
}

/// Verifies an RFC 9162 consistency proof between trees `(size1, root1)` and `(size2, root2)`.
/// Equal sizes need an empty proof and equal roots; `size1 == 0 < size2` is rejected.
pub fn verify_consistency(
    size1: u64,
    size2: u64,
    root1: &Hash,
    root2: &Hash,
    proof: &[Hash],
) -> Result<(), MerkleError> {
    if size1 > size2 {
        return Err(MerkleError::SizeWentBackwards { size1, size2 });
    }
    if size1 == size2 {
        return verify_same_tree(size1, root1, root2, proof);
    }
    if size1 == 0 {
        return Err(MerkleError::EmptyFirstTree);
    }
    let level = size1.trailing_zeros();
    let (inner, border) = inclusion_shape(size1 - 1, size2);
    let inner = inner.saturating_sub(level as usize);
    let first_is_perfect = size1 == 1u64 << level;
    let start = usize::from(!first_is_perfect);
    let expected = start + inner + border;
    if proof.len() != expected {
        return Err(MerkleError::WrongLength {
            got: proof.len(),
            expected,
        });
    }
    let seed = if first_is_perfect { *root1 } else { proof[0] };
    let (inner_part, border_part) = proof[start..].split_at(inner);
    let mask = (size1 - 1) >> level;
    let first = chain_border_right(chain_inner_right(seed, inner_part, mask), border_part);
    if &first != root1 {
        return Err(MerkleError::FirstRootMismatch);
    }
    let second = chain_border_right(chain_inner(seed, inner_part, mask), border_part);
    if &second != root2 {
        return Err(MerkleError::SecondRootMismatch);
    }
    Ok(())
}

fn verify_same_tree(
    size: u64,
    root1: &Hash,
    root2: &Hash,
    proof: &[Hash],
) -> Result<(), MerkleError> {
    if !proof.is_empty() {
        return Err(MerkleError::UnexpectedProof);
    }
    if root1 != root2 {
        return Err(MerkleError::SecondRootMismatch);
    }
    if size == 0 && root1 != &empty_root() {
        return Err(MerkleError::FirstRootMismatch);
    }
    Ok(())
}

/// Recomputes the root from a contiguous run of leaf hashes starting at `begin` and its range
/// proof (left border then right border); the proof length must be exact.
pub fn root_from_range(
    begin: u64,
    leaf_hashes: &[Hash],
    size: u64,
    proof: &[Hash],
) -> Result<Hash, MerkleError> {
    let count = u64::try_from(leaf_hashes.len()).map_err(|_| MerkleError::Overflow)?;
    let end = begin.checked_add(count).ok_or(MerkleError::Overflow)?;
    if count == 0 || end > size {
        return Err(MerkleError::BadRange { begin, end, size });
    }
    let left_len = begin.count_ones() as usize;
    let right_nodes = decompose(end, size);
    let expected = left_len + right_nodes.len();
    if proof.len() != expected {
        return Err(MerkleError::WrongLength {
            got: proof.len(),
            expected,
        });
    }
    let (left, right) = proof.split_at(left_len);
    let mut range = CompactRange::from_hashes(begin, left.to_vec())?;
    for leaf in leaf_hashes {
        range.push_leaf(*leaf)?;
    }
    for (id, hash) in right_nodes.iter().zip(right) {
        range.push_subtree(id.level, *hash, None)?;
    }
    Ok(range.root())
}

/// Verifies that `leaf_hashes` are exactly the leaves `begin..begin+len` of the tree
/// `(size, root)`, given a range proof from [`range_proof`].
pub fn verify_range(
    begin: u64,
    leaf_hashes: &[Hash],
    size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), MerkleError> {
    let computed = root_from_range(begin, leaf_hashes, size, proof)?;
    if &computed == root {
        Ok(())
    } else {
        Err(MerkleError::RootMismatch)
    }
}
