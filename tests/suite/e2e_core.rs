//! End-to-end checks of the appliance core through the real `glastonbury` binary and real clients.
//!
//! Every test owns its temporary data dir (and ports), so they run in parallel. The server's log
//! lands next to the data dir inside the same temporary folder.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use serde_json::{Value, json};

use crate::common::{Server, TemporaryPostgres, binary, files_under, postgres_admin_url};

/// The prefix of every PHI marker; scans look for it in any letter case.
const MARKER_PREFIX: &str = "Qxzmarker";

const CLINICIAN_SCOPE: &str = "system/*.cruds";

const SSN_SYSTEM: &str = "urn:oid:2.16.840.1.113883.4.1";

// ---------------------------------------------------------------------------------------------
// Fixtures

/// A temporary folder holding `data/` (the data dir) and the server logs beside it.
#[derive(Debug)]
struct Workspace {
    root: tempfile::TempDir,
}

impl Workspace {
    fn new() -> Self {
        Self {
            root: tempfile::tempdir().unwrap(),
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    fn master_key(&self) -> PathBuf {
        self.data_dir().join("keys/master.key")
    }

    fn database_file(&self) -> PathBuf {
        self.data_dir().join("glastonbury.db")
    }

    fn record_blobs(&self) -> Vec<PathBuf> {
        files_under(&self.data_dir().join("blobs/records"))
    }
}

/// An HTTP client holding a clinician token for one server.
#[derive(Debug, Clone)]
struct Fhir {
    client: Client,
    base_url: String,
    token: String,
}

/// One HTTP answer: status, ETag, Location and the JSON body (Null when not JSON).
#[derive(Debug)]
struct Answer {
    status: u16,
    etag: Option<String>,
    location: Option<String>,
    body: Value,
}

impl Fhir {
    fn connect(server: &Server) -> Self {
        Self {
            client: Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            base_url: server.base_url.clone(),
            token: server.token_for("clinician", &[CLINICIAN_SCOPE]),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/fhir/{path}", self.base_url)
    }

    fn send(&self, request: reqwest::blocking::RequestBuilder) -> Answer {
        let response = request.bearer_auth(&self.token).send().unwrap();
        answer_of(response)
    }

    fn try_create(&self, resource: &Value) -> reqwest::Result<Answer> {
        let resource_type = resource["resourceType"].as_str().unwrap();
        let response = self
            .client
            .post(self.url(resource_type))
            .bearer_auth(&self.token)
            .header("content-type", "application/fhir+json")
            .body(resource.to_string())
            .send()?;
        Ok(answer_of(response))
    }

    /// Creates a resource, checks the 201 answer and returns the new id.
    fn create(&self, resource: &Value) -> String {
        let answer = self.try_create(resource).unwrap();
        assert_eq!(answer.status, 201, "create failed: {}", answer.body);
        assert_eq!(answer.etag.as_deref(), Some("W/\"1\""));
        let id = answer.body["id"].as_str().unwrap().to_owned();
        let resource_type = resource["resourceType"].as_str().unwrap();
        let location = answer.location.unwrap_or_default();
        assert!(
            location.starts_with(&format!("/fhir/{resource_type}/{id}")),
            "{location}"
        );
        id
    }

    fn read(&self, resource_type: &str, id: &str) -> Answer {
        self.send(self.client.get(self.url(&format!("{resource_type}/{id}"))))
    }

    fn read_path(&self, path: &str) -> Answer {
        self.send(self.client.get(self.url(path)))
    }

    fn update(&self, resource: &Value, if_match: &str) -> Answer {
        let resource_type = resource["resourceType"].as_str().unwrap();
        let id = resource["id"].as_str().unwrap();
        let request = self
            .client
            .put(self.url(&format!("{resource_type}/{id}")))
            .header("content-type", "application/fhir+json")
            .header("if-match", if_match)
            .body(resource.to_string());
        self.send(request)
    }

    /// Reads a resource and asserts it equals what was written (ignoring server `meta`).
    fn assert_reads_back(&self, written: &Value, id: &str) {
        let resource_type = written["resourceType"].as_str().unwrap();
        let answer = self.read(resource_type, id);
        assert_eq!(answer.status, 200, "{resource_type}/{id}: {}", answer.body);
        assert_eq!(
            without_meta(answer.body),
            with_id(written, id),
            "{resource_type}/{id}"
        );
    }
}

fn answer_of(response: reqwest::blocking::Response) -> Answer {
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    let status = response.status().as_u16();
    let etag = header("etag");
    let location = header("location");
    let body = serde_json::from_slice(&response.bytes().unwrap()).unwrap_or(Value::Null);
    Answer {
        status,
        etag,
        location,
        body,
    }
}

fn with_id(resource: &Value, id: &str) -> Value {
    let mut copy = resource.clone();
    copy["id"] = Value::String(id.to_owned());
    copy
}

fn without_meta(mut resource: Value) -> Value {
    if let Some(object) = resource.as_object_mut() {
        object.remove("meta");
    }
    resource
}

/// A marker string that cannot occur by chance: the prefix, a tag and a random fragment.
fn marker(tag: &str) -> String {
    let fragment = uuid::Uuid::new_v4().simple().to_string();
    format!("{MARKER_PREFIX}{tag}{}", &fragment[..12])
}

fn patient_reference(id: &str) -> Value {
    json!({ "reference": format!("Patient/{id}") })
}

// ---------------------------------------------------------------------------------------------
// Processes

/// Sends SIGTERM (through the `kill` command) and waits for the process to exit.
fn stop_gracefully(server: &mut Server) -> ExitStatus {
    let pid = server.child.id().to_string();
    let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(sent.success(), "kill -TERM {pid} failed");
    wait_for_exit(&mut server.child, Duration::from_secs(30))
}

fn wait_for_exit(child: &mut Child, patience: Duration) -> ExitStatus {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start_server(workspace: &Workspace, environment: &[(&str, &str)]) -> Server {
    Server::start(&workspace.data_dir(), environment)
}

/// Runs `glastonbury` with exactly these `GLASTONBURY_*` variables (others are removed) in the
/// workspace folder, so no stray `glastonbury.toml` is picked up.
fn glastonbury(workspace: &Workspace, arguments: &[&str], environment: &[(&str, &str)]) -> Output {
    let mut command = Command::new(binary());
    command.args(arguments).current_dir(workspace.root.path());
    for (name, _) in std::env::vars() {
        if name.starts_with("GLASTONBURY_") {
            command.env_remove(name);
        }
    }
    command.envs(environment.iter().copied()).output().unwrap()
}

fn data_dir_environment(workspace: &Workspace) -> Vec<(&'static str, String)> {
    vec![(
        "GLASTONBURY_DATA_DIR",
        workspace.data_dir().display().to_string(),
    )]
}

fn as_pairs<'a>(environment: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    environment
        .iter()
        .map(|(name, value)| (*name, value.as_str()))
        .collect()
}

fn stdout_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn assert_succeeded(output: &Output) {
    assert!(
        output.status.success(),
        "command failed: {}",
        stderr_of(output)
    );
}

/// The CLI contract: non-zero exit and exactly one non-empty stderr line, `error: …`, naming
/// the problem (every `needle` appears in it, ignoring case).
fn assert_one_error_line(output: &Output, needles: &[&str]) {
    let stderr = stderr_of(output);
    assert!(
        !output.status.success(),
        "expected failure; stderr: {stderr}"
    );
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "expected exactly one stderr line, got: {stderr}"
    );
    assert!(lines[0].starts_with("error:"), "{stderr}");
    let lower = lines[0].to_lowercase();
    for needle in needles {
        assert!(
            lower.contains(&needle.to_lowercase()),
            "{needle:?} not named in: {stderr}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Marker scanning

/// Where `needle` occurs in `haystack`, ignoring ASCII case.
fn positions_ignoring_case(haystack: &[u8], needle: &[u8]) -> Vec<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return Vec::new();
    }
    let first = needle[0].to_ascii_lowercase();
    (0..=haystack.len() - needle.len())
        .filter(|&start| haystack[start].to_ascii_lowercase() == first)
        .filter(|&start| haystack[start..start + needle.len()].eq_ignore_ascii_case(needle))
        .collect()
}

/// Every hit of a marker in `bytes`, ignoring ASCII case (so as written and lower-cased): the
/// common prefix and each full marker, described with some context.
fn marker_hits(source: &str, bytes: &[u8], markers: &[String]) -> Vec<String> {
    let mut needles: Vec<&[u8]> = vec![MARKER_PREFIX.as_bytes()];
    needles.extend(markers.iter().map(|marker| marker.as_bytes()));
    let mut hits = Vec::new();
    for needle in &needles {
        for start in positions_ignoring_case(bytes, needle) {
            let end = (start + 40).min(bytes.len());
            let context = String::from_utf8_lossy(&bytes[start..end]);
            hits.push(format!("{source} @{start}: {context}"));
        }
    }
    hits
}

/// Hex text of the prefix, as `pg_dump` writes `bytea` columns.
fn hex_marker_hits(source: &str, bytes: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    for variant in [MARKER_PREFIX.to_owned(), MARKER_PREFIX.to_lowercase()] {
        let hex: String = variant.bytes().map(|byte| format!("{byte:02x}")).collect();
        for start in positions_ignoring_case(bytes, hex.as_bytes()) {
            hits.push(format!("{source} @{start}: hex of {variant}"));
        }
    }
    hits
}

fn scan_files(files: &[PathBuf], markers: &[String]) -> Vec<String> {
    files
        .iter()
        .flat_map(|file| {
            let bytes = std::fs::read(file).unwrap();
            marker_hits(&file.display().to_string(), &bytes, markers)
        })
        .collect()
}

#[test]
fn marker_scan_finds_plain_lowercase_and_hex_markers() {
    let planted = marker("Probe");
    let bytes = format!("..{planted}..{}..", planted.to_lowercase()).into_bytes();
    assert_eq!(
        marker_hits("probe", &bytes, std::slice::from_ref(&planted)).len(),
        4
    );
    assert!(marker_hits("probe", b"nothing here", &[planted]).is_empty());
    let hex: String = MARKER_PREFIX
        .to_lowercase()
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        hex_marker_hits("probe", format!("\\x00{hex}00").as_bytes()).len(),
        1
    );
}

// ---------------------------------------------------------------------------------------------
// PHI workload

/// What the PHI workload wrote: every marker used and the final resources with their ids.
#[derive(Debug, Default)]
struct PhiWorkload {
    markers: Vec<String>,
    resources: Vec<(String, Value)>,
}

impl PhiWorkload {
    fn marker(&mut self, tag: &str) -> String {
        let value = marker(tag);
        self.markers.push(value.clone());
        value
    }

    fn patient(&mut self) -> Value {
        json!({
            "resourceType": "Patient",
            "identifier": [{"system": SSN_SYSTEM, "value": self.marker("Ssn")}],
            "name": [{"family": self.marker("Family"), "given": [self.marker("Given")]}],
            "telecom": [{"system": "phone", "value": self.marker("Phone")}],
            "address": [{"line": [self.marker("Street")], "city": self.marker("City")}],
            "birthDate": "1961-07-14",
        })
    }

    fn observation(&mut self, patient_id: &str) -> Value {
        json!({
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "heart rate"},
            "subject": patient_reference(patient_id),
            "valueQuantity": {"value": 72, "unit": "/min"},
            "note": [{"text": self.marker("Note")}],
        })
    }

    /// A Patient whose narrative alone is far above the 64 KiB inline limit.
    fn large_patient(&mut self) -> Value {
        let mut patient = self.patient();
        let sentence = format!("{} lives at the usual address. ", self.marker("Narrative"));
        let div = format!(
            "<div xmlns=\"http://www.w3.org/1999/xhtml\">{}</div>",
            sentence.repeat(120 * 1024 / sentence.len())
        );
        patient["text"] = json!({"status": "generated", "div": div});
        patient
    }

    fn create(&mut self, fhir: &Fhir, resource: Value) -> String {
        let id = fhir.create(&resource);
        self.resources.push((id.clone(), resource));
        id
    }
}

/// Creates patients, observations and a blob-sized record, reads them back, updates one and
/// checks versioning; returns what was written.
fn run_phi_workload(fhir: &Fhir, workspace: &Workspace) -> PhiWorkload {
    let mut workload = PhiWorkload::default();
    for _ in 0..3 {
        let patient = workload.patient();
        let patient_id = workload.create(fhir, patient);
        let observation = workload.observation(&patient_id);
        workload.create(fhir, observation);
    }
    let large = workload.large_patient();
    workload.create(fhir, large);
    assert!(
        !workspace.record_blobs().is_empty(),
        "the large record did not go to blobs/records"
    );
    for (id, resource) in &workload.resources {
        fhir.assert_reads_back(resource, id);
    }
    update_first_patient(fhir, &mut workload);
    workload
}

fn update_first_patient(fhir: &Fhir, workload: &mut PhiWorkload) {
    let (id, original) = workload.resources[0].clone();
    let mut changed = with_id(&original, &id);
    changed["name"][0]["family"] = Value::String(workload.marker("NewFamily"));
    let updated = fhir.update(&changed, "W/\"1\"");
    assert_eq!(updated.status, 200, "{}", updated.body);
    assert_eq!(updated.etag.as_deref(), Some("W/\"2\""));
    assert_eq!(
        fhir.update(&changed, "W/\"1\"").status,
        412,
        "a stale If-Match must fail"
    );
    fhir.assert_reads_back(&changed, &id);
    let first = fhir.read_path(&format!("Patient/{id}/_history/1"));
    assert_eq!(first.status, 200);
    assert_eq!(without_meta(first.body), with_id(&original, &id));
    let history = fhir.read_path(&format!("Patient/{id}/_history"));
    assert_eq!(history.status, 200);
    assert_eq!(history.body["total"], json!(2));
    workload.resources[0].1 = changed;
}

/// The markers must come back over the API, or the scan proves nothing.
fn assert_markers_served(fhir: &Fhir, workload: &PhiWorkload) {
    let mut served = String::new();
    for (id, resource) in &workload.resources {
        let resource_type = resource["resourceType"].as_str().unwrap();
        served.push_str(&fhir.read(resource_type, id).body.to_string());
        served.push_str(
            &fhir
                .read_path(&format!("{resource_type}/{id}/_history"))
                .body
                .to_string(),
        );
    }
    for marker in &workload.markers {
        assert!(
            served.contains(marker.as_str()),
            "marker {marker} not served by the API"
        );
    }
}

pub(crate) fn assert_no_hits(hits: &[String]) {
    assert!(
        hits.is_empty(),
        "PHI found in plaintext at rest or in logs:\n{}",
        hits.join("\n")
    );
}

pub(crate) fn pg_dump(url: &str) -> Vec<u8> {
    let output = Command::new("/usr/bin/pg_dump")
        .arg(format!("--dbname={url}"))
        .output()
        .unwrap();
    assert_succeeded(&output);
    assert!(output.stdout.len() > 1000, "pg_dump printed almost nothing");
    output.stdout
}

// ---------------------------------------------------------------------------------------------
// 1. PHI leak scan

#[test]
fn no_phi_at_rest_or_in_logs_on_sqlite() {
    let workspace = Workspace::new();
    let mut server = start_server(&workspace, &[]);
    let fhir = Fhir::connect(&server);
    let workload = run_phi_workload(&fhir, &workspace);
    assert_markers_served(&fhir, &workload);
    assert!(stop_gracefully(&mut server).success());

    let files = files_under(&workspace.data_dir());
    assert!(
        files.iter().any(|file| file.ends_with("glastonbury.db")),
        "{files:?}"
    );
    let mut hits = scan_files(&files, &workload.markers);
    hits.extend(marker_hits(
        "server log",
        server.log().as_bytes(),
        &workload.markers,
    ));
    assert_no_hits(&hits);
}

#[test]
fn no_phi_at_rest_or_in_logs_on_postgres() {
    let Some(admin_url) = postgres_admin_url() else {
        println!(
            "notice: GLASTONBURY_TEST_DATABASE_URL is not set; skipping the PostgreSQL PHI scan"
        );
        return;
    };
    let database = TemporaryPostgres::create(&admin_url);
    let workspace = Workspace::new();
    let mut server = start_server(&workspace, &[("GLASTONBURY_DATABASE_URL", &database.url)]);
    let fhir = Fhir::connect(&server);
    let workload = run_phi_workload(&fhir, &workspace);
    assert_markers_served(&fhir, &workload);
    assert!(stop_gracefully(&mut server).success());

    let dump = pg_dump(&database.url);
    let mut hits = scan_files(&files_under(&workspace.data_dir()), &workload.markers);
    hits.extend(marker_hits(
        "server log",
        server.log().as_bytes(),
        &workload.markers,
    ));
    hits.extend(marker_hits("pg_dump", &dump, &workload.markers));
    hits.extend(hex_marker_hits("pg_dump", &dump));
    assert_no_hits(&hits);
}

// ---------------------------------------------------------------------------------------------
// 2. Crash safety

const CRASH_WRITERS: usize = 4;
const CRASH_MAX_WRITES: usize = 200;

type Acknowledged = Arc<Mutex<Vec<(String, Value)>>>;

fn crash_observation(writer: usize, sequence: usize) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": format!("crash-{writer}-{sequence}")},
        "subject": patient_reference(&format!("crash-patient-{writer}")),
        "valueQuantity": {"value": writer * 100_000 + sequence, "unit": "1"},
    })
}

/// Creates Observations until a request fails or `stop` is set; records every 201.
fn write_until_stopped(fhir: &Fhir, writer: usize, acknowledged: &Acknowledged, stop: &AtomicBool) {
    for sequence in 0.. {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let resource = crash_observation(writer, sequence);
        let Ok(answer) = fhir.try_create(&resource) else {
            return;
        };
        if answer.status != 201 {
            return;
        }
        let id = answer.body["id"].as_str().unwrap().to_owned();
        acknowledged.lock().unwrap().push((id, resource));
    }
}

fn spawn_writers(
    server: &Server,
    acknowledged: &Acknowledged,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    let connected = Fhir::connect(server);
    (0..CRASH_WRITERS)
        .map(|writer| {
            let fhir = connected.clone();
            let acknowledged = Arc::clone(acknowledged);
            let stop = Arc::clone(stop);
            std::thread::spawn(move || write_until_stopped(&fhir, writer, &acknowledged, &stop))
        })
        .collect()
}

fn wait_for_writes(acknowledged: &Acknowledged, limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline && acknowledged.lock().unwrap().len() < CRASH_MAX_WRITES {
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let workspace = Workspace::new();
    let mut server = start_server(&workspace, &[]);
    let acknowledged: Acknowledged = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writers = spawn_writers(&server, &acknowledged, &stop);
    wait_for_writes(&acknowledged, Duration::from_millis(1500));
    server.kill_hard();
    stop.store(true, Ordering::SeqCst);
    for writer in writers {
        writer.join().unwrap();
    }
    drop(server);

    let written = acknowledged.lock().unwrap().clone();
    assert!(
        !written.is_empty(),
        "no write was acknowledged before the crash"
    );
    println!("{} writes acknowledged before SIGKILL", written.len());
    let restarted = start_server(&workspace, &[]);
    let fhir = Fhir::connect(&restarted);
    for (id, resource) in &written {
        fhir.assert_reads_back(resource, id);
    }
    assert_journal_survived_the_crash(&restarted, &written);
}

/// After a SIGKILL under load: fsck is clean and every acknowledged create has its audit entry.
fn assert_journal_survived_the_crash(server: &Server, written: &[(String, Value)]) {
    let fsck = server.command(&["audit", "fsck"]);
    assert!(
        fsck.status.success(),
        "fsck after the crash: {}",
        String::from_utf8_lossy(&fsck.stderr)
    );
    let officer = server.token_for("compliance", &[]);
    let client = Client::new();
    let mut journaled_creates = std::collections::HashSet::new();
    let mut next = Some("/audit?type=110110&limit=1000".to_owned());
    while let Some(path) = next {
        let page: Value = client
            .get(format!("{}{path}", server.base_url))
            .bearer_auth(&officer)
            .send()
            .unwrap()
            .json()
            .unwrap();
        for entry in page["entries"].as_array().unwrap() {
            let event = &entry["event"];
            if event["subtypes"][0]["code"] == "create" {
                let what = event["entities"][0]["resource_id"].as_str().unwrap();
                journaled_creates.insert(what.split('/').next().unwrap().to_owned());
            }
        }
        next = page["next"].as_str().map(str::to_owned);
    }
    for (id, _) in written {
        assert!(
            journaled_creates.contains(id),
            "acknowledged create {id} has no audit entry"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Bad input: one clear error line, nothing destroyed

/// A data dir initialized and holding one Patient; the server is stopped again.
fn initialized_with_patient(
    workspace: &Workspace,
    environment: &[(&str, &str)],
) -> (String, Value) {
    let mut server = start_server(workspace, environment);
    let fhir = Fhir::connect(&server);
    let patient = json!({"resourceType": "Patient", "name": [{"family": "Survivor"}]});
    let id = fhir.create(&patient);
    assert!(stop_gracefully(&mut server).success());
    assert_wal_checkpointed(workspace);
    (id, patient)
}

/// A graceful stop leaves every commit in the database file itself (a copy of that one file is
/// then a complete backup, and the next process to open it has nothing to replay).
fn assert_wal_checkpointed(workspace: &Workspace) {
    let mut wal = workspace.database_file().into_os_string();
    wal.push("-wal");
    let wal_bytes = std::fs::metadata(&wal).map_or(0, |metadata| metadata.len());
    assert_eq!(
        wal_bytes, 0,
        "the write-ahead log still holds commits after a graceful stop"
    );
}

fn assert_patient_still_readable(
    workspace: &Workspace,
    environment: &[(&str, &str)],
    (id, patient): &(String, Value),
) {
    let server = start_server(workspace, environment);
    Fhir::connect(&server).assert_reads_back(patient, id);
}

fn file_bytes(paths: &[PathBuf]) -> Vec<Vec<u8>> {
    paths
        .iter()
        .map(|path| std::fs::read(path).unwrap())
        .collect()
}

#[test]
fn corrupt_master_key_is_one_clear_error_and_destroys_nothing() {
    let workspace = Workspace::new();
    let stored = initialized_with_patient(&workspace, &[]);
    let protected = [workspace.master_key(), workspace.database_file()];
    let original_key = std::fs::read(workspace.master_key()).unwrap();
    std::fs::write(workspace.master_key(), b"this is not a master key\n").unwrap();
    let before = file_bytes(&protected);

    let environment = data_dir_environment(&workspace);
    let output = glastonbury(&workspace, &["init"], &as_pairs(&environment));
    assert_one_error_line(&output, &["master key", "corrupt"]);
    assert_eq!(
        file_bytes(&protected),
        before,
        "a failed start changed the key or database"
    );

    std::fs::write(workspace.master_key(), original_key).unwrap();
    assert_patient_still_readable(&workspace, &[], &stored);
}

#[test]
fn wrong_passphrase_is_one_clear_error_and_destroys_nothing() {
    let workspace = Workspace::new();
    let right = [("GLASTONBURY_MASTER_PASSPHRASE", "a")];
    let stored = initialized_with_patient(&workspace, &right);
    assert!(
        std::fs::read(workspace.master_key())
            .unwrap()
            .starts_with(b"age-encryption.org/v1")
    );
    let protected = [workspace.master_key(), workspace.database_file()];
    let before = file_bytes(&protected);

    let mut environment = data_dir_environment(&workspace);
    environment.push(("GLASTONBURY_MASTER_PASSPHRASE", "b".to_owned()));
    let output = glastonbury(&workspace, &["init"], &as_pairs(&environment));
    assert_one_error_line(&output, &["passphrase"]);
    assert_eq!(
        file_bytes(&protected),
        before,
        "a failed start changed the key or database"
    );

    assert_patient_still_readable(&workspace, &right, &stored);
}

#[test]
fn data_dir_under_a_regular_file_is_one_clear_error() {
    let workspace = Workspace::new();
    let blocker = workspace.path("not-a-directory");
    std::fs::write(&blocker, b"keep me").unwrap();
    let data_dir = blocker.join("data");
    let environment = [("GLASTONBURY_DATA_DIR", data_dir.to_str().unwrap())];
    let output = glastonbury(&workspace, &["init"], &environment);
    assert_one_error_line(&output, &["data dir", data_dir.to_str().unwrap()]);
    assert_eq!(std::fs::read(&blocker).unwrap(), b"keep me");
}

#[test]
fn unreachable_postgres_is_one_clear_error_without_the_password() {
    let workspace = Workspace::new();
    let mut environment = data_dir_environment(&workspace);
    let url = "postgres://postgres:pw-leak-check@127.0.0.1:1/x".to_owned();
    environment.push(("GLASTONBURY_DATABASE_URL", url));
    let output = glastonbury(&workspace, &["init"], &as_pairs(&environment));
    assert_one_error_line(&output, &["database"]);
    assert!(
        !stderr_of(&output).contains("pw-leak-check"),
        "{}",
        stderr_of(&output)
    );
    assert!(
        !workspace.master_key().exists(),
        "a master key was made for a database never reached"
    );
}

#[test]
fn unknown_config_file_key_is_named() {
    let workspace = Workspace::new();
    let config = workspace.path("glastonbury-test.toml");
    std::fs::write(&config, "htp_addr = \"127.0.0.1:9999\"\n").unwrap();
    let mut environment = data_dir_environment(&workspace);
    environment.push(("GLASTONBURY_CONFIG", config.display().to_string()));
    let output = glastonbury(&workspace, &["init"], &as_pairs(&environment));
    assert_one_error_line(&output, &["htp_addr"]);
    assert!(
        !workspace.data_dir().exists(),
        "a rejected config still touched the data dir"
    );
}

#[test]
fn unknown_environment_variable_is_named() {
    let workspace = Workspace::new();
    let mut environment = data_dir_environment(&workspace);
    environment.push(("GLASTONBURY_HTP_ADDR", "127.0.0.1:9999".to_owned()));
    let output = glastonbury(&workspace, &["init"], &as_pairs(&environment));
    assert_one_error_line(&output, &["GLASTONBURY_HTP_ADDR"]);
    assert!(
        !workspace.data_dir().exists(),
        "a rejected setting still touched the data dir"
    );
}

fn large_patient(marker_text: &str) -> Value {
    let div = format!(
        "<div xmlns=\"http://www.w3.org/1999/xhtml\">{}</div>",
        format!("{marker_text} ").repeat(100 * 1024 / (marker_text.len() + 1))
    );
    json!({
        "resourceType": "Patient",
        "name": [{"family": marker_text}],
        "text": {"status": "generated", "div": div},
    })
}

fn truncate_file(path: &Path, length: u64) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.set_len(length).unwrap();
    file.sync_all().unwrap();
}

#[test]
fn truncated_blob_reads_as_damaged_and_the_server_keeps_serving() {
    let workspace = Workspace::new();
    let mut server = start_server(&workspace, &[]);
    let fhir = Fhir::connect(&server);
    let small = json!({"resourceType": "Patient", "name": [{"family": "Intact"}]});
    let small_id = fhir.create(&small);
    let damaged_id = fhir.create(&large_patient(&marker("Damaged")));
    let blobs = workspace.record_blobs();
    assert_eq!(blobs.len(), 1, "{blobs:?}");
    let length = std::fs::metadata(&blobs[0]).unwrap().len();
    truncate_file(&blobs[0], length / 2);

    let answer = fhir.read("Patient", &damaged_id);
    assert!(
        (500..600).contains(&answer.status),
        "status {}: {}",
        answer.status,
        answer.body
    );
    assert_eq!(
        answer.body["resourceType"], "OperationOutcome",
        "{}",
        answer.body
    );
    assert!(
        answer.body.to_string().contains("damaged"),
        "{}",
        answer.body
    );

    fhir.assert_reads_back(&small, &small_id);
    fhir.create(&json!({"resourceType": "Patient", "name": [{"family": "After"}]}));
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server died on a damaged blob"
    );
    assert!(stop_gracefully(&mut server).success());
}

// ---------------------------------------------------------------------------------------------
// 4. Crypto-shredding

/// A Patient and one Observation of theirs; returns (patient id, observation id, observation).
fn patient_with_observation(fhir: &Fhir, family: &str) -> (String, String, Value) {
    let patient_id = fhir.create(&json!({"resourceType": "Patient", "name": [{"family": family}]}));
    let observation = json!({
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "body weight"},
        "subject": patient_reference(&patient_id),
        "valueQuantity": {"value": 81, "unit": "kg"},
    });
    let observation_id = fhir.create(&observation);
    (patient_id, observation_id, observation)
}

fn assert_shredded(answer: &Answer) {
    assert_eq!(answer.status, 410, "{}", answer.body);
    assert_eq!(answer.body["resourceType"], "OperationOutcome");
    assert!(
        answer.body.to_string().contains("crypto-shredded"),
        "{}",
        answer.body
    );
}

#[test]
fn shredded_patient_reads_as_gone_and_others_are_untouched() {
    let workspace = Workspace::new();
    let server = start_server(&workspace, &[]);
    let fhir = Fhir::connect(&server);
    let (shredded, shredded_observation, _) = patient_with_observation(&fhir, "Shredded");
    let (kept, kept_observation_id, kept_observation) = patient_with_observation(&fhir, "Kept");

    let output = server.command(&["patient", "shred", &shredded]);
    assert_succeeded(&output);
    assert!(
        stdout_of(&output).contains("destroyed"),
        "{}",
        stdout_of(&output)
    );

    assert_shredded(&fhir.read("Patient", &shredded));
    assert_shredded(&fhir.read("Observation", &shredded_observation));
    assert_shredded(&fhir.read_path(&format!("Observation/{shredded_observation}/_history")));
    assert_eq!(fhir.read("Patient", &kept).status, 200);
    fhir.assert_reads_back(&kept_observation, &kept_observation_id);
    let (_, new_id, new_observation) = patient_with_observation(&fhir, "AfterShred");
    fhir.assert_reads_back(&new_observation, &new_id);
}

// ---------------------------------------------------------------------------------------------
// 5. Interoperability with the standard `age` CLI

fn require_age_cli() {
    match Command::new("age").arg("--version").output() {
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => panic!(
            "the `age` command is not on PATH: run scripts/install-test-deps.sh (it installs the \
             Debian `age` package) and run the tests again"
        ),
        Err(error) => panic!("cannot run `age`: {error}"),
    }
}

fn assert_private_identity_file(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o600,
        "the exported identity must be mode 0600, is {mode:o}"
    );
    let text = std::fs::read_to_string(path).unwrap();
    assert!(
        text.trim().starts_with("AGE-SECRET-KEY-1"),
        "not an age identity file"
    );
}

#[test]
fn exported_patient_key_decrypts_blobs_with_the_age_cli() {
    require_age_cli();
    let workspace = Workspace::new();
    let server = start_server(&workspace, &[]);
    let fhir = Fhir::connect(&server);
    let marker_text = marker("AgeInterop");
    let patient_id = fhir.create(&large_patient(&marker_text));
    let blobs = workspace.record_blobs();
    assert_eq!(blobs.len(), 1, "{blobs:?}");

    let identity = workspace.path("patient.key");
    let output = server.command(&[
        "patient",
        "export-key",
        &patient_id,
        "--out",
        identity.to_str().unwrap(),
    ]);
    assert_succeeded(&output);
    assert_private_identity_file(&identity);

    let decrypted = Command::new("age")
        .args([
            "-d",
            "-i",
            identity.to_str().unwrap(),
            blobs[0].to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_succeeded(&decrypted);
    let resource: Value = serde_json::from_slice(&decrypted.stdout).unwrap();
    assert_eq!(resource["id"], json!(patient_id));
    assert_eq!(resource["name"][0]["family"], json!(marker_text));
}

// ---------------------------------------------------------------------------------------------
// 6. Master key rotation

fn create_all(fhir: &Fhir, resources: Vec<Value>) -> Vec<(String, Value)> {
    resources
        .into_iter()
        .map(|resource| (fhir.create(&resource), resource))
        .collect()
}

fn assert_all_read_back(fhir: &Fhir, records: &[(String, Value)]) {
    for (id, resource) in records {
        fhir.assert_reads_back(resource, id);
    }
}

fn rotation_fixture_records(fhir: &Fhir) -> Vec<(String, Value)> {
    let mut records = create_all(
        fhir,
        vec![
            json!({"resourceType": "Patient", "name": [{"family": "BeforeRotation"}]}),
            large_patient(&marker("RotationBlob")),
        ],
    );
    let observation = json!({
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "glucose"},
        "subject": patient_reference(&records[0].0),
        "valueQuantity": {"value": 5.4, "unit": "mmol/L"},
    });
    records.extend(create_all(fhir, vec![observation]));
    records
}

/// Runs `keys rotate` and asserts that master.key changed.
fn rotate_and_check_key_changed(workspace: &Workspace, rotate: impl FnOnce() -> Output) -> Output {
    let before = std::fs::read(workspace.master_key()).unwrap();
    let output = rotate();
    assert_succeeded(&output);
    let after = std::fs::read(workspace.master_key()).unwrap();
    assert_ne!(after, before, "keys rotate left master.key as it was");
    output
}

/// Rotates twice under a running server that has no patient keys cached, so it meets its stale
/// master once while creating a new patient key and once while reading old records.
fn rotate_while_running(workspace: &Workspace, records: &mut Vec<(String, Value)>) {
    let mut running = start_server(workspace, &[]);
    let fhir = Fhir::connect(&running);
    let rotate = || running.command(&["keys", "rotate", "--json"]);
    let output = rotate_and_check_key_changed(workspace, rotate);
    let summary: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(summary["patient_keys"].as_u64().unwrap() >= 2, "{summary}");
    let new_patient = json!({"resourceType": "Patient", "name": [{"family": "AfterRotation"}]});
    records.extend(create_all(&fhir, vec![new_patient]));
    rotate_and_check_key_changed(workspace, || running.command(&["keys", "rotate"]));
    assert_all_read_back(&fhir, records);
    assert!(stop_gracefully(&mut running).success());
}

fn rotate_while_stopped(workspace: &Workspace) {
    let environment = data_dir_environment(workspace);
    rotate_and_check_key_changed(workspace, || {
        glastonbury(workspace, &["keys", "rotate"], &as_pairs(&environment))
    });
}

#[test]
fn rotated_master_key_keeps_every_record_readable() {
    let workspace = Workspace::new();
    let mut first = start_server(&workspace, &[]);
    let mut records = rotation_fixture_records(&Fhir::connect(&first));
    assert!(stop_gracefully(&mut first).success());
    rotate_while_running(&workspace, &mut records);
    rotate_while_stopped(&workspace);
    let restarted = start_server(&workspace, &[]);
    assert_all_read_back(&Fhir::connect(&restarted), &records);
}

// ---------------------------------------------------------------------------------------------
// 7. Printed configuration

#[test]
fn print_config_masks_every_secret() {
    let workspace = Workspace::new();
    let mut environment = data_dir_environment(&workspace);
    environment.push(("GLASTONBURY_MASTER_PASSPHRASE", "supersecret".to_owned()));
    environment.push((
        "GLASTONBURY_DATABASE_URL",
        "postgres://u:pw123@host/db".to_owned(),
    ));
    let output = glastonbury(
        &workspace,
        &["serve", "--print-config"],
        &as_pairs(&environment),
    );
    assert_succeeded(&output);
    let printed = format!("{}{}", stdout_of(&output), stderr_of(&output));
    assert!(!printed.contains("supersecret"), "{printed}");
    assert!(!printed.contains("pw123"), "{printed}");
    let stdout = stdout_of(&output);
    assert!(
        stdout.contains("master_passphrase = \"********\""),
        "{stdout}"
    );
    assert!(stdout.contains("postgres://u:********@host/db"), "{stdout}");
}

// ---------------------------------------------------------------------------------------------
// 8. Graceful shutdown

#[test]
fn sigterm_stops_the_server_with_status_zero() {
    let workspace = Workspace::new();
    let mut server = start_server(&workspace, &[]);
    let fhir = Fhir::connect(&server);
    fhir.create(&json!({"resourceType": "Patient", "name": [{"family": "Shutdown"}]}));
    let status = stop_gracefully(&mut server);
    assert_eq!(status.code(), Some(0), "{status:?}; log:\n{}", server.log());
}

// ---------------------------------------------------------------------------------------------
// CLI argument handling found while writing these tests

#[test]
fn token_accepts_a_secret_that_starts_with_a_hyphen() {
    let workspace = Workspace::new();
    let arguments = [
        "token",
        "--client",
        "c",
        "--secret",
        "-Ustarts-with-hyphen",
        "--server",
        "http://127.0.0.1:1",
    ];
    let output = glastonbury(
        &workspace,
        &arguments,
        &as_pairs(&data_dir_environment(&workspace)),
    );
    // The secret must be taken as a value: the command gets as far as the (unreachable) server.
    assert_one_error_line(&output, &["cannot reach"]);
}
