//! Glastonbury's FHIR server driven by fhir-sdk's Rust client (R4B models, the closest it has
//! to R4): create, read, versioned update with a stale version refused, search with paging
//! followed through the links, a transaction whose `urn:uuid:` reference is rewritten, history
//! and delete. The binary is the one the workspace build put in `target/debug`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use fhir_sdk::client::{Client, RequestSettings, ResourceWrite, SearchParameters};
use fhir_sdk::header;
use fhir_sdk::r4b::codes::EncounterStatus;
use fhir_sdk::r4b::resources::{Encounter, Patient, Resource, ResourceType};
use fhir_sdk::r4b::types::{Coding, HumanName, Reference};
use fhir_sdk::version::FhirR4B;
use futures::TryStreamExt;

/// The `glastonbury` binary of this workspace's build.
fn binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("debug/glastonbury")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .unwrap()
}

/// A running appliance on its own data directory, stopped when dropped.
struct Appliance {
    child: Child,
    base_url: String,
    environment: Vec<(String, String)>,
    _data: tempfile::TempDir,
}

impl Drop for Appliance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Appliance {
    fn start() -> Self {
        let data = tempfile::tempdir().unwrap();
        let port = free_port();
        let environment = vec![
            (
                "GLASTONBURY_DATA_DIR".to_owned(),
                data.path().join("data").display().to_string(),
            ),
            (
                "GLASTONBURY_HTTP_ADDR".to_owned(),
                format!("127.0.0.1:{port}"),
            ),
            (
                "GLASTONBURY_DICOM_ADDR".to_owned(),
                format!("127.0.0.1:{}", free_port()),
            ),
            ("GLASTONBURY_LOG_FORMAT".to_owned(), "json".to_owned()),
        ];
        let log_path = data.path().join("serve.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(binary())
            .arg("serve")
            .envs(environment.iter().cloned())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|error| panic!("{} must be built first: {error}", binary().display()));
        let mut appliance = Self {
            child,
            base_url: format!("http://127.0.0.1:{port}"),
            environment,
            _data: data,
        };
        appliance.wait_listening(port, &log_path);
        appliance
    }

    /// Waits until the server accepts connections (it initializes the data directory first, so
    /// no other command may touch it before).
    fn wait_listening(&mut self, port: u16, log_path: &std::path::Path) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = self.child.try_wait().unwrap();
            if exited.is_some() || Instant::now() > deadline {
                panic!(
                    "the server did not start: {}",
                    std::fs::read_to_string(log_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn command(&self, arguments: &[&str]) -> std::process::Output {
        Command::new(binary())
            .args(arguments)
            .envs(self.environment.iter().cloned())
            .output()
            .unwrap()
    }

    /// A bearer token of a clinician client with these SMART scopes (retried until the server
    /// answers).
    fn token(&self, scopes: &[&str]) -> String {
        let mut arguments = vec![
            "clients",
            "create",
            "--name",
            "sdk",
            "--role",
            "clinician",
            "--json",
        ];
        for scope in scopes {
            arguments.extend(["--scope", scope]);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let created = loop {
            let output = self.command(&arguments);
            if output.status.success() {
                break serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap();
            }
            assert!(Instant::now() < deadline, "{output:?}");
            std::thread::sleep(Duration::from_millis(200));
        };
        let client_id = created["client_id"].as_str().unwrap().to_owned();
        let secret = format!("--secret={}", created["client_secret"].as_str().unwrap());
        loop {
            let output = self.command(&[
                "token",
                "--client",
                &client_id,
                &secret,
                "--server",
                &self.base_url,
            ]);
            if output.status.success() {
                return String::from_utf8(output.stdout).unwrap().trim().to_owned();
            }
            assert!(Instant::now() < deadline, "{output:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn client(&self, token: &str) -> Client<FhirR4B> {
        let settings = RequestSettings::default().header(
            header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        Client::builder()
            .base_url(format!("{}/fhir/", self.base_url).parse().unwrap())
            .request_settings(settings)
            .build()
            .unwrap()
    }
}

fn patient(family: &str) -> Patient {
    Patient::builder()
        .active(true)
        .name(vec![Some(
            HumanName::builder()
                .family(family.to_owned())
                .build()
                .unwrap(),
        )])
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fhir_sdk_client_creates_reads_updates_searches_transacts_and_deletes() {
    let appliance = Appliance::start();
    let token = appliance.token(&["system/Patient.cruds", "system/Encounter.cruds"]);
    let client = appliance.client(&token);

    // Create and read back.
    let mut created = patient("Rustacean");
    let id = created.create(&client).await.unwrap();
    let read: Patient = client.read(&id).await.unwrap().expect("the patient exists");
    assert_eq!(
        read.name[0].as_ref().unwrap().family.as_deref(),
        Some("Rustacean")
    );
    assert_eq!(read.active, Some(true));

    // A versioned update, then one with the version it no longer has: refused.
    let stale = created.clone();
    created.active = Some(false);
    created.update(true, &client).await.unwrap();
    assert!(
        stale.clone().update(true, &client).await.is_err(),
        "an update with a stale version must be refused"
    );
    let read: Patient = client.read(&id).await.unwrap().unwrap();
    assert_eq!(read.active, Some(false));

    // Search, with pages of 5 followed through the server's links.
    let mut batch = client.batch();
    for _ in 0..11 {
        batch.create(patient("Pagewalker"));
    }
    batch.send().await.unwrap();
    let found: Vec<Patient> = client
        .search(
            SearchParameters::empty()
                .and_raw("family", "pagewalk")
                .and_raw("_count", "5"),
        )
        .await
        .unwrap()
        .all_matches()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(found.len(), 11);
    let mut ids: Vec<_> = found.iter().filter_map(|found| found.id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 11, "every match once");

    // A transaction: the encounter's reference to the new patient is rewritten to its id.
    let mut transaction = client.transaction();
    let patient_reference = transaction.create(patient("Transacted"));
    transaction.create(
        Encounter::builder()
            .status(EncounterStatus::Planned)
            .class(
                Coding::builder()
                    .system("http://terminology.hl7.org/CodeSystem/v3-ActCode".to_owned())
                    .code("AMB".to_owned())
                    .build()
                    .unwrap(),
            )
            .subject(
                Reference::builder()
                    .reference(patient_reference.clone())
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap(),
    );
    let answer = transaction.send().await.unwrap();
    let entries: Vec<_> = answer.0.entry.into_iter().flatten().collect();
    assert_eq!(entries.len(), 2);
    let encounter_location = entries[1]
        .response
        .as_ref()
        .and_then(|response| response.location.clone())
        .expect("the encounter's location");
    let encounter_id = encounter_location
        .split('/')
        .nth(1)
        .expect("Encounter/<id>/_history/<version>")
        .to_owned();
    let encounter: Encounter = client.read(&encounter_id).await.unwrap().unwrap();
    let subject = encounter
        .subject
        .as_ref()
        .and_then(|subject| subject.reference.clone())
        .expect("the encounter has a subject");
    assert!(subject.starts_with("Patient/"), "{subject}");
    assert_ne!(subject, patient_reference);
    let subject_reference = Reference::builder().reference(subject).build().unwrap();
    let Resource::Patient(subject_patient) =
        client.read_referenced(&subject_reference).await.unwrap()
    else {
        panic!("the subject is a patient");
    };
    assert_eq!(
        subject_patient.name[0].as_ref().unwrap().family.as_deref(),
        Some("Transacted")
    );

    // History has every version; after a delete the read finds nothing.
    let versions: Vec<Resource> = client
        .history::<Patient>(Some(&id))
        .await
        .unwrap()
        .all_entries()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(versions.len(), 2);
    client.delete(ResourceType::Patient, &id).await.unwrap();
    assert!(client.read::<Patient>(&id).await.unwrap().is_none());
}
