//! Errors of the Merkle tree math: proof generation, proof verification and compact ranges.

use crate::compact::NodeId;

/// Why a Merkle operation or proof check failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MerkleError {
    /// The leaf index is not inside the tree.
    #[error("leaf index {index} is not below tree size {size}")]
    IndexOutOfRange {
        /// The requested leaf index.
        index: u64,
        /// The tree size.
        size: u64,
    },
    /// A consistency check was asked from a larger tree to a smaller one.
    #[error("first tree size {size1} is greater than second tree size {size2}")]
    SizeWentBackwards {
        /// The first (older) tree size.
        size1: u64,
        /// The second (newer) tree size.
        size2: u64,
    },
    /// Consistency from the empty tree proves nothing and is rejected.
    #[error("a consistency proof from the empty tree is meaningless")]
    EmptyFirstTree,
    /// The proof does not have the one length the sizes and index allow.
    #[error("proof has {got} hashes, expected {expected}")]
    WrongLength {
        /// Hashes supplied.
        got: usize,
        /// Hashes required.
        expected: usize,
    },
    /// The recomputed root differs from the expected root.
    #[error("recomputed root does not match the expected root")]
    RootMismatch,
    /// The consistency proof does not reproduce the first root.
    #[error("consistency proof does not match the first root")]
    FirstRootMismatch,
    /// The consistency proof does not reproduce the second root.
    #[error("consistency proof does not match the second root")]
    SecondRootMismatch,
    /// Equal tree sizes need an empty proof.
    #[error("tree sizes are equal but the proof is not empty")]
    UnexpectedProof,
    /// A leaf range is empty or extends past the tree.
    #[error("leaf range {begin}..{end} is empty or outside tree size {size}")]
    BadRange {
        /// First leaf of the range.
        begin: u64,
        /// One past the last leaf of the range.
        end: u64,
        /// The tree size.
        size: u64,
    },
    /// The node source lacks a complete subtree the proof needs.
    #[error("stored node at level {} index {} is missing", .0.level, .0.index)]
    MissingNode(NodeId),
    /// A subtree was appended at a position not aligned to its size.
    #[error("subtree is not aligned with the current tree size")]
    Misaligned,
    /// An in-memory store was given a node past the end of its level.
    #[error("node at level {} index {} would leave a gap in the store", .0.level, .0.index)]
    StoreGap(NodeId),
    /// A size or index does not fit in 64 bits.
    #[error("tree size overflow")]
    Overflow,
}
