//! Exports: build and verify, JSON round trip, and tampering (changed leaf, deleted entry,
//! reordered entries, truncation, swapped checkpoint, bad previous export, bad detail).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use glastonbury_audit::{
    AUDIT_EVENT_SCHEMA, AuditAction, AuditAgent, AuditEntity, AuditEvent, AuditOutcome,
    CompactRange, DetailCommitment, DetailNonce, Export, ExportEntryInput, ExportRequest,
    MemoryNodeStore, MerkleError, NoteSigner, SealedDetail, VerifyError, build_export, codes,
    export_nodes_needed, verify_export,
};

const ORIGIN: &str = "glastonbury.example/audit/appliance-1";

fn event(index: u64, detail: Option<&DetailCommitment>) -> AuditEvent {
    AuditEvent {
        schema: AUDIT_EVENT_SCHEMA.to_owned(),
        event_type: codes::REST.coding(),
        subtypes: vec![codes::READ.coding()],
        action: AuditAction::Read,
        recorded: format!("2025-03-01T10:{:02}:{:02}Z", index / 60 % 60, index % 60),
        outcome: AuditOutcome::Success,
        outcome_reason: None,
        purpose_of_use: vec![codes::TREATMENT.coding()],
        agents: vec![AuditAgent {
            who: format!("user-{}", index % 13),
            requestor: true,
            roles: vec![],
            network_address: Some("10.1.2.3".to_owned()),
            token_id: Some(format!("jti-{index}")),
        }],
        source: "appliance-1".to_owned(),
        entities: vec![AuditEntity {
            resource_type: Some("Observation".to_owned()),
            resource_id: Some(format!("obs-{index}")),
            patient_pseudonym: Some(format!("p-{}", index % 17)),
            ..AuditEntity::default()
        }],
        request_id: Some(format!("req-{index}")),
        policy_ids: vec!["clinician-read".to_owned()],
        break_glass: false,
        sealed_detail: detail.map(|commitment| SealedDetail {
            ciphertext: BASE64.encode(format!("age-ciphertext-{index}")),
            commitment: commitment.to_base64(),
            key_id: Some(format!("patient-key-{}", index % 17)),
        }),
    }
}

struct Log {
    leaves: Vec<Vec<u8>>,
    details: Vec<Option<(DetailNonce, Vec<u8>)>>,
    range: CompactRange,
    store: MemoryNodeStore,
    signer: NoteSigner,
}

impl Log {
    fn new(size: u64) -> Self {
        let mut log = Self {
            leaves: Vec::new(),
            details: Vec::new(),
            range: CompactRange::new(),
            store: MemoryNodeStore::new(),
            signer: NoteSigner::generate(ORIGIN).expect("signer"),
        };
        log.grow(size);
        log
    }

    fn grow(&mut self, size: u64) {
        while self.range.size() < size {
            let index = self.range.size();
            let detail = index.is_multiple_of(5).then(|| {
                let plaintext =
                    format!("query: family=Smith&birthdate=1970-01-{index}").into_bytes();
                let (commitment, nonce) = DetailCommitment::make(&plaintext);
                (commitment, nonce, plaintext)
            });
            let leaf = event(index, detail.as_ref().map(|(c, _, _)| c))
                .leaf_bytes()
                .expect("leaf");
            let batch = self
                .range
                .append_batch(&[glastonbury_audit::leaf_hash(&leaf)])
                .expect("append");
            self.store.extend(&batch.nodes).expect("store");
            self.leaves.push(leaf);
            self.details
                .push(detail.map(|(_, nonce, plaintext)| (nonce, plaintext)));
        }
    }

    fn request(&self, indexes: &[u64], previous: Option<&Export>) -> ExportRequest {
        let entries = indexes
            .iter()
            .map(|&index| ExportEntryInput {
                index,
                leaf: self.leaves[index as usize].clone(),
                detail: self.details[index as usize].clone(),
            })
            .collect();
        ExportRequest {
            origin: ORIGIN.to_owned(),
            tree_size: self.range.size(),
            query: "patient=p-3 from=2025-03-01".to_owned(),
            entries,
            previous_checkpoint: previous.map(|export| export.checkpoint.clone()),
        }
    }

    fn export(&self, indexes: &[u64], previous: Option<&Export>) -> Export {
        build_export(self.request(indexes, previous), &self.store, &self.signer)
            .expect("build export")
    }

    fn verify(&self, export: &Export, previous: Option<&Export>) -> Result<u64, VerifyError> {
        verify_export(export, &[self.signer.verifier()], previous).map(|summary| summary.entries)
    }
}

fn contiguous(begin: u64, end: u64) -> Vec<u64> {
    (begin..end).collect()
}

fn sparse(size: u64) -> Vec<u64> {
    (0..size).filter(|i| i % 7 == 3 || i % 11 == 0).collect()
}

/// Replaces entry `position`'s leaf with a different, well-formed event.
fn change_leaf(export: &mut Export, position: usize) {
    let entry = &mut export.entries[position];
    let leaf = BASE64.decode(&entry.leaf).expect("leaf base64");
    let mut changed = AuditEvent::from_leaf_bytes(&leaf).expect("leaf event");
    changed.agents[0].who = "someone-else".to_owned();
    entry.leaf = BASE64.encode(changed.leaf_bytes().expect("leaf"));
}

#[test]
fn contiguous_and_sparse_exports_verify() {
    let log = Log::new(3000);
    let full = log.export(&contiguous(0, 3000), None);
    assert_eq!(log.verify(&full, None), Ok(3000));
    assert!(
        full.ranges.len() >= 3,
        "contiguous exports use range proofs"
    );
    assert!(full.entries.iter().all(|entry| entry.inclusion.is_none()));

    let window = log.export(&contiguous(100, 2600), None);
    let summary = verify_export(&window, &[log.signer.verifier()], None).unwrap();
    assert_eq!(summary.entries, 2500);
    assert_eq!(summary.tree_size, 3000);
    assert_eq!(summary.details_checked, 500);
    assert_eq!(summary.query, "patient=p-3 from=2025-03-01");

    let picks = sparse(3000);
    let scattered = log.export(&picks, None);
    let summary = verify_export(&scattered, &[log.signer.verifier()], None).unwrap();
    assert_eq!(summary.entries, picks.len() as u64);
    assert!(summary.inclusion_proofs > 0);

    let empty = log.export(&[], None);
    assert_eq!(log.verify(&empty, None), Ok(0));
}

#[test]
fn json_round_trip_verifies() {
    let log = Log::new(500);
    let export = log.export(&sparse(500), None);
    let text = serde_json::to_string(&export).unwrap();
    assert!(text.starts_with("{\"format\":\"glastonbury-audit-export/v1\""));
    let parsed: Export = serde_json::from_str(&text).unwrap();
    assert_eq!(parsed, export);
    assert!(log.verify(&parsed, None).is_ok());
}

#[test]
fn async_callers_can_prefetch_exactly_the_needed_nodes() {
    let log = Log::new(2000);
    let request = log.request(&sparse(2000), None);
    let needed = export_nodes_needed(&request).unwrap();
    let prefetched: std::collections::HashMap<_, _> = needed
        .iter()
        .map(|id| {
            (
                *id,
                glastonbury_audit::NodeSource::node(&log.store, *id).unwrap(),
            )
        })
        .collect();
    let export = build_export(request, &prefetched, &log.signer).unwrap();
    assert!(log.verify(&export, None).is_ok());
}

#[test]
fn changed_leaf_is_named() {
    let log = Log::new(3000);
    let mut export = log.export(&contiguous(0, 3000), None);
    change_leaf(&mut export, 2100);
    let err = log.verify(&export, None).unwrap_err();
    assert!(
        matches!(err, VerifyError::Leaf { index: 2100, .. }),
        "a changed entry inside a range proof's window is named exactly: {err}"
    );
    assert_eq!(err.entry_index(), Some(2100));

    let picks = sparse(3000);
    let mut export = log.export(&picks, None);
    let position = export
        .entries
        .iter()
        .position(|e| e.index > 1000 && e.inclusion.is_some())
        .unwrap();
    let index = export.entries[position].index;
    change_leaf(&mut export, position);
    let err = log.verify(&export, None).unwrap_err();
    assert!(
        matches!(err, VerifyError::Leaf { index: i, .. } if i == index),
        "{err}"
    );
    assert!(err.to_string().starts_with(&format!("entry {index}: ")));
}

#[test]
fn deleted_entry_is_named() {
    let log = Log::new(3000);
    for picks in [contiguous(0, 3000), sparse(3000)] {
        let mut export = log.export(&picks, None);
        let removed = export.entries.remove(40);
        let err = log.verify(&export, None).unwrap_err();
        assert_eq!(
            err,
            VerifyError::MissingEntry {
                index: removed.index
            }
        );
    }
}

#[test]
fn reordered_entries_are_named() {
    let log = Log::new(3000);
    for picks in [contiguous(0, 3000), sparse(3000)] {
        let mut export = log.export(&picks, None);
        export.entries.swap(10, 11);
        let err = log.verify(&export, None).unwrap_err();
        assert_eq!(
            err,
            VerifyError::OutOfOrder {
                index: picks[10],
                previous: picks[11]
            }
        );
    }
    // Swapping only the leaf contents (indexes kept) breaks the proofs.
    let mut export = log.export(&contiguous(0, 3000), None);
    let (first, second) = (
        export.entries[11].leaf.clone(),
        export.entries[12].leaf.clone(),
    );
    export.entries[11].leaf = second;
    export.entries[12].leaf = first;
    assert!(matches!(
        log.verify(&export, None),
        Err(VerifyError::Leaf { index: 11, .. })
    ));
}

#[test]
fn truncation_is_named() {
    let log = Log::new(3000);
    let mut export = log.export(&contiguous(0, 3000), None);
    export.entries.truncate(2990);
    assert_eq!(
        log.verify(&export, None),
        Err(VerifyError::MissingEntry { index: 2990 })
    );
    // Truncating the proofs too does not help: the signed manifest lists every entry.
    export.ranges.pop();
    assert_eq!(
        log.verify(&export, None),
        Err(VerifyError::MissingEntry { index: 2990 })
    );
}

#[test]
fn swapped_checkpoint_is_rejected() {
    let mut log = Log::new(2000);
    let older = log.export(&contiguous(0, 2000), None);
    log.grow(3000);
    let mut export = log.export(&contiguous(0, 3000), None);
    export.checkpoint = older.checkpoint.clone();
    assert_eq!(
        log.verify(&export, None),
        Err(VerifyError::ManifestMismatch("tree size"))
    );
    // Swapping the manifest as well: entries beyond the old tree are named.
    export.manifest = older.manifest.clone();
    assert_eq!(
        log.verify(&export, None),
        Err(VerifyError::IndexOutOfRange {
            index: 2000,
            size: 2000
        })
    );
    // Same entries, older checkpoint + manifest: the range proofs no longer fit.
    let mut export = log.export(&contiguous(0, 2000), None);
    export.checkpoint = older.checkpoint.clone();
    export.manifest = older.manifest.clone();
    let err = log.verify(&export, None).unwrap_err();
    assert!(matches!(err, VerifyError::Range { begin: 0, .. }), "{err}");
}

#[test]
fn untrusted_signer_is_rejected() {
    let log = Log::new(100);
    let export = log.export(&contiguous(0, 100), None);
    let stranger = NoteSigner::generate(ORIGIN).unwrap();
    assert!(matches!(
        verify_export(&export, &[stranger.verifier()], None),
        Err(VerifyError::Checkpoint(_))
    ));
}

#[test]
fn chained_exports_verify_and_bad_previous_is_rejected() {
    let mut log = Log::new(1000);
    let first = log.export(&contiguous(0, 1000), None);
    log.grow(2500);
    let second = log.export(&contiguous(1000, 2500), Some(&first));
    let summary = verify_export(&second, &[log.signer.verifier()], Some(&first)).unwrap();
    assert_eq!(summary.previous_size, Some(1000));
    assert!(
        log.verify(&second, None).is_ok(),
        "the embedded link verifies on its own"
    );

    // Previous given, but the export does not chain from anything.
    let unchained = log.export(&contiguous(1000, 2500), None);
    assert_eq!(
        log.verify(&unchained, Some(&first)),
        Err(VerifyError::MissingConsistency)
    );

    // The previous export is newer than this one.
    assert_eq!(
        log.verify(&first, Some(&second)),
        Err(VerifyError::SizeWentBackwards {
            previous: 2500,
            current: 1000
        })
    );

    // A forked log signed by the same key: history was rewritten.
    let mut fork = Log::new(0);
    fork.signer = NoteSigner::from_key_text(&log.signer.to_key_text()).unwrap();
    fork.leaves.clear();
    fork.grow(1000);
    let forked_first = fork.export(&contiguous(0, 1000), None);
    assert_eq!(
        log.verify(&second, Some(&forked_first)),
        Err(VerifyError::PreviousMismatch)
    );
    let mut lying = second.clone();
    lying.previous.as_mut().unwrap().checkpoint = forked_first.checkpoint.clone();
    assert!(matches!(
        log.verify(&lying, Some(&forked_first)),
        Err(VerifyError::Inconsistent(
            MerkleError::FirstRootMismatch | MerkleError::SecondRootMismatch
        ))
    ));
    // A tampered consistency proof.
    let mut tampered = second.clone();
    tampered.previous.as_mut().unwrap().consistency[0][0] ^= 1;
    assert!(matches!(
        log.verify(&tampered, Some(&first)),
        Err(VerifyError::Inconsistent(_))
    ));
}

#[test]
fn opened_details_are_checked() {
    let log = Log::new(200);
    let mut export = log.export(&contiguous(0, 200), None);
    let position = 35;
    let detail = export.entries[position].detail.as_mut().unwrap();
    let plaintext = BASE64.decode(&detail.plaintext).unwrap();
    assert!(String::from_utf8(plaintext).unwrap().contains("Smith"));
    detail.plaintext = BASE64.encode("query: family=Jones");
    assert_eq!(
        log.verify(&export, None),
        Err(VerifyError::DetailMismatch { index: 35 })
    );
    // A detail attached to a leaf without a sealed detail.
    let mut export = log.export(&contiguous(0, 200), None);
    export.entries[1].detail = export.entries[0].detail.clone();
    assert_eq!(
        log.verify(&export, None),
        Err(VerifyError::DetailMalformed { index: 1 })
    );
}

#[test]
fn garbage_never_panics() {
    let log = Log::new(300);
    let export = log.export(&sparse(300), None);
    let mut broken = export.clone();
    broken.entries[0].leaf = "!!!".to_owned();
    assert!(matches!(
        log.verify(&broken, None),
        Err(VerifyError::LeafEncoding { .. })
    ));
    let mut broken = export.clone();
    broken.entries[3].index = u64::MAX;
    assert!(log.verify(&broken, None).is_err());
    let mut broken = export.clone();
    broken.ranges.push(glastonbury_audit::ExportRange {
        begin: u64::MAX - 1,
        end: u64::MAX,
        proof: vec![],
    });
    assert!(log.verify(&broken, None).is_err());
    let mut broken = export.clone();
    let single = broken
        .entries
        .iter()
        .position(|entry| entry.inclusion.is_some())
        .unwrap();
    broken.entries[single].inclusion = Some(vec![[0; 32]; 200]);
    assert!(matches!(
        log.verify(&broken, None),
        Err(VerifyError::Inclusion { .. })
    ));
    let mut broken = export;
    broken.format = "glastonbury-audit-export/v9".to_owned();
    assert!(matches!(
        log.verify(&broken, None),
        Err(VerifyError::Format(_))
    ));
}
