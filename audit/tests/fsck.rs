//! fsck: a clean log passes; a corrupted leaf, node or checkpoint is reported at the first
//! divergence.

mod common;

use common::{TestTree, leaf_data};
use glastonbury_audit::{Checkpoint, FsckError, NodeId, NoteSigner, StoredNode, fsck, root_at};

const ORIGIN: &str = "glastonbury.example/audit/appliance-1";

fn leaves(size: u64) -> Vec<Vec<u8>> {
    (0..size).map(leaf_data).collect()
}

fn checkpoints(tree: &TestTree, signer: &NoteSigner, sizes: &[u64]) -> Vec<String> {
    sizes
        .iter()
        .map(|&size| {
            let root = root_at(&tree.store, size).expect("root");
            Checkpoint {
                origin: ORIGIN.to_owned(),
                size,
                root,
            }
            .sign(&[signer])
            .expect("sign")
        })
        .collect()
}

#[test]
fn clean_log_passes() {
    let tree = TestTree::new(1000);
    let signer = NoteSigner::generate(ORIGIN).unwrap();
    let notes = checkpoints(&tree, &signer, &[0, 1, 500, 999, 1000]);
    let report = fsck(leaves(1000), &tree.store, &notes, &[signer.verifier()]).unwrap();
    assert_eq!(report.leaves, 1000);
    assert_eq!(report.checkpoints_checked, 5);
    assert_eq!(report.nodes_checked, 1994); // every complete subtree of a 1000-leaf tree
    assert_eq!(report.root, tree.range.root());
}

#[test]
fn corrupted_leaf_is_reported() {
    let tree = TestTree::new(300);
    let mut data = leaves(300);
    data[123] = b"rewritten".to_vec();
    let err = fsck(data, &tree.store, &[], &[]).unwrap_err();
    assert_eq!(
        err,
        FsckError::NodeMismatch {
            leaf: 123,
            node: NodeId::new(0, 123)
        }
    );
}

#[test]
fn corrupted_and_missing_nodes_are_reported() {
    let mut tree = TestTree::new(300);
    tree.store
        .insert(StoredNode {
            id: NodeId::new(3, 10),
            hash: [9; 32],
        })
        .unwrap();
    let err = fsck(leaves(300), &tree.store, &[], &[]).unwrap_err();
    // Node (3, 10) covers leaves 80..88 and is completed by leaf 87.
    assert_eq!(
        err,
        FsckError::NodeMismatch {
            leaf: 87,
            node: NodeId::new(3, 10)
        }
    );

    let short = TestTree::new(200);
    let err = fsck(leaves(300), &short.store, &[], &[]).unwrap_err();
    assert_eq!(
        err,
        FsckError::MissingNode {
            leaf: 200,
            node: NodeId::new(0, 200)
        }
    );
}

#[test]
fn bad_checkpoints_are_reported() {
    let tree = TestTree::new(300);
    let signer = NoteSigner::generate(ORIGIN).unwrap();
    let trusted = [signer.verifier()];
    let mut notes = checkpoints(&tree, &signer, &[100, 200]);
    let forged = Checkpoint {
        origin: ORIGIN.to_owned(),
        size: 150,
        root: [1; 32],
    };
    notes.push(forged.sign(&[&signer]).unwrap());
    let err = fsck(leaves(300), &tree.store, &notes, &trusted).unwrap_err();
    assert_eq!(
        err,
        FsckError::CheckpointRoot {
            position: 2,
            size: 150
        }
    );

    let beyond = checkpoints(&TestTree::new(400), &signer, &[400]);
    let err = fsck(leaves(300), &tree.store, &beyond, &trusted).unwrap_err();
    assert_eq!(
        err,
        FsckError::CheckpointBeyondLog {
            position: 0,
            size: 400,
            leaves: 300
        }
    );

    let stranger = NoteSigner::generate(ORIGIN).unwrap();
    let unsigned = checkpoints(&tree, &stranger, &[100]);
    let err = fsck(leaves(300), &tree.store, &unsigned, &trusted).unwrap_err();
    assert!(matches!(
        err,
        FsckError::CheckpointInvalid { position: 0, .. }
    ));
}
