//! `glastonbury bench`: vault encryption throughput next to the raw `age` crate, and record
//! put/get rates on each storage engine, printed as numbers.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;

use glastonbury::access::{self, Principal, Role};
use glastonbury::appliance::Appliance;
use glastonbury::config::{MapEnvironment, Settings};
use glastonbury::records::{Precondition, RecordBody};

/// Concurrent writers for the record measurements (group commit shares their commits).
const CONCURRENCY: usize = 32;

fn report(json: bool, name: &str, value: f64, unit: &str) {
    if json {
        println!(
            "{}",
            serde_json::json!({"name": name, "value": value, "unit": unit})
        );
    } else {
        println!("{name:<48} {value:>12.1} {unit}");
    }
}

pub async fn run(records: usize, postgres: Option<&str>, json: bool) -> anyhow::Result<()> {
    let directory = tempfile::tempdir()?;
    let appliance = open_appliance(directory.path(), None).await?;
    measure_encryption(&appliance, json).await?;
    measure_records(&appliance, "sqlite", records, json).await?;
    measure_journal(&appliance, "sqlite", records, json).await?;
    appliance.close().await;
    if let Some(url) = postgres {
        let database = TemporaryPostgres::create(url).await?;
        let pg_directory = tempfile::tempdir()?;
        let appliance = open_appliance(pg_directory.path(), Some(&database.url)).await?;
        measure_records(&appliance, "postgres", records, json).await?;
        measure_journal(&appliance, "postgres", records, json).await?;
        appliance.close().await;
        database.drop_database().await?;
    }
    Ok(())
}

/// The FHIR server over HTTP at each population size (in patients), on SQLite and, when given,
/// PostgreSQL. The per-client rate limit is lifted so the limiter is not what gets measured.
pub async fn run_fhir(sizes: &[usize], postgres: Option<&str>, json: bool) -> anyhow::Result<()> {
    let directory = tempfile::tempdir()?;
    let appliance = open_appliance_with(directory.path(), None, &fhir_bench_settings()?).await?;
    crate::fhir_bench::run(appliance, "sqlite", sizes, json).await?;
    if let Some(url) = postgres {
        let database = TemporaryPostgres::create(url).await?;
        let pg_directory = tempfile::tempdir()?;
        let appliance = open_appliance_with(
            pg_directory.path(),
            Some(&database.url),
            &fhir_bench_settings()?,
        )
        .await?;
        crate::fhir_bench::run(appliance, "postgres", sizes, json).await?;
        database.drop_database().await?;
    }
    Ok(())
}

fn fhir_bench_settings() -> anyhow::Result<Vec<(&'static str, String)>> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    Ok(vec![
        ("GLASTONBURY_HTTP_ADDR", format!("127.0.0.1:{port}")),
        ("GLASTONBURY_RATE_LIMIT_PER_SECOND", "100000000".to_owned()),
    ])
}

async fn open_appliance(
    data_dir: &std::path::Path,
    database_url: Option<&str>,
) -> anyhow::Result<Appliance> {
    open_appliance_with(data_dir, database_url, &[]).await
}

async fn open_appliance_with(
    data_dir: &std::path::Path,
    database_url: Option<&str>,
    extra: &[(&'static str, String)],
) -> anyhow::Result<Appliance> {
    let mut environment = MapEnvironment::default()
        .with("GLASTONBURY_DATA_DIR", data_dir.display().to_string())
        .with("GLASTONBURY_LOG_FORMAT", "json");
    for (name, value) in extra {
        environment = environment.with(name, value.clone());
    }
    if let Some(url) = database_url {
        environment = environment.with("GLASTONBURY_DATABASE_URL", url);
    }
    let settings = Settings::load(None, &environment)?;
    let (appliance, _) = Appliance::open(settings).await?;
    Ok(appliance)
}

async fn measure_encryption(appliance: &Appliance, json: bool) -> anyhow::Result<()> {
    let payload = vec![0x5au8; 1 << 20];
    let rounds = 64;
    let raw_identity = age::x25519::Identity::generate();
    let raw_recipient = raw_identity.to_public();
    let started = Instant::now();
    let mut raw_ciphertext = Vec::new();
    for _ in 0..rounds {
        raw_ciphertext = age::encrypt(&raw_recipient, &payload)?;
    }
    report(
        json,
        "age crate encrypt (1 MiB payloads)",
        mib_per_second(rounds, started),
        "MiB/s",
    );
    let started = Instant::now();
    for _ in 0..rounds {
        age::decrypt(&raw_identity, &raw_ciphertext)?;
    }
    report(
        json,
        "age crate decrypt (1 MiB payloads)",
        mib_per_second(rounds, started),
        "MiB/s",
    );

    let vault = &appliance.vault;
    let patient_ref = vault.patient_ref(Some("bench-patient"));
    let started = Instant::now();
    let mut vault_ciphertext = Vec::new();
    for _ in 0..rounds {
        vault_ciphertext = vault.encrypt_for_patient(&patient_ref, &payload).await?;
    }
    report(
        json,
        "vault encrypt (1 MiB payloads)",
        mib_per_second(rounds, started),
        "MiB/s",
    );
    let started = Instant::now();
    for _ in 0..rounds {
        vault
            .decrypt_for_patient(&patient_ref, &vault_ciphertext)
            .await?;
    }
    report(
        json,
        "vault decrypt (1 MiB payloads)",
        mib_per_second(rounds, started),
        "MiB/s",
    );

    let small = vec![0x5au8; 2048];
    let small_rounds = 2000;
    let started = Instant::now();
    for _ in 0..small_rounds {
        age::encrypt(&raw_recipient, &small)?;
    }
    report(
        json,
        "age crate encrypt (2 KiB records)",
        per_second(small_rounds, started),
        "ops/s",
    );
    let started = Instant::now();
    for _ in 0..small_rounds {
        vault.encrypt_for_patient(&patient_ref, &small).await?;
    }
    report(
        json,
        "vault encrypt (2 KiB records)",
        per_second(small_rounds, started),
        "ops/s",
    );
    Ok(())
}

fn bench_principal() -> Arc<Principal> {
    Arc::new(Principal {
        id: "bench".to_owned(),
        role: Role::Clinician,
        scopes: vec![
            "system/*.cruds"
                .parse()
                .unwrap_or_else(|_| unreachable_scope()),
        ],
        token_id: None,
        network_address: None,
        purpose_of_use: Some("TREAT".to_owned()),
        request_id: None,
        break_glass_reason: None,
    })
}

#[cold]
fn unreachable_scope() -> ! {
    panic!("the benchmark scope is a valid SMART scope")
}

async fn measure_records(
    appliance: &Appliance,
    engine: &str,
    count: usize,
    json: bool,
) -> anyhow::Result<()> {
    let principal = bench_principal();
    let records = Arc::clone(&appliance.records);
    let create = Arc::new(
        records
            .authorize::<access::Create>(&principal, "Observation")
            .await?,
    );
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..CONCURRENCY {
        let records = Arc::clone(&records);
        let create = Arc::clone(&create);
        tasks.push(tokio::spawn(async move {
            for index in (worker..count).step_by(CONCURRENCY) {
                let patient = format!("patient-{}", index % 100);
                let observation = serde_json::json!({
                    "resourceType": "Observation", "id": format!("obs-{index}"), "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                    "subject": {"reference": format!("Patient/{patient}")},
                    "valueQuantity": {"value": index, "unit": "bpm"},
                });
                let body = RecordBody::fhir(Some(patient), "Observation", &observation);
                records
                    .create(&create, &format!("obs-{index}"), body)
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await.context("benchmark writer panicked")??;
    }
    report(
        json,
        &format!("{engine}: record puts ({CONCURRENCY} concurrent)"),
        per_second(count, started),
        "puts/s",
    );

    let read = Arc::new(
        records
            .authorize::<access::Read>(&principal, "Observation")
            .await?,
    );
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..CONCURRENCY {
        let records = Arc::clone(&records);
        let read = Arc::clone(&read);
        tasks.push(tokio::spawn(async move {
            for index in (worker..count).step_by(CONCURRENCY) {
                records.read(&read, &format!("obs-{index}")).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await.context("benchmark reader panicked")??;
    }
    report(
        json,
        &format!("{engine}: record gets, audited ({CONCURRENCY} concurrent)"),
        per_second(count, started),
        "gets/s",
    );

    let update = records
        .authorize::<access::Update>(&principal, "Observation")
        .await?;
    let started = Instant::now();
    let serial = count.min(500);
    for index in 0..serial {
        let body = RecordBody {
            patient_id: None,
            content_type: "application/json".to_owned(),
            body: Bytes::from_static(b"{}"),
            search_index: Vec::new(),
        };
        records
            .update(
                &update,
                &format!("serial-{index}"),
                body,
                Precondition::None,
            )
            .await?;
    }
    report(
        json,
        &format!("{engine}: record puts (1 writer)"),
        per_second(serial, started),
        "puts/s",
    );
    Ok(())
}

fn per_second(count: usize, started: Instant) -> f64 {
    count as f64 / started.elapsed().as_secs_f64()
}

fn mib_per_second(rounds: usize, started: Instant) -> f64 {
    rounds as f64 / started.elapsed().as_secs_f64()
}

/// Durable audit appends (one leaf per transaction unit: an audited access denial) with one and
/// with many concurrent writers, then inclusion proofs served from the stored nodes.
async fn measure_journal(
    appliance: &Appliance,
    engine: &str,
    count: usize,
    json: bool,
) -> anyhow::Result<()> {
    let denied = Arc::new(Principal {
        role: Role::Admin,
        ..(*bench_principal()).clone()
    });
    for writers in [1, CONCURRENCY] {
        let started = Instant::now();
        let mut tasks = Vec::new();
        for worker in 0..writers {
            let records = Arc::clone(&appliance.records);
            let denied = Arc::clone(&denied);
            tasks.push(tokio::spawn(async move {
                for _ in (worker..count).step_by(writers) {
                    let outcome = records.authorize::<access::Read>(&denied, "Patient").await;
                    anyhow::ensure!(outcome.is_err(), "the bench principal must be denied");
                }
                anyhow::Ok(())
            }));
        }
        for task in tasks {
            task.await??;
        }
        report(
            json,
            &format!("{engine}: durable audit appends, {writers} writer(s)"),
            per_second(count, started),
            "appends/s",
        );
    }
    let mut connection = appliance.database.pool().acquire().await?;
    let tree = glastonbury::journal::store::read_head(&mut connection).await?;
    let size = tree.size();
    let root = tree.root();
    let proofs = 1000u64;
    let started = Instant::now();
    for step in 0..proofs {
        let index = (step * 7919) % size;
        let plan = glastonbury_audit::inclusion_plan(index, size)?;
        let nodes =
            glastonbury::journal::store::fetch_nodes(&mut connection, &plan.nodes()).await?;
        let proof = plan.assemble(&nodes)?;
        let leaf = sqlx::query("SELECT leaf FROM audit_leaves WHERE leaf_index = $1")
            .bind(i64::try_from(index)?)
            .fetch_one(&mut *connection)
            .await?;
        let bytes: Vec<u8> = sqlx::Row::try_get(&leaf, 0)?;
        glastonbury_audit::verify_inclusion(
            &glastonbury_audit::leaf_hash(&bytes),
            index,
            size,
            &proof,
            &root,
        )?;
    }
    report(
        json,
        &format!("{engine}: inclusion proofs from stored nodes, verified"),
        per_second(proofs as usize, started),
        "proofs/s",
    );
    Ok(())
}

/// A uniquely named PostgreSQL database, dropped at the end.
struct TemporaryPostgres {
    admin_url: String,
    name: String,
    url: String,
}

impl TemporaryPostgres {
    async fn create(admin_url: &str) -> anyhow::Result<Self> {
        use sqlx::Connection;
        let name = format!("glastonbury_bench_{}", uuid::Uuid::new_v4().simple());
        let mut connection = sqlx::PgConnection::connect(admin_url)
            .await
            .context("cannot reach PostgreSQL")?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut connection)
            .await?;
        let mut url = url::Url::parse(admin_url)?;
        url.set_path(&name);
        Ok(Self {
            admin_url: admin_url.to_owned(),
            name,
            url: url.to_string(),
        })
    }

    async fn drop_database(self) -> anyhow::Result<()> {
        use sqlx::Connection;
        let mut connection = sqlx::PgConnection::connect(&self.admin_url).await?;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut connection)
        .await?;
        Ok(())
    }
}
