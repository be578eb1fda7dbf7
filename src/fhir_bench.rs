//! `glastonbury bench --fhir-patients N`: the FHIR server measured over HTTP on this machine with
//! authentication, encryption and audit all on. Loads the synthetic population with transaction
//! Bundles, then measures creates/s, reads/s and the p50/p99 latency of typical searches, at each
//! size it reaches.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use glastonbury::access::Role;
use glastonbury::appliance::Appliance;
use glastonbury::auth::clients::NewClient;
use glastonbury_fhir::synthetic::synthetic_patient;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

/// Concurrent HTTP clients for the throughput measurements.
const CONCURRENCY: usize = 16;
/// Concurrent transaction senders while loading.
const LOADERS: usize = 8;
/// How many times each search runs for its latency distribution.
const SEARCH_ROUNDS: usize = 200;

/// A running server and a token for it (fetched again before each phase: tokens expire).
struct Target {
    origin: String,
    base: String,
    client_id: String,
    secret: secrecy::SecretString,
    token: String,
    client: reqwest::Client,
}

impl Target {
    async fn refresh_token(&mut self) -> anyhow::Result<()> {
        let answer: Value = self
            .client
            .post(format!("{}/auth/token", self.origin))
            .basic_auth(&self.client_id, Some(self.secret.expose_secret()))
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await?
            .json()
            .await?;
        self.token = answer["access_token"]
            .as_str()
            .context("no access token")?
            .to_owned();
        Ok(())
    }
}

/// Patients loaded between two token refreshes.
const LOAD_CHUNK: usize = 500;

pub async fn run(
    appliance: Appliance,
    engine: &str,
    sizes: &[usize],
    json_output: bool,
) -> anyhow::Result<()> {
    let mut target = start(appliance).await?;
    let mut loaded = 0;
    let mut patient_ids: Vec<String> = Vec::new();
    for &patients in sizes {
        let started = Instant::now();
        let mut resources = 0;
        for chunk_start in (loaded..patients).step_by(LOAD_CHUNK) {
            target.refresh_token().await?;
            let (new_ids, chunk_resources) = load(
                &target,
                chunk_start,
                (chunk_start + LOAD_CHUNK).min(patients),
            )
            .await?;
            patient_ids.extend(new_ids);
            resources += chunk_resources;
        }
        let seconds = started.elapsed().as_secs_f64();
        target.refresh_token().await?;
        let bundles = patients - loaded;
        loaded = patients;
        let total_resources = total(&target, "Patient").await?
            + total(&target, "Encounter").await?
            + total(&target, "Observation").await?
            + total(&target, "Condition").await?
            + total(&target, "MedicationRequest").await?
            + total(&target, "ImagingStudy").await?;
        let label = format!("{engine} @ {total_resources} resources");
        report(
            json_output,
            &format!(
                "{label}: transaction Bundles ({LOADERS} concurrent, ~{} entries)",
                resources / bundles.max(1)
            ),
            bundles as f64 / seconds,
            "bundles/s",
        );
        report(
            json_output,
            &format!("{label}: resources stored by transactions"),
            resources as f64 / seconds,
            "resources/s",
        );
        measure_creates(&target, &label, json_output).await?;
        target.refresh_token().await?;
        measure_reads(&target, &label, &patient_ids, json_output).await?;
        target.refresh_token().await?;
        measure_searches(&target, &label, &patient_ids, json_output).await?;
    }
    Ok(())
}

async fn start(appliance: Appliance) -> anyhow::Result<Target> {
    let address = appliance.settings.http_addr;
    let (client_id, secret) = appliance
        .clients
        .create_with_secret(&NewClient {
            name: "fhir benchmark".to_owned(),
            ae_title: None,
            role: Role::Clinician,
            scopes: vec![
                "system/*.cruds"
                    .parse()
                    .map_err(|_| anyhow::anyhow!("scope"))?,
            ],
        })
        .await?;
    tokio::spawn(glastonbury::server::serve(appliance));
    let base = format!("http://{address}");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .get(format!("{base}/readyz"))
        .send()
        .await
        .map(|response| !response.status().is_success())
        .unwrap_or(true)
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the benchmark server did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut target = Target {
        origin: base.clone(),
        base: format!("{base}/fhir"),
        client_id,
        secret,
        token: String::new(),
        client,
    };
    target.refresh_token().await?;
    Ok(target)
}

/// Loads patients `from..to`; returns their Patient ids and how many resources were stored.
async fn load(target: &Target, from: usize, to: usize) -> anyhow::Result<(Vec<String>, usize)> {
    let gate = Arc::new(Semaphore::new(LOADERS));
    let mut tasks = Vec::new();
    for index in from..to {
        let permit = Arc::clone(&gate).acquire_owned().await?;
        let client = target.client.clone();
        let url = target.base.clone();
        let token = target.token.clone();
        tasks.push(tokio::spawn(async move {
            let patient = synthetic_patient(1, index);
            let response = client
                .post(&url)
                .bearer_auth(&token)
                .json(&patient.bundle)
                .send()
                .await?;
            anyhow::ensure!(
                response.status().is_success(),
                "transaction refused: {}",
                response.status()
            );
            let answer: Value = response.json().await?;
            drop(permit);
            let location = answer["entry"][0]["response"]["location"]
                .as_str()
                .unwrap_or_default();
            let id = location.split('/').nth(1).unwrap_or_default().to_owned();
            anyhow::Ok((id, patient.resource_count))
        }));
    }
    let mut ids = Vec::with_capacity(tasks.len());
    let mut resources = 0;
    for task in tasks {
        let (id, count) = task.await??;
        ids.push(id);
        resources += count;
    }
    Ok((ids, resources))
}

async fn total(target: &Target, resource_type: &str) -> anyhow::Result<u64> {
    let answer: Value = target
        .client
        .get(format!("{}/{resource_type}?_summary=count", target.base))
        .bearer_auth(&target.token)
        .send()
        .await?
        .json()
        .await?;
    Ok(answer["total"].as_u64().unwrap_or(0))
}

async fn measure_creates(target: &Target, label: &str, json_output: bool) -> anyhow::Result<()> {
    let count = 2000;
    let started = Instant::now();
    run_concurrently(count, |index| {
        let request = target
            .client
            .post(format!("{}/Observation", target.base))
            .bearer_auth(&target.token)
            .header("prefer", "return=minimal")
            .json(&json!({"resourceType": "Observation", "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                "valueQuantity": {"value": index % 120, "unit": "/min"}}));
        async move { expect_success(request.send().await?) }
    })
    .await?;
    report(
        json_output,
        &format!("{label}: creates ({CONCURRENCY} concurrent)"),
        count as f64 / started.elapsed().as_secs_f64(),
        "creates/s",
    );
    Ok(())
}

async fn measure_reads(
    target: &Target,
    label: &str,
    patient_ids: &[String],
    json_output: bool,
) -> anyhow::Result<()> {
    let count = 5000;
    let started = Instant::now();
    run_concurrently(count, |index| {
        let id = &patient_ids[(index * 7919) % patient_ids.len()];
        let request = target
            .client
            .get(format!("{}/Patient/{id}", target.base))
            .bearer_auth(&target.token);
        async move { expect_success(request.send().await?) }
    })
    .await?;
    report(
        json_output,
        &format!("{label}: patient reads ({CONCURRENCY} concurrent)"),
        count as f64 / started.elapsed().as_secs_f64(),
        "reads/s",
    );
    Ok(())
}

async fn measure_searches(
    target: &Target,
    label: &str,
    patient_ids: &[String],
    json_output: bool,
) -> anyhow::Result<()> {
    let sample = synthetic_patient(1, patient_ids.len() / 2);
    let patient_id = &patient_ids[patient_ids.len() / 2];
    let searches = [
        (
            "Patient?family=<prefix>",
            format!("Patient?family={}", &sample.identity.family[..4]),
        ),
        (
            "Patient?identifier=<system|mrn>",
            format!(
                "Patient?identifier=urn:oid:2.16.840.1.113883.19.5|{}",
                sample.identity.medical_record_number
            ),
        ),
        (
            "Observation?patient=<id>",
            format!("Observation?patient={patient_id}"),
        ),
        (
            "Observation?patient=<id>&code=<loinc>&_sort=-date",
            format!("Observation?patient={patient_id}&code=http://loinc.org|8867-4&_sort=-date"),
        ),
        (
            "Observation?code=<loinc>&date=ge2023&_count=50",
            "Observation?code=http://loinc.org|2339-0&date=ge2023-01-01&_count=50".to_owned(),
        ),
        (
            "Condition?code=<snomed>&_summary=count",
            "Condition?code=http://snomed.info/sct|44054006&_summary=count".to_owned(),
        ),
        (
            "Observation?subject.family=<prefix> (chained)",
            format!(
                "Observation?subject.family={}&_count=20",
                &sample.identity.family[..5]
            ),
        ),
    ];
    for (name, path) in searches {
        let mut latencies = Vec::with_capacity(SEARCH_ROUNDS);
        for _ in 0..SEARCH_ROUNDS {
            let started = Instant::now();
            let response = target
                .client
                .get(format!("{}/{path}", target.base))
                .bearer_auth(&target.token)
                .send()
                .await?;
            expect_success(response)?;
            latencies.push(started.elapsed());
        }
        latencies.sort();
        let percentile = |fraction: f64| {
            latencies[((latencies.len() as f64 * fraction) as usize).min(latencies.len() - 1)]
                .as_secs_f64()
                * 1000.0
        };
        report(
            json_output,
            &format!("{label}: search {name} p50"),
            percentile(0.50),
            "ms",
        );
        report(
            json_output,
            &format!("{label}: search {name} p99"),
            percentile(0.99),
            "ms",
        );
    }
    Ok(())
}

fn expect_success(response: reqwest::Response) -> anyhow::Result<()> {
    anyhow::ensure!(
        response.status().is_success(),
        "request failed: {}",
        response.status()
    );
    Ok(())
}

async fn run_concurrently<F, Fut>(count: usize, make: F) -> anyhow::Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    use futures::StreamExt;
    let mut stream = futures::stream::iter((0..count).map(make)).buffer_unordered(CONCURRENCY);
    while let Some(result) = stream.next().await {
        result?;
    }
    Ok(())
}

fn report(json_output: bool, name: &str, value: f64, unit: &str) {
    if json_output {
        println!("{}", json!({"name": name, "value": value, "unit": unit}));
    } else {
        println!("{name:<88} {value:>10.1} {unit}");
    }
}
