//! FHIR Bulk Data export (`$export`, asynchronous pattern) end to end through the real binary:
//! kick-off at system, Patient and Group level with `_type`, `_since` and `_typeFilter`,
//! polling, the manifest, NDJSON downloads for the requesting client only, encryption at rest,
//! the accounting of disclosures, cancellation, expiry, and the researcher's de-identified export.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::files_under;
use crate::e2e_fhir::{Engine, FhirServer, Reply, load_population};

/// A finished export: its status URL and manifest.
struct Finished {
    status_url: String,
    manifest: Value,
}

fn kick_off(fhir: &FhirServer, token: &str, path_and_query: &str) -> Reply {
    fhir.send_as(
        token,
        fhir.client
            .get(fhir.url(path_and_query))
            .header("accept", "application/fhir+json")
            .header("prefer", "respond-async"),
    )
}

/// Starts an export and polls its status until the manifest arrives.
fn export(fhir: &FhirServer, token: &str, path_and_query: &str) -> Finished {
    let accepted = kick_off(fhir, token, path_and_query);
    assert_eq!(accepted.status, 202, "{path_and_query}: {}", accepted.body);
    let status_url = accepted
        .header("content-location")
        .expect("Content-Location");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let reply = fhir.send_as(token, fhir.client.get(&status_url));
        match reply.status {
            202 => {
                assert!(
                    reply.header("retry-after").is_some(),
                    "202 says when to come back"
                );
                assert!(reply.header("x-progress").is_some());
            }
            200 => {
                assert!(
                    reply
                        .header("content-type")
                        .is_some_and(|value| value.starts_with("application/json"))
                );
                assert!(reply.header("expires").is_some());
                return Finished {
                    status_url,
                    manifest: reply.body,
                };
            }
            other => panic!("status {other}: {}", reply.body),
        }
        assert!(Instant::now() < deadline, "the export did not finish");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The resources of every file of `resource_type` in a manifest, downloaded as `token`.
fn download(fhir: &FhirServer, token: &str, manifest: &Value, resource_type: &str) -> Vec<Value> {
    let mut resources = Vec::new();
    for output in manifest["output"].as_array().unwrap() {
        if output["type"] != resource_type {
            continue;
        }
        let response = fhir
            .client
            .get(output["url"].as_str().unwrap())
            .bearer_auth(token)
            .header("accept", "application/fhir+ndjson")
            .send()
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "application/fhir+ndjson"
        );
        let text = response.text().unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).expect("one resource per line"))
            .collect();
        assert_eq!(lines.len() as u64, output["count"].as_u64().unwrap());
        resources.extend(lines);
    }
    for resource in &resources {
        assert_eq!(resource["resourceType"], resource_type);
    }
    resources
}

fn ids(resources: &[Value]) -> BTreeSet<String> {
    resources
        .iter()
        .map(|resource| resource["id"].as_str().unwrap().to_owned())
        .collect()
}

fn exported_types(manifest: &Value) -> BTreeSet<String> {
    manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|output| output["type"].as_str().unwrap().to_owned())
        .collect()
}

fn job_folder(fhir: &FhirServer, status_url: &str) -> PathBuf {
    let job = status_url.rsplit('/').next().unwrap();
    fhir.workspace
        .path()
        .join("data")
        .join("blobs")
        .join("exports")
        .join(job)
}

fn files_in(folder: &Path) -> usize {
    files_under(folder).len()
}

fn bulk_export_at_every_level(engine: Engine) {
    let Some(fhir) = FhirServer::start(engine) else {
        return;
    };
    let population = load_population(&fhir, 21, 6);
    let organization =
        fhir.create(&json!({"resourceType": "Organization", "name": "Glastonbury Clinic"}));

    // Kick-offs the specification says to refuse.
    let without_prefer = fhir.get("$export");
    assert_eq!(without_prefer.status, 400, "{}", without_prefer.body);
    assert_eq!(without_prefer.body["resourceType"], "OperationOutcome");
    assert_eq!(
        kick_off(&fhir, &fhir.token, "$export?_outputFormat=text/csv").status,
        400
    );
    assert_eq!(
        kick_off(&fhir, &fhir.token, "$export?_type=NotAType").status,
        400
    );
    assert_eq!(
        kick_off(&fhir, &fhir.token, "$export?includeAssociatedData=x").status,
        400
    );
    assert_eq!(
        kick_off(
            &fhir,
            &fhir.token,
            "$export?_typeFilter=Observation?nonsense=1"
        )
        .status,
        400
    );

    // System level, two types.
    let system = export(&fhir, &fhir.token, "$export?_type=Patient,Observation");
    let manifest = &system.manifest;
    assert_eq!(manifest["requiresAccessToken"], true);
    assert!(manifest["transactionTime"].as_str().is_some());
    assert_eq!(
        manifest["request"],
        fhir.url("$export?_type=Patient,Observation").as_str()
    );
    assert_eq!(
        exported_types(manifest),
        BTreeSet::from(["Observation".to_owned(), "Patient".to_owned()])
    );
    let patients = download(&fhir, &fhir.token, manifest, "Patient");
    assert_eq!(
        ids(&patients),
        population.iter().map(|(_, id)| id.clone()).collect()
    );
    let observations = download(&fhir, &fhir.token, manifest, "Observation");
    assert_eq!(observations.len() as u64, fhir.total("Observation", ""));
    assert!(observations[0]["meta"]["lastUpdated"].is_string());
    let family = &population[0].0.identity.family;
    assert!(
        patients
            .iter()
            .any(|patient| patient.to_string().contains(family.as_str())),
        "a clinician's export is identified"
    );

    // Encrypted at rest; the files exist only for their job.
    let folder = job_folder(&fhir, &system.status_url);
    assert_eq!(files_in(&folder), 2);
    for file in files_under(&folder) {
        let bytes = std::fs::read(&file).unwrap();
        assert!(bytes.starts_with(b"age-encryption.org/v1"));
        assert!(!String::from_utf8_lossy(&bytes).contains(family.as_str()));
    }

    // Only the client that asked may poll or download.
    let other = fhir.server.token_for("clinician", &["system/*.cruds"]);
    assert_eq!(
        fhir.send_as(&other, fhir.client.get(&system.status_url))
            .status,
        404
    );
    let first_file = manifest["output"][0]["url"].as_str().unwrap();
    assert_eq!(
        fhir.send_as(&other, fhir.client.get(first_file)).status,
        404
    );
    assert_eq!(
        fhir.client
            .get(first_file)
            .send()
            .unwrap()
            .status()
            .as_u16(),
        401
    );

    // The export is in every exported patient's accounting of disclosures.
    let (_, first_patient) = &population[0];
    let accounting = fhir.server.command(&[
        "audit",
        "disclosures",
        "--patient",
        first_patient,
        "--all",
        "--json",
    ]);
    assert!(accounting.status.success());
    assert!(
        String::from_utf8_lossy(&accounting.stdout).contains("bulk-export"),
        "{}",
        String::from_utf8_lossy(&accounting.stdout)
    );

    // DELETE destroys the files at once.
    let cancelled = fhir.send_as(&fhir.token, fhir.client.delete(&system.status_url));
    assert_eq!(cancelled.status, 202);
    assert_eq!(
        fhir.send_as(&fhir.token, fhir.client.get(&system.status_url))
            .status,
        404
    );
    assert_eq!(
        fhir.send_as(&fhir.token, fhir.client.get(first_file))
            .status,
        404
    );
    assert_eq!(files_in(&folder), 0);

    // Patient level: only records that belong to a patient.
    let patient_level = export(&fhir, &fhir.token, "Patient/$export");
    let types = exported_types(&patient_level.manifest);
    assert!(
        types.contains("Patient") && types.contains("Observation") && types.contains("Condition")
    );
    assert!(!types.contains("Organization"));
    let whole_system = export(&fhir, &fhir.token, "$export?_type=Organization");
    assert_eq!(
        ids(&download(
            &fhir,
            &fhir.token,
            &whole_system.manifest,
            "Organization"
        )),
        BTreeSet::from([organization])
    );

    // Group level: the members' records only.
    let members: Vec<&String> = population.iter().map(|(_, id)| id).take(2).collect();
    let group = fhir.create(&json!({"resourceType": "Group", "type": "person", "actual": true,
        "member": members.iter().map(|id| json!({"entity": {"reference": format!("Patient/{id}")}})).collect::<Vec<_>>()}));
    let group_export = export(
        &fhir,
        &fhir.token,
        &format!("Group/{group}/$export?_type=Patient,Observation"),
    );
    assert_eq!(
        ids(&download(
            &fhir,
            &fhir.token,
            &group_export.manifest,
            "Patient"
        )),
        members.iter().map(|id| (*id).clone()).collect()
    );
    let member_observations: u64 = members
        .iter()
        .map(|id| fhir.total("Observation", &format!("subject=Patient/{id}")))
        .sum();
    assert_eq!(
        download(&fhir, &fhir.token, &group_export.manifest, "Observation").len() as u64,
        member_observations
    );
    assert_eq!(
        kick_off(&fhir, &fhir.token, "Group/no-such-group/$export").status,
        404
    );

    // _since: only what changed afterwards.
    std::thread::sleep(Duration::from_millis(1100));
    let since = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let mut changed = observations[0].clone();
    changed["status"] = json!("amended");
    let id = changed["id"].as_str().unwrap().to_owned();
    assert_eq!(fhir.put(&format!("Observation/{id}"), &changed).status, 200);
    let recent = export(
        &fhir,
        &fhir.token,
        &format!("$export?_type=Observation&_since={}", urlencode(&since)),
    );
    assert_eq!(
        ids(&download(
            &fhir,
            &fhir.token,
            &recent.manifest,
            "Observation"
        )),
        BTreeSet::from([id])
    );

    // _typeFilter: the same search engine decides.
    let filtered = export(
        &fhir,
        &fhir.token,
        &format!(
            "$export?_type=Observation&_typeFilter={}",
            urlencode("Observation?code=http://loinc.org|8867-4")
        ),
    );
    assert_eq!(
        download(&fhir, &fhir.token, &filtered.manifest, "Observation").len() as u64,
        fhir.total("Observation", "code=http://loinc.org|8867-4")
    );

    // POST kick-off with a Parameters body.
    let posted = fhir.send(
        fhir.client
            .post(fhir.url("$export"))
            .header("prefer", "respond-async")
            .header("content-type", "application/fhir+json")
            .body(
                json!({"resourceType": "Parameters", "parameter": [
                    {"name": "_type", "valueString": "Patient"},
                    {"name": "_outputFormat", "valueString": "application/fhir+ndjson"},
                ]})
                .to_string(),
            ),
    );
    assert_eq!(posted.status, 202, "{}", posted.body);
}

fn urlencode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

#[test]
fn bulk_export_at_every_level_on_sqlite() {
    bulk_export_at_every_level(Engine::Sqlite);
}

#[test]
fn bulk_export_at_every_level_on_postgres() {
    bulk_export_at_every_level(Engine::Postgres);
}

#[test]
fn researchers_export_deidentified_linked_data() {
    let fhir = FhirServer::start(Engine::Sqlite).unwrap();
    let population = load_population(&fhir, 22, 4);
    let researcher = fhir.server.token_for("researcher", &["system/*.rs"]);
    let finished = export(&fhir, &researcher, "$export?_type=Patient,Observation");
    let patients = download(&fhir, &researcher, &finished.manifest, "Patient");
    let observations = download(&fhir, &researcher, &finished.manifest, "Observation");
    assert_eq!(patients.len(), population.len());
    let text = format!("{patients:?}{observations:?}");
    for (patient, id) in &population {
        for needle in [
            &patient.identity.family,
            &patient.identity.medical_record_number,
            &patient.identity.phone,
            &patient.identity.birth_date,
            id,
        ] {
            assert!(
                !text.contains(needle.as_str()),
                "{needle} in a de-identified export"
            );
        }
    }
    // Still linked: every observation's subject is one of the exported (pseudonymous) patients.
    let patient_references: BTreeSet<String> = ids(&patients)
        .into_iter()
        .map(|id| format!("Patient/{id}"))
        .collect();
    for observation in &observations {
        assert!(patient_references.contains(observation["subject"]["reference"].as_str().unwrap()));
        assert!(
            observation["meta"]["security"]
                .to_string()
                .contains("PSEUDED")
        );
    }
    // A researcher may not export what policy gives them no view of.
    let narrow = fhir
        .server
        .token_for("researcher", &["system/Observation.rs"]);
    assert_eq!(
        kick_off(&fhir, &narrow, "$export?_type=Patient").status,
        403
    );
    let device = fhir.server.token_for("device", &["system/Observation.c"]);
    assert_eq!(kick_off(&fhir, &device, "$export").status, 403);
}

#[test]
fn expired_exports_are_destroyed() {
    let fhir = FhirServer::start_with(
        Engine::Sqlite,
        &[("GLASTONBURY_BULK_EXPORT_EXPIRY_SECONDS", "2")],
    )
    .unwrap();
    load_population(&fhir, 23, 2);
    let finished = export(&fhir, &fhir.token, "$export?_type=Patient");
    let folder = job_folder(&fhir, &finished.status_url);
    assert_eq!(files_in(&folder), 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    while files_in(&folder) > 0 {
        assert!(
            Instant::now() < deadline,
            "the expired export's files are still there"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The purge deletes the files, shreds the job's key, then forgets the job: in between, the
    // status answers 410 Gone; once it is done, 404.
    loop {
        let status = fhir.send(fhir.client.get(&finished.status_url)).status;
        if status == 404 {
            break;
        }
        assert_eq!(
            status, 410,
            "an expired export answers Gone until it is forgotten"
        );
        assert!(
            Instant::now() < deadline,
            "the expired export is still listed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
