//! The storage suite: the same record-path behaviour checked on SQLite and, when
//! `GLASTONBURY_TEST_DATABASE_URL` is set, on PostgreSQL.

use std::sync::Arc;

use bytes::Bytes;
use sqlx::Row;

use glastonbury::access::{self, Principal, Role};
use glastonbury::records::{Precondition, RecordBody, RecordError, RecordKey};

use crate::common::{EngineUnderTest, appliance_for, clinician};

fn body(patient: Option<&str>, text: &str) -> RecordBody {
    RecordBody {
        patient_id: patient.map(str::to_owned),
        content_type: "application/fhir+json".to_owned(),
        body: Bytes::from(text.to_owned()),
        search_index: Vec::new(),
    }
}

async fn journal_size(appliance: &glastonbury::appliance::Appliance) -> i64 {
    sqlx::query("SELECT COUNT(*) FROM audit_leaves")
        .fetch_one(appliance.database.pool())
        .await
        .unwrap()
        .try_get(0)
        .unwrap()
}

async fn versions_are_kept_and_deletes_are_tombstones(engine: EngineUnderTest) {
    let Some(test) = appliance_for(engine) else {
        return;
    };
    let appliance = test.open().await;
    let records = &appliance.records;
    let principal = clinician();
    let create = records
        .authorize::<access::Create>(&principal, "Observation")
        .await
        .unwrap();
    let update = records
        .authorize::<access::Update>(&principal, "Observation")
        .await
        .unwrap();
    let read = records
        .authorize::<access::Read>(&principal, "Observation")
        .await
        .unwrap();
    let delete = records
        .authorize::<access::Delete>(&principal, "Observation")
        .await
        .unwrap();

    let first = records
        .create(&create, "o1", body(Some("p1"), "version one"))
        .await
        .unwrap();
    assert_eq!(first.version, 1);
    let second = records
        .update(
            &update,
            "o1",
            body(Some("p1"), "version two"),
            Precondition::VersionIs(1),
        )
        .await
        .unwrap();
    assert_eq!(second.version, 2);
    assert!(second.last_updated > first.last_updated);
    assert_eq!(
        records.read(&read, "o1").await.unwrap().body,
        Bytes::from("version two")
    );
    assert_eq!(
        records.read_version(&read, "o1", 1).await.unwrap().body,
        Bytes::from("version one")
    );

    let stale = records
        .update(
            &update,
            "o1",
            body(Some("p1"), "lost update"),
            Precondition::VersionIs(1),
        )
        .await;
    assert!(
        matches!(
            stale,
            Err(RecordError::VersionConflict { current: Some(2) })
        ),
        "{stale:?}"
    );
    let duplicate = records
        .create(&create, "o1", body(Some("p1"), "again"))
        .await;
    assert!(
        matches!(duplicate, Err(RecordError::AlreadyExists)),
        "{duplicate:?}"
    );

    let tombstone = records
        .delete(&delete, "o1", Precondition::None)
        .await
        .unwrap();
    assert_eq!(tombstone.version, 3);
    assert!(matches!(
        records.read(&read, "o1").await,
        Err(RecordError::Deleted { version: 3, .. })
    ));
    assert_eq!(
        records.read_version(&read, "o1", 2).await.unwrap().body,
        Bytes::from("version two")
    );
    assert!(matches!(
        records.read(&read, "missing").await,
        Err(RecordError::NotFound)
    ));

    let recreated = records
        .create(&create, "o1", body(Some("p1"), "reborn"))
        .await
        .unwrap();
    assert_eq!(recreated.version, 4);
    appliance.close().await;
}

async fn every_access_and_denial_is_journaled(engine: EngineUnderTest) {
    let Some(test) = appliance_for(engine) else {
        return;
    };
    let appliance = test.open().await;
    let records = &appliance.records;
    let before = journal_size(&appliance).await;
    let principal = clinician();
    let create = records
        .authorize::<access::Create>(&principal, "Patient")
        .await
        .unwrap();
    let read = records
        .authorize::<access::Read>(&principal, "Patient")
        .await
        .unwrap();
    records
        .create(&create, "p9", body(Some("p9"), "{}"))
        .await
        .unwrap();
    records.read(&read, "p9").await.unwrap();
    let admin = Arc::new(Principal {
        role: Role::Admin,
        ..(*clinician()).clone()
    });
    let denied = records.authorize::<access::Read>(&admin, "Patient").await;
    assert!(matches!(denied, Err(RecordError::Denied(_))));
    assert_eq!(
        journal_size(&appliance).await - before,
        3,
        "create, read and denial each leave one leaf"
    );
    let failed_create = records.create(&create, "p9", body(Some("p9"), "{}")).await;
    assert!(failed_create.is_err());
    assert_eq!(
        journal_size(&appliance).await - before,
        3,
        "a write that did not happen leaves no leaf"
    );
    appliance.close().await;
}

/// Permission to update Observations, to share among writer tasks.
async fn observation_update(
    records: &glastonbury::records::Records,
    principal: &Arc<Principal>,
) -> glastonbury::access::Allowed<access::Update> {
    records
        .authorize::<access::Update>(principal, "Observation")
        .await
        .unwrap()
}

async fn concurrent_writers_all_land(engine: EngineUnderTest) {
    let Some(test) = appliance_for(engine) else {
        return;
    };
    let appliance = test.open().await;
    let records = Arc::clone(&appliance.records);
    let principal = clinician();
    let update = Arc::new(observation_update(&records, &principal).await);
    let mut tasks = Vec::new();
    for writer in 0..16 {
        let records = Arc::clone(&records);
        let update = Arc::clone(&update);
        tasks.push(tokio::spawn(async move {
            for round in 0..20 {
                let text = format!("writer {writer} round {round}");
                records
                    .update(&update, "shared", body(None, &text), Precondition::None)
                    .await
                    .unwrap();
                records
                    .update(
                        &update,
                        &format!("own-{writer}"),
                        body(Some("p"), &text),
                        Precondition::None,
                    )
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let read = records
        .authorize::<access::Read>(&principal, "Observation")
        .await
        .unwrap();
    assert_eq!(
        records.read(&read, "shared").await.unwrap().meta.version,
        320
    );
    for writer in 0..16 {
        let own = records.read(&read, &format!("own-{writer}")).await.unwrap();
        assert_eq!(own.meta.version, 20);
        assert_eq!(own.body, Bytes::from(format!("writer {writer} round 19")));
    }
    let leaf_indexes: Vec<i64> =
        sqlx::query("SELECT leaf_index FROM audit_leaves ORDER BY leaf_index")
            .fetch_all(appliance.database.pool())
            .await
            .unwrap()
            .iter()
            .map(|row| row.try_get(0).unwrap())
            .collect();
    assert!(
        leaf_indexes
            .iter()
            .enumerate()
            .all(|(position, index)| *index == position as i64),
        "leaf indexes are dense"
    );
    appliance.close().await;
}

/// An Observation version ready to commit.
async fn prepared_observation(
    records: &glastonbury::records::Records,
    update: &glastonbury::access::Allowed<access::Update>,
    id: &str,
    text: &str,
    precondition: Precondition,
) -> glastonbury::records::PreparedWrite {
    records
        .prepare_store(
            update,
            RecordKey::new("Observation", id),
            body(None, text),
            precondition,
            "update",
            'U',
        )
        .await
        .unwrap()
}

/// 16 writers at once, 10 rounds each: even writers commit a unit that updates `shared`, odd
/// ones a unit that updates `shared` and then writes `second` (with `precondition`), whose
/// outcome `check_failed` checks. Returns how many units landed.
async fn commit_mixed_units(
    records: &Arc<glastonbury::records::Records>,
    update: &Arc<glastonbury::access::Allowed<access::Update>>,
    second: &'static str,
    precondition: Precondition,
    check_failed: fn(&Result<Vec<glastonbury::records::RecordVersion>, RecordError>),
) -> usize {
    let mut tasks = Vec::new();
    for writer in 0..16 {
        let records = Arc::clone(records);
        let update = Arc::clone(update);
        tasks.push(tokio::spawn(async move {
            let mut landed = 0;
            for round in 0..10 {
                let text = format!("writer {writer} round {round}");
                let shared =
                    prepared_observation(&records, &update, "shared", &text, Precondition::None)
                        .await;
                if writer % 2 == 0 {
                    records.commit(vec![shared]).await.unwrap();
                    landed += 1;
                    continue;
                }
                let second =
                    prepared_observation(&records, &update, second, &text, precondition).await;
                check_failed(&records.commit(vec![shared, second]).await);
            }
            landed
        }));
    }
    let mut landed = 0;
    for task in tasks {
        landed += task.await.unwrap();
    }
    landed
}

async fn a_failed_unit_in_a_batch_leaves_no_version_behind(engine: EngineUnderTest) {
    let Some(test) = appliance_for(engine) else {
        return;
    };
    let appliance = test.open().await;
    let records = Arc::clone(&appliance.records);
    let principal = clinician();
    let create = records
        .authorize::<access::Create>(&principal, "Observation")
        .await
        .unwrap();
    records
        .create(&create, "taken", body(None, "{}"))
        .await
        .unwrap();
    let update = Arc::new(observation_update(&records, &principal).await);
    // Units that write `shared` and then fail (their second row must not exist but does), sent
    // at the same time as units that only update `shared`, so that batches mix both.
    let landed = commit_mixed_units(
        &records,
        &update,
        "taken",
        Precondition::MustNotExist,
        |failed| {
            assert!(matches!(failed, Err(RecordError::AlreadyExists)));
        },
    )
    .await;
    let read = records
        .authorize::<access::Read>(&principal, "Observation")
        .await
        .unwrap();
    assert_eq!(landed, 80);
    assert_eq!(
        records.read(&read, "shared").await.unwrap().meta.version,
        80,
        "only the updates that landed made versions"
    );
    let versions: Vec<i64> = sqlx::query(
        "SELECT version FROM records WHERE resource_type = 'Observation' AND resource_id = 'shared' ORDER BY version",
    )
    .fetch_all(appliance.database.pool())
    .await
    .unwrap()
    .iter()
    .map(|row| row.try_get(0).unwrap())
    .collect();
    assert_eq!(versions, (1..=80).collect::<Vec<i64>>());
    appliance.close().await;
}

/// Installs a trigger that makes the database refuse any version of the Observation `refused`:
/// a failure the writer cannot foresee from the heads it knows (as a broken constraint would be).
async fn refuse_versions_of_refused(appliance: &glastonbury::appliance::Appliance) {
    let statements: &[&str] = match appliance.database.engine() {
        glastonbury::storage::Engine::Sqlite => {
            &["CREATE TRIGGER refuse_refused BEFORE INSERT ON records \
             WHEN NEW.resource_id = 'refused' BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"]
        }
        glastonbury::storage::Engine::Postgres => &[
            "CREATE FUNCTION refuse_refused() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF NEW.resource_id = 'refused' THEN RAISE EXCEPTION 'refused by the test'; END IF; \
             RETURN NEW; END $$",
            "CREATE TRIGGER refuse_refused BEFORE INSERT ON records FOR EACH ROW \
             EXECUTE FUNCTION refuse_refused()",
        ],
    };
    for statement in statements {
        sqlx::query(statement)
            .execute(appliance.database.pool())
            .await
            .unwrap();
    }
}

async fn a_unit_the_database_refuses_fails_alone_in_its_batch(engine: EngineUnderTest) {
    let Some(test) = appliance_for(engine) else {
        return;
    };
    let appliance = test.open().await;
    refuse_versions_of_refused(&appliance).await;
    let records = Arc::clone(&appliance.records);
    let principal = clinician();
    let update = Arc::new(observation_update(&records, &principal).await);
    let journal_before = journal_size(&appliance).await;
    // Units that update `shared` and then write `refused`, sent at the same time as units that
    // only update `shared`, so that batches mix both.
    let landed = commit_mixed_units(&records, &update, "refused", Precondition::None, |failed| {
        assert!(
            matches!(failed, Err(RecordError::Storage(_))),
            "the refused unit fails: {failed:?}"
        );
    })
    .await;
    assert_eq!(landed, 80);
    let versions: Vec<(String, i64)> = sqlx::query(
        "SELECT resource_id, version FROM records WHERE resource_type = 'Observation' ORDER BY resource_id, version",
    )
    .fetch_all(appliance.database.pool())
    .await
    .unwrap()
    .iter()
    .map(|row| (row.try_get(0).unwrap(), row.try_get(1).unwrap()))
    .collect();
    let expected: Vec<(String, i64)> = (1..=80)
        .map(|version| ("shared".to_owned(), version))
        .collect();
    assert_eq!(
        versions, expected,
        "only the units that landed made versions"
    );
    assert_eq!(
        journal_size(&appliance).await - journal_before,
        80,
        "one leaf per landed unit, none for a refused one"
    );
    let keys = appliance.checkpoints.keys().await.unwrap();
    let mut connection = appliance.database.pool().acquire().await.unwrap();
    glastonbury::journal::fsck::check(&mut connection, keys.verifiers())
        .await
        .expect("the journal's tree matches its leaves");
    drop(connection);
    appliance.close().await;
}

async fn shredding_one_patient_leaves_others_readable(engine: EngineUnderTest) {
    let Some(test) = appliance_for(engine) else {
        return;
    };
    let appliance = test.open().await;
    let records = &appliance.records;
    let principal = clinician();
    let create = records
        .authorize::<access::Create>(&principal, "Observation")
        .await
        .unwrap();
    let read = records
        .authorize::<access::Read>(&principal, "Observation")
        .await
        .unwrap();
    records
        .create(&create, "a", body(Some("alice"), "alice data"))
        .await
        .unwrap();
    records
        .create(&create, "b", body(Some("bob"), "bob data"))
        .await
        .unwrap();
    let admin = Arc::new(Principal::local_administrator("HOPERAT"));
    assert!(records.shred_patient(&admin, "alice").await.unwrap());
    assert!(matches!(
        records.read(&read, "a").await,
        Err(RecordError::Shredded)
    ));
    assert_eq!(
        records.read(&read, "b").await.unwrap().body,
        Bytes::from("bob data")
    );
    let refused = records
        .create(&create, "a2", body(Some("alice"), "more"))
        .await;
    assert!(matches!(refused, Err(RecordError::Shredded)), "{refused:?}");
    assert!(
        records.shred_patient(&clinician(), "bob").await.is_err(),
        "only admins shred"
    );
    appliance.close().await;
}

/// A patient shredded by another process (`glastonbury patient shred`, or another replica) while
/// this one still holds their key: the database itself refuses new content for them.
async fn a_patient_shredded_by_another_process_gets_no_new_content(engine: EngineUnderTest) {
    let Some(test) = appliance_for(engine) else {
        return;
    };
    let appliance = test.open().await;
    let records = &appliance.records;
    let principal = clinician();
    let create = records
        .authorize::<access::Create>(&principal, "Observation")
        .await
        .unwrap();
    records
        .create(&create, "a", body(Some("alice"), "alice data"))
        .await
        .unwrap();
    // What `patient shred` does to the key row, done behind this process's back: its cache still
    // holds alice's key.
    sqlx::query(
        "UPDATE patient_keys SET wrapped_identity = NULL, shredded_at = 1 \
         WHERE patient_ref = (SELECT patient_ref FROM records WHERE resource_id = 'a')",
    )
    .execute(appliance.database.pool())
    .await
    .unwrap();
    let refused = records
        .create(&create, "a2", body(Some("alice"), "more"))
        .await;
    assert!(matches!(refused, Err(RecordError::Shredded)), "{refused:?}");
    let alice_rows: i64 = sqlx::query(
        "SELECT COUNT(*) FROM records WHERE patient_ref = \
         (SELECT patient_ref FROM records WHERE resource_id = 'a')",
    )
    .fetch_one(appliance.database.pool())
    .await
    .unwrap()
    .try_get(0)
    .unwrap();
    assert_eq!(alice_rows, 1, "nothing new was stored for alice");
    records
        .create(&create, "b", body(Some("bob"), "bob data"))
        .await
        .expect("other patients' writes still land");
    let delete = records
        .authorize::<access::Delete>(&principal, "Observation")
        .await
        .unwrap();
    records
        .delete(&delete, "a", Precondition::None)
        .await
        .expect("a tombstone carries no content and still lands");
    let keys = appliance.checkpoints.keys().await.unwrap();
    let mut connection = appliance.database.pool().acquire().await.unwrap();
    glastonbury::journal::fsck::check(&mut connection, keys.verifiers())
        .await
        .expect("the journal's tree matches its leaves");
    drop(connection);
    appliance.close().await;
}

async fn rotation_rewraps_keys_and_keeps_payloads(engine: EngineUnderTest) {
    let Some(test) = appliance_for(engine) else {
        return;
    };
    let appliance = test.open().await;
    let principal = clinician();
    {
        let records = &appliance.records;
        let create = records
            .authorize::<access::Create>(&principal, "Observation")
            .await
            .unwrap();
        for index in 0..5 {
            records
                .create(
                    &create,
                    &format!("r{index}"),
                    body(Some(&format!("p{index}")), "kept"),
                )
                .await
                .unwrap();
        }
    }
    let before: Vec<u8> = sqlx::query("SELECT body FROM records WHERE resource_id = 'r0'")
        .fetch_one(appliance.database.pool())
        .await
        .unwrap()
        .try_get(0)
        .unwrap();
    let summary = appliance.vault.rotate_master().await.unwrap();
    assert_eq!(summary.patient_keys, 5);
    let after: Vec<u8> = sqlx::query("SELECT body FROM records WHERE resource_id = 'r0'")
        .fetch_one(appliance.database.pool())
        .await
        .unwrap()
        .try_get(0)
        .unwrap();
    assert_eq!(before, after, "payloads are not re-encrypted");
    appliance.close().await;
    let reopened = test.open().await;
    let read = reopened
        .records
        .authorize::<access::Read>(&principal, "Observation")
        .await
        .unwrap();
    for index in 0..5 {
        assert_eq!(
            reopened
                .records
                .read(&read, &format!("r{index}"))
                .await
                .unwrap()
                .body,
            Bytes::from("kept")
        );
    }
    reopened.close().await;
}

async fn large_bodies_go_to_the_blob_store(engine: EngineUnderTest) {
    let Some(test) = appliance_for(engine) else {
        return;
    };
    let appliance = test.open().await;
    let records = &appliance.records;
    let principal = clinician();
    let create = records
        .authorize::<access::Create>(&principal, "DocumentReference")
        .await
        .unwrap();
    let read = records
        .authorize::<access::Read>(&principal, "DocumentReference")
        .await
        .unwrap();
    let large = "x".repeat(200_000);
    records
        .create(&create, "big", body(Some("p"), &large))
        .await
        .unwrap();
    let key = glastonbury::records::RecordKey::new("DocumentReference", "big");
    let blob_key = records
        .blob_key_of(&key, 1)
        .await
        .unwrap()
        .expect("large bodies live in the blob store");
    let on_disk = std::fs::read(appliance.blobs.local_path(&blob_key).unwrap()).unwrap();
    assert!(
        on_disk.starts_with(b"age-encryption.org/v1"),
        "blobs are age files"
    );
    assert_eq!(
        records.read(&read, "big").await.unwrap().body.len(),
        large.len()
    );
    appliance.close().await;
}

/// Index values (the DICOM header beside each instance) are sealed with the patient's index
/// key: they open as index values only, values stored as age files before still open, and both
/// die with the patient's key.
async fn index_values_open_for_their_patient_until_shredded(engine: EngineUnderTest) {
    let Some(test) = appliance_for(engine) else {
        return;
    };
    let appliance = test.open().await;
    let vault = &appliance.vault;
    let alice = vault.patient_ref(Some("alice"));
    let bob = vault.patient_ref(Some("bob"));
    let recipient = vault.patient_recipient(&alice).await.unwrap();
    let sealed = recipient.seal_for_index(b"alice header").unwrap();
    let legacy = recipient.encrypt(b"alice legacy header").unwrap();
    assert!(!sealed.starts_with(b"age-encryption.org/"));
    assert_eq!(
        vault.open_index_value(&alice, &sealed).await.unwrap(),
        b"alice header"
    );
    assert_eq!(
        vault.open_index_value(&alice, &legacy).await.unwrap(),
        b"alice legacy header"
    );
    assert!(
        vault.decrypt_for_patient(&alice, &sealed).await.is_err(),
        "an index value is not a record payload"
    );
    vault.patient_recipient(&bob).await.unwrap();
    assert!(
        vault.open_index_value(&bob, &sealed).await.is_err(),
        "another patient's key does not open it"
    );
    let admin = Arc::new(Principal::local_administrator("HOPERAT"));
    assert!(
        appliance
            .records
            .shred_patient(&admin, "alice")
            .await
            .unwrap()
    );
    for value in [&sealed, &legacy] {
        assert!(matches!(
            vault.open_index_value(&alice, value).await,
            Err(glastonbury::vault::VaultError::PatientShredded)
        ));
    }
    appliance.close().await;
}

on_both_engines!(
    versions_are_kept_and_deletes_are_tombstones,
    every_access_and_denial_is_journaled,
    concurrent_writers_all_land,
    a_failed_unit_in_a_batch_leaves_no_version_behind,
    a_unit_the_database_refuses_fails_alone_in_its_batch,
    shredding_one_patient_leaves_others_readable,
    a_patient_shredded_by_another_process_gets_no_new_content,
    rotation_rewraps_keys_and_keeps_payloads,
    large_bodies_go_to_the_blob_store,
    index_values_open_for_their_patient_until_shredded,
);
