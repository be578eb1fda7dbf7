//! The audit journal against a real database on both engines: the stored tree equals a serial
//! rebuild after concurrent writers, checkpoints are signed and consistent, and every kind of
//! tampering with the stored journal (a changed, deleted or reordered entry, a truncated log, a
//! swapped checkpoint, a rewritten tree) is caught by fsck and by export, naming the entry.

use std::sync::Arc;

use bytes::Bytes;
use sqlx::Row;

use glastonbury::access::{self, Principal, Role};
use glastonbury::appliance::Appliance;
use glastonbury::journal::export::{ExportError, build_verified_export};
use glastonbury::journal::fsck::{self, FsckFailure};
use glastonbury::journal::query::AuditFilter;
use glastonbury::journal::store;
use glastonbury::records::RecordBody;
use glastonbury_audit::{
    AuditEvent, Checkpoint, CompactRange, NoteSigner, leaf_hash, verify_export,
};

use crate::common::{EngineUnderTest, TestAppliance, appliance_for, clinician};

fn body(patient: &str, text: &str) -> RecordBody {
    RecordBody {
        patient_id: Some(patient.to_owned()),
        content_type: "application/fhir+json".to_owned(),
        body: Bytes::from(text.to_owned()),
        search_index: Vec::new(),
    }
}

/// Writes `count` audited creates (and reads) for a few patients.
async fn write_events(appliance: &Appliance, count: usize) {
    let principal = clinician();
    let records = &appliance.records;
    let create = records
        .authorize::<access::Create>(&principal, "Observation")
        .await
        .unwrap();
    let read = records
        .authorize::<access::Read>(&principal, "Observation")
        .await
        .unwrap();
    for number in 0..count {
        let id = format!("obs-{number}-{}", uuid::Uuid::new_v4().simple());
        records
            .create(&create, &id, body(&format!("patient-{}", number % 3), "{}"))
            .await
            .unwrap();
        if number % 2 == 0 {
            records.read(&read, &id).await.unwrap();
        }
    }
}

async fn fsck_of(appliance: &Appliance) -> Result<fsck::FsckSummary, FsckFailure> {
    let keys = appliance.checkpoints.keys().await.unwrap();
    let mut connection = appliance.database.pool().acquire().await.unwrap();
    fsck::check(&mut connection, keys.verifiers()).await
}

async fn export_all(appliance: &Appliance) -> Result<glastonbury_audit::Export, ExportError> {
    build_verified_export(
        &appliance.database,
        &appliance.vault,
        &appliance.checkpoints,
        &AuditFilter::default(),
        None,
    )
    .await
}

async fn execute(appliance: &Appliance, sql: &str) {
    sqlx::query(sql)
        .execute(appliance.database.pool())
        .await
        .unwrap();
}

async fn leaf_at(appliance: &Appliance, index: i64) -> Vec<u8> {
    sqlx::query("SELECT leaf FROM audit_leaves WHERE leaf_index = $1")
        .bind(index)
        .fetch_one(appliance.database.pool())
        .await
        .unwrap()
        .try_get(0)
        .unwrap()
}

async fn set_leaf(appliance: &Appliance, index: i64, leaf: Vec<u8>) {
    sqlx::query("UPDATE audit_leaves SET leaf = $1 WHERE leaf_index = $2")
        .bind(leaf)
        .bind(index)
        .execute(appliance.database.pool())
        .await
        .unwrap();
}

/// A journal of 30 events with a signed checkpoint over all of them.
async fn signed_journal(test: &TestAppliance) -> Appliance {
    let appliance = test.open().await;
    write_events(&appliance, 20).await;
    let checkpoint = appliance
        .checkpoints
        .sign_if_grown()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(checkpoint.tree_size, 30);
    appliance
}

fn assert_names_entry(message: &str, index: u64) {
    assert!(
        message.contains(&format!("entry {index}")),
        "expected the error to name entry {index}: {message}"
    );
}

async fn tree_equals_serial_rebuild(engine: EngineUnderTest) {
    let Some(test) = appliance_for(engine) else {
        return;
    };
    let appliance = test.open().await;
    let records = Arc::clone(&appliance.records);
    let create = Arc::new(
        records
            .authorize::<access::Create>(&clinician(), "Observation")
            .await
            .unwrap(),
    );
    let mut tasks = Vec::new();
    for writer in 0..24 {
        let records = Arc::clone(&records);
        let create = Arc::clone(&create);
        let checkpoints = Arc::clone(&appliance.checkpoints);
        tasks.push(tokio::spawn(async move {
            for round in 0..25 {
                records
                    .create(&create, &format!("w{writer}-{round}"), body("p", "{}"))
                    .await
                    .unwrap();
                if round % 10 == 0 {
                    checkpoints.sign_if_grown().await.unwrap();
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    appliance.checkpoints.sign_if_grown().await.unwrap();
    let summary = fsck_of(&appliance).await.unwrap();
    assert_eq!(summary.leaves, 600);
    assert!(summary.checkpoints_checked >= 2);
    let mut connection = appliance.database.pool().acquire().await.unwrap();
    let leaves = store::leaves_between(&mut connection, 0, 600)
        .await
        .unwrap();
    let mut serial = CompactRange::new();
    let mut completed = Vec::new();
    for leaf in &leaves {
        AuditEvent::from_leaf_bytes(&leaf.bytes).expect("every leaf is a canonical audit event");
        serial
            .append(leaf_hash(&leaf.bytes), &mut completed)
            .unwrap();
    }
    let stored = store::read_head(&mut connection).await.unwrap();
    assert_eq!(serial.root(), stored.root());
    assert_eq!(serial.root(), summary.root);
    drop(connection);
    appliance.close().await;
}

async fn a_changed_entry_is_named(engine: EngineUnderTest) {
    let Some(test) = appliance_for(engine) else {
        return;
    };
    let appliance = signed_journal(&test).await;
    let mut leaf = leaf_at(&appliance, 7).await;
    let position = leaf.iter().position(|byte| *byte == b'R').unwrap();
    leaf[position] = b'D';
    set_leaf(&appliance, 7, leaf).await;
    assert_names_entry(&fsck_of(&appliance).await.unwrap_err().to_string(), 7);
    assert_names_entry(&export_all(&appliance).await.unwrap_err().to_string(), 7);
    appliance.close().await;
}

async fn a_deleted_entry_is_named(engine: EngineUnderTest) {
    let Some(test) = appliance_for(engine) else {
        return;
    };
    let appliance = signed_journal(&test).await;
    execute(&appliance, "DELETE FROM audit_leaves WHERE leaf_index = 11").await;
    assert_names_entry(&fsck_of(&appliance).await.unwrap_err().to_string(), 11);
    assert_names_entry(&export_all(&appliance).await.unwrap_err().to_string(), 11);
    appliance.close().await;
}

async fn two_reordered_entries_are_named(engine: EngineUnderTest) {
    let Some(test) = appliance_for(engine) else {
        return;
    };
    let appliance = signed_journal(&test).await;
    let fifth = leaf_at(&appliance, 5).await;
    let ninth = leaf_at(&appliance, 9).await;
    set_leaf(&appliance, 5, ninth).await;
    set_leaf(&appliance, 9, fifth).await;
    assert_names_entry(&fsck_of(&appliance).await.unwrap_err().to_string(), 5);
    assert_names_entry(&export_all(&appliance).await.unwrap_err().to_string(), 5);
    appliance.close().await;
}

async fn a_truncated_log_is_named(engine: EngineUnderTest) {
    let Some(test) = appliance_for(engine) else {
        return;
    };
    let appliance = signed_journal(&test).await;
    // A careful attacker cuts the leaves, the nodes they completed and rewinds the head.
    execute(
        &appliance,
        "DELETE FROM audit_leaves WHERE leaf_index >= 24",
    )
    .await;
    execute(
        &appliance,
        "DELETE FROM audit_nodes WHERE level = 0 AND node_index >= 24",
    )
    .await;
    execute(
        &appliance,
        "DELETE FROM audit_nodes WHERE level = 1 AND node_index >= 12",
    )
    .await;
    execute(
        &appliance,
        "DELETE FROM audit_nodes WHERE level = 2 AND node_index >= 6",
    )
    .await;
    execute(
        &appliance,
        "DELETE FROM audit_nodes WHERE level = 3 AND node_index >= 3",
    )
    .await;
    execute(
        &appliance,
        "DELETE FROM audit_nodes WHERE level = 4 AND node_index >= 1",
    )
    .await;
    sqlx::query("UPDATE journal_head SET tree_size = 24, frontier = $1")
        .bind(Vec::<u8>::new())
        .execute(appliance.database.pool())
        .await
        .unwrap();
    let failure = fsck_of(&appliance).await.unwrap_err().to_string();
    assert_names_entry(&failure, 24);
    let export_failure = export_all(&appliance).await.unwrap_err().to_string();
    assert!(
        export_failure.contains("not consistent with the signed checkpoint of size 30"),
        "{export_failure}"
    );
    appliance.close().await;
}

async fn a_swapped_checkpoint_is_caught(engine: EngineUnderTest) {
    let Some(test) = appliance_for(engine) else {
        return;
    };
    let appliance = signed_journal(&test).await;
    write_events(&appliance, 2).await;
    appliance
        .checkpoints
        .sign_if_grown()
        .await
        .unwrap()
        .unwrap();
    // Swap the two stored notes between their rows.
    let checkpoints = {
        let mut connection = appliance.database.pool().acquire().await.unwrap();
        store::all_checkpoints(&mut connection).await.unwrap()
    };
    assert_eq!(checkpoints.len(), 2);
    for (row, other) in [(0, 1), (1, 0)] {
        sqlx::query("UPDATE audit_checkpoints SET note = $1 WHERE tree_size = $2")
            .bind(&checkpoints[other].note)
            .bind(i64::try_from(checkpoints[row].tree_size).unwrap())
            .execute(appliance.database.pool())
            .await
            .unwrap();
    }
    let failure = fsck_of(&appliance).await.unwrap_err().to_string();
    assert!(
        failure.contains("checkpoint stored under size 30"),
        "{failure}"
    );
    // A checkpoint of a forged tree signed by a key the appliance never had.
    let forger =
        NoteSigner::generate(appliance.checkpoints.keys().await.unwrap().origin()).unwrap();
    let forged = Checkpoint {
        origin: forger.name().to_owned(),
        size: 30,
        root: [9; 32],
    }
    .sign(&[&forger])
    .unwrap();
    for checkpoint in &checkpoints {
        sqlx::query("UPDATE audit_checkpoints SET note = $1 WHERE tree_size = $2")
            .bind(&checkpoint.note)
            .bind(i64::try_from(checkpoint.tree_size).unwrap())
            .execute(appliance.database.pool())
            .await
            .unwrap();
    }
    fsck_of(&appliance)
        .await
        .expect("restored checkpoints are clean");
    sqlx::query("UPDATE audit_checkpoints SET note = $1 WHERE tree_size = 30")
        .bind(&forged)
        .execute(appliance.database.pool())
        .await
        .unwrap();
    let failure = fsck_of(&appliance).await.unwrap_err().to_string();
    assert!(
        failure.contains("checkpoint stored under size 30 does not verify"),
        "{failure}"
    );
    appliance.close().await;
}

async fn a_rewritten_tree_is_refused(engine: EngineUnderTest) {
    let Some(test) = appliance_for(engine) else {
        return;
    };
    let appliance = signed_journal(&test).await;
    // The attacker changes entry 4 and recomputes every node and the head, so the stored tree is
    // self-consistent; only the signed checkpoint remembers the truth.
    let mut leaf = leaf_at(&appliance, 4).await;
    let position = leaf.iter().position(|byte| *byte == b'R').unwrap();
    leaf[position] = b'U';
    set_leaf(&appliance, 4, leaf).await;
    execute(&appliance, "DELETE FROM audit_nodes").await;
    let mut connection = appliance.database.pool().acquire().await.unwrap();
    let leaves = store::leaves_between(&mut connection, 0, 30).await.unwrap();
    drop(connection);
    let mut tree = CompactRange::new();
    let hashes: Vec<_> = leaves.iter().map(|leaf| leaf_hash(&leaf.bytes)).collect();
    let batch = tree.append_batch(&hashes).unwrap();
    for node in batch.nodes {
        sqlx::query("INSERT INTO audit_nodes (level, node_index, hash) VALUES ($1, $2, $3)")
            .bind(i64::from(node.id.level))
            .bind(i64::try_from(node.id.index).unwrap())
            .bind(node.hash.to_vec())
            .execute(appliance.database.pool())
            .await
            .unwrap();
    }
    let frontier: Vec<u8> = tree.border().iter().flat_map(|node| node.hash).collect();
    sqlx::query("UPDATE journal_head SET frontier = $1")
        .bind(frontier)
        .execute(appliance.database.pool())
        .await
        .unwrap();
    let failure = fsck_of(&appliance).await.unwrap_err().to_string();
    assert!(failure.contains("root differs"), "{failure}");
    let export_failure = export_all(&appliance).await.unwrap_err().to_string();
    assert!(
        export_failure.contains("history was rewritten"),
        "{export_failure}"
    );
    // Nor does the signer certify the rewritten tree once it grows.
    write_events(&appliance, 1).await;
    assert!(appliance.checkpoints.sign_if_grown().await.is_err());
    appliance.close().await;
}

async fn exports_verify_and_chain(engine: EngineUnderTest) {
    let Some(test) = appliance_for(engine) else {
        return;
    };
    let appliance = signed_journal(&test).await;
    let keys = appliance.checkpoints.keys().await.unwrap();
    let first = export_all(&appliance).await.unwrap();
    write_events(&appliance, 3).await;
    let patient = appliance.vault.patient_ref(Some("patient-1"));
    let filter = AuditFilter {
        patient_ref: Some(patient.clone()),
        ..AuditFilter::default()
    };
    let second = build_verified_export(
        &appliance.database,
        &appliance.vault,
        &appliance.checkpoints,
        &filter,
        Some(&first),
    )
    .await
    .unwrap();
    let summary = verify_export(&second, keys.verifiers(), Some(&first)).unwrap();
    assert_eq!(summary.previous_size, Some(30));
    assert!(summary.entries > 0);
    for entry in &second.entries {
        let bytes = base64_decode(&entry.leaf);
        let event = AuditEvent::from_leaf_bytes(&bytes).unwrap();
        assert_eq!(
            event.entities[0].patient_pseudonym.as_deref(),
            Some(patient.as_str()),
            "a patient export holds only that patient's entries"
        );
    }
    // Tampering with one exported entry is caught and named.
    let mut tampered = second.clone();
    let position = tampered
        .entries
        .iter()
        .position(|entry| entry.inclusion.is_some())
        .expect("a patient's entries are not all contiguous");
    let victim = tampered.entries[position].index;
    let mut bytes = base64_decode(&tampered.entries[position].leaf);
    let byte_position = bytes.iter().position(|byte| *byte == b'R').unwrap();
    bytes[byte_position] = b'D';
    tampered.entries[position].leaf = base64_encode(&bytes);
    let error = verify_export(&tampered, keys.verifiers(), None).unwrap_err();
    assert_eq!(error.entry_index(), Some(victim));
    // Dropping one is caught too (the signed manifest lists the selection).
    let mut dropped = second.clone();
    let removed = dropped.entries.remove(2).index;
    let error = verify_export(&dropped, keys.verifiers(), None).unwrap_err();
    assert_eq!(error.entry_index(), Some(removed));
    appliance.close().await;
}

async fn audit_reads_are_compliance_only_and_journaled(engine: EngineUnderTest) {
    let Some(test) = appliance_for(engine) else {
        return;
    };
    let appliance = test.open().await;
    write_events(&appliance, 2).await;
    let officer = Arc::new(Principal {
        id: "officer".to_owned(),
        role: Role::Compliance,
        ..(*clinician()).clone()
    });
    assert!(
        appliance
            .records
            .authorize_audit_access(&clinician())
            .await
            .is_err()
    );
    let access = appliance
        .records
        .authorize_audit_access(&officer)
        .await
        .unwrap();
    let patient = appliance.vault.patient_ref(Some("patient-0"));
    appliance
        .records
        .journal_audit_log_used(&access, "query", "patient=patient-0", Some(&patient))
        .await
        .unwrap();
    let export = export_all(&appliance).await.unwrap();
    let events: Vec<AuditEvent> = export
        .entries
        .iter()
        .map(|entry| AuditEvent::from_leaf_bytes(&base64_decode(&entry.leaf)).unwrap())
        .collect();
    let denial = events
        .iter()
        .find(|event| event.event_type.code == "110113")
        .expect("the clinician's denied audit read is journaled");
    assert_eq!(denial.agents[0].who, "test-clinician");
    let (position, used) = events
        .iter()
        .enumerate()
        .find(|(_, event)| event.event_type.code == "110101")
        .expect("the audit read is journaled as 110101");
    let sealed = used.sealed_detail.as_ref().expect("query text is sealed");
    assert!(!sealed.ciphertext.contains("patient-0"));
    let opened = export.entries[position].detail.as_ref().unwrap();
    assert_eq!(base64_decode(&opened.plaintext), b"patient=patient-0");
    // After the patient is shredded the leaf still verifies but the text is gone.
    appliance
        .records
        .shred_patient(
            &Arc::new(Principal::local_administrator("HOPERAT")),
            "patient-0",
        )
        .await
        .unwrap();
    let after = export_all(&appliance).await.unwrap();
    assert!(after.entries[position].detail.is_none());
    appliance.close().await;
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

on_both_engines!(
    tree_equals_serial_rebuild,
    a_changed_entry_is_named,
    a_deleted_entry_is_named,
    two_reordered_entries_are_named,
    a_truncated_log_is_named,
    a_swapped_checkpoint_is_caught,
    a_rewritten_tree_is_refused,
    exports_verify_and_chain,
    audit_reads_are_compliance_only_and_journaled,
);
