//! The DICOM gateway end to end through the real binary and real peers: dcmtk `echoscu`,
//! `storescu` and `findscu`, pynetdicom, dicomweb-client and raw DICOMweb over HTTP, with the
//! DICOM test files shipped in the pydicom wheels (many transfer syntaxes): byte-identical
//! round trips, QIDO matching, malformed input that fails with clear statuses and stores
//! nothing, unknown AE titles refused, no PHI at rest, and the offline de-identifier checked by
//! pydicom against Table E.1-1.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use reqwest::blocking::Client;
use serde_json::Value;

use crate::common::{Server, files_under, free_port};

/// The test DICOM files installed with pydicom by `scripts/install-test-deps.sh`.
fn test_files() -> PathBuf {
    repository().join(".venv/lib/python3.11/site-packages/pydicom/data/test_files")
}

fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> PathBuf {
    repository().join(".venv/bin/python")
}

/// Valid instances, one of every transfer syntax the corpus has. Several share their SOP
/// Instance UID (the same MR image in different encodings).
const CORPUS: &[&str] = &[
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "JPEG2000.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "JPGExtended.dcm",
    "SC_rgb_jpeg_gdcm.dcm",
    "SC_rgb_dcmtk_+eb+cr.dcm",
    "image_dfl.dcm",
    "waveform_ecg.dcm",
    "test-SR.dcm",
];

/// Instances with distinct SOP Instance UIDs (for queries that count).
const DISTINCT: &[&str] = &[
    "CT_small.dcm",
    "MR_small.dcm",
    "JPEG2000.dcm",
    "JPGExtended.dcm",
    "SC_rgb_jpeg_gdcm.dcm",
    "SC_rgb_dcmtk_+eb+cr.dcm",
    "image_dfl.dcm",
    "waveform_ecg.dcm",
    "test-SR.dcm",
];

/// A running gateway with a modality AE (may store), a workstation AE (may query) and a
/// DICOMweb token for each.
struct Gateway {
    workspace: tempfile::TempDir,
    server: Server,
    dicom_port: u16,
    client: Client,
    writer_token: String,
    reader_token: String,
}

impl Gateway {
    fn start() -> Self {
        Self::start_with(&[])
    }

    fn start_with(settings: &[(&str, &str)]) -> Self {
        let workspace = tempfile::tempdir().unwrap();
        let dicom_port = free_port();
        let dicom_addr = format!("127.0.0.1:{dicom_port}");
        let mut environment = vec![("GLASTONBURY_DICOM_ADDR", dicom_addr.as_str())];
        environment.extend_from_slice(settings);
        let server = Server::start(&workspace.path().join("data"), &environment);
        for (name, role, scope, title) in [
            ("modality", "device", "system/ImagingStudy.c", "STORESCU"),
            (
                "workstation",
                "clinician",
                "system/ImagingStudy.rs",
                "FINDSCU",
            ),
            (
                "research feed",
                "device",
                "system/ImagingStudy.c",
                "RESEARCH",
            ),
        ] {
            let output = server.command(&[
                "clients",
                "create",
                "--name",
                name,
                "--role",
                role,
                "--scope",
                scope,
                "--ae-title",
                title,
                "--json",
            ]);
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let writer_token = server.token_for("device", &["system/ImagingStudy.c"]);
        let reader_token = server.token_for("clinician", &["system/ImagingStudy.rs"]);
        Self {
            workspace,
            server,
            dicom_port,
            client: Client::new(),
            writer_token,
            reader_token,
        }
    }

    fn dicomweb(&self, path: &str) -> String {
        format!("{}/dicomweb/{path}", self.server.base_url)
    }

    /// A dcmtk tool: options, then the peer, then trailing arguments (files to send).
    fn dcmtk(
        &self,
        program: &str,
        aet: &str,
        options: &[&str],
        trailing: &[&str],
    ) -> std::process::Output {
        Command::new(program)
            .args(["-aet", aet, "-aec", "GLASTONBURY"])
            .args(options)
            .args(["127.0.0.1", &self.dicom_port.to_string()])
            .args(trailing)
            .output()
            .unwrap_or_else(|error| panic!("{program} (dcmtk) must be installed: {error}"))
    }

    fn python(&self, arguments: &[String]) -> Value {
        let output = Command::new(python())
            .arg(repository().join("tests/python/dicom_peers.py"))
            .args(arguments)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    }

    /// The arguments of a dicomweb-client run of `dicom_peers.py` on these test files.
    fn dicomweb_client_arguments(&self, command: &str, token: &str, names: &[&str]) -> Vec<String> {
        let mut arguments = vec![
            command.to_owned(),
            "--base".to_owned(),
            format!("{}/dicomweb", self.server.base_url),
            "--token".to_owned(),
            token.to_owned(),
        ];
        arguments.extend(
            names
                .iter()
                .map(|name| test_files().join(name).display().to_string()),
        );
        arguments
    }

    /// A pynetdicom C-FIND from the workstation AE at `level` with these `Keyword=value` keys.
    fn find_as_workstation(&self, level: &str, keys: &[&str]) -> Value {
        let mut arguments: Vec<String> = [
            "find",
            "--port",
            &self.dicom_port.to_string(),
            "--aet",
            "FINDSCU",
            "--called",
            "GLASTONBURY",
            "--level",
            level,
        ]
        .iter()
        .map(|argument| (*argument).to_owned())
        .collect();
        arguments.extend(keys.iter().map(|key| (*key).to_owned()));
        self.python(&arguments)
    }

    /// A STOW-RS request of these parts (raw bytes), as `token`.
    fn stow(&self, token: &str, path: &str, parts: &[Vec<u8>]) -> (u16, Value) {
        let boundary = "glastonbury-test-boundary";
        let mut body = Vec::new();
        for part in parts {
            body.extend(
                format!("--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").as_bytes(),
            );
            body.extend(part);
            body.extend(b"\r\n");
        }
        body.extend(format!("--{boundary}--\r\n").as_bytes());
        let response = self
            .client
            .post(self.dicomweb(path))
            .bearer_auth(token)
            .header(
                "content-type",
                format!("multipart/related; type=\"application/dicom\"; boundary={boundary}"),
            )
            .body(body)
            .send()
            .unwrap();
        let status = response.status().as_u16();
        let text = response.text().unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Creates a FHIR Patient with this identifier value; returns its id.
    fn register_fhir_patient(&self, identifier: &str) -> String {
        let fhir_token = self.server.token_for("clinician", &["system/Patient.c"]);
        let created = self
            .client
            .post(format!("{}/fhir/Patient", self.server.base_url))
            .bearer_auth(&fhir_token)
            .header("content-type", "application/fhir+json")
            .body(
                serde_json::json!({"resourceType": "Patient", "identifier": [{"value": identifier}]})
                    .to_string(),
            )
            .send()
            .unwrap();
        assert_eq!(created.status().as_u16(), 201);
        let patient: Value = created.json().unwrap();
        patient["id"].as_str().unwrap().to_owned()
    }

    fn qido(&self, path: &str) -> Vec<Value> {
        let response = self
            .client
            .get(self.dicomweb(path))
            .bearer_auth(&self.reader_token)
            .send()
            .unwrap();
        assert_eq!(response.status().as_u16(), 200, "{path}");
        response.json::<Vec<Value>>().unwrap()
    }

    /// The single part of a WADO-RS instance retrieval.
    fn retrieve(&self, study: &str, series: &str, instance: &str) -> Vec<u8> {
        let response = self
            .client
            .get(self.dicomweb(&format!(
                "studies/{study}/series/{series}/instances/{instance}"
            )))
            .bearer_auth(&self.reader_token)
            .header(
                "accept",
                "multipart/related; type=\"application/dicom\"; transfer-syntax=*",
            )
            .send()
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        let boundary = glastonbury_dicom::multipart::boundary_of(&content_type).unwrap();
        let body = response.bytes().unwrap();
        let mut reader = glastonbury_dicom::multipart::PartReader::new(&boundary, 1 << 30);
        let mut parts = reader.push(&body).unwrap();
        reader.finish().unwrap();
        assert_eq!(parts.len(), 1);
        parts.remove(0).body
    }
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(test_files().join(name)).unwrap()
}

fn identity(name: &str) -> glastonbury_dicom::Instance {
    glastonbury_dicom::instance::from_part10(read(name)).unwrap()
}

fn patient_name(instance: &glastonbury_dicom::Instance) -> String {
    glastonbury_dicom::instance::text_of(&instance.header, dicom_dictionary_std::tags::PATIENT_NAME)
        .unwrap()
}

fn text(value: &Value, tag: &str) -> Option<String> {
    let first = value.get(tag)?.get("Value")?.get(0)?;
    match first {
        Value::String(text) => Some(text.clone()),
        Value::Object(name) => name.get("Alphabetic")?.as_str().map(str::to_owned),
        other => Some(other.to_string()),
    }
}

/// The header an instance is indexed by is read without parsing Pixel Data: it must hold every
/// other attribute, those after Pixel Data too.
#[test]
fn the_header_of_every_corpus_file_is_its_data_set_without_pixel_data() {
    let mut compared = 0;
    for path in files_under(&test_files()) {
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let Ok(instance) = glastonbury_dicom::instance::from_part10(bytes.clone()) else {
            continue;
        };
        let mut whole = glastonbury_dicom::instance::read_whole(&bytes)
            .unwrap()
            .into_inner();
        whole.remove_element(dicom_dictionary_std::tags::PIXEL_DATA);
        // Compared as text: dicom-rs holds no two undefined lengths equal.
        assert_eq!(
            format!("{:?}", instance.header),
            format!("{whole:?}"),
            "{}",
            path.display()
        );
        compared += 1;
    }
    assert!(compared >= 30, "only {compared} corpus files were read");
    // CT_small with Data Set Trailing Padding after its Pixel Data.
    let mut padded = read("CT_small.dcm");
    padded.extend([0xFC, 0xFF, 0xFC, 0xFF, b'O', b'B', 0, 0, 2, 0, 0, 0, 0, 0]);
    let instance = glastonbury_dicom::instance::from_part10(padded).unwrap();
    let padding = dicom_core::Tag(0xFFFC, 0xFFFC);
    assert!(instance.header.element(padding).is_ok());
    assert!(
        instance
            .header
            .element(dicom_dictionary_std::tags::PIXEL_DATA)
            .is_err()
    );
}

/// The index stores each header as DICOM JSON written by our own writer: for every corpus file
/// it must be byte for byte what dicom-json writes, which QIDO-RS and WADO-RS metadata read back.
#[test]
fn the_stored_header_json_of_every_corpus_file_is_what_dicom_json_writes() {
    let mut compared = 0;
    for path in files_under(&test_files()) {
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let Ok(instance) = glastonbury_dicom::instance::from_part10(bytes) else {
            continue;
        };
        let Ok(reference) = dicom_json::to_vec(&instance.header) else {
            continue;
        };
        let written = glastonbury_dicom::json::header_json_bytes(&instance.header).unwrap();
        assert!(written == reference, "{}", path.display());
        compared += 1;
    }
    assert!(compared >= 30, "only {compared} corpus files were compared");
}

#[test]
fn stow_qido_and_wado_round_trip_every_transfer_syntax_byte_for_byte() {
    let gateway = Gateway::start();
    // One at a time: several files are the same instance in different encodings, and a second
    // store of an instance becomes its current version.
    for name in CORPUS {
        let (status, answer) = gateway.stow(&gateway.writer_token, "studies", &[read(name)]);
        assert_eq!(status, 200, "{name}: {answer}");
        let instance = identity(name);
        let studies = gateway.qido(&format!(
            "studies?StudyInstanceUID={}",
            instance.study_instance_uid
        ));
        assert_eq!(studies.len(), 1, "{name}");
        assert!(
            text(&studies[0], "00081190")
                .unwrap()
                .ends_with(&instance.study_instance_uid)
        );
        let retrieved = gateway.retrieve(
            &instance.study_instance_uid,
            &instance.series_instance_uid,
            &instance.sop_instance_uid,
        );
        assert!(retrieved == read(name), "{name} came back different");
    }
    // Each study has its FHIR ImagingStudy, derived shortly after its instances are stored.
    let fhir_reader = gateway
        .server
        .token_for("clinician", &["system/ImagingStudy.rs"]);
    let ct = identity("CT_small.dcm");
    let search = format!(
        "{}/fhir/ImagingStudy?identifier=urn:dicom:uid|urn:oid:{}",
        gateway.server.base_url, ct.study_instance_uid
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let study = loop {
        let bundle: Value = gateway
            .client
            .get(&search)
            .bearer_auth(&fhir_reader)
            .send()
            .unwrap()
            .json()
            .unwrap();
        if let Some(resource) = bundle["entry"][0]["resource"].as_object() {
            break Value::Object(resource.clone());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no ImagingStudy for the CT study: {bundle}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(study["numberOfInstances"], 1);
    assert_eq!(study["series"][0]["uid"], ct.series_instance_uid.as_str());
    assert_eq!(
        study["series"][0]["instance"][0]["uid"],
        ct.sop_instance_uid.as_str()
    );
    assert_eq!(
        study["series"][0]["instance"][0]["sopClass"]["code"], "urn:oid:1.2.840.10008.5.1.4.1.1.2",
        "CT Image Storage"
    );
    assert_eq!(study["modality"][0]["code"], "CT");
    assert!(
        study["subject"]["identifier"]["value"].is_string(),
        "{study}"
    );
    // Storing is not reading: the modality's token may not query.
    let refused = gateway
        .client
        .get(gateway.dicomweb("studies"))
        .bearer_auth(&gateway.writer_token)
        .send()
        .unwrap();
    assert_eq!(refused.status().as_u16(), 403);
}

/// Writes `series` × `per_series` instances of one new study, made from the CT template with
/// series numbers 1.., descriptions "series N" and instance numbers counting down; their paths.
fn write_study(gateway: &Gateway, series: usize, per_series: usize) -> Vec<PathBuf> {
    let folder = gateway.workspace.path().join("study");
    let written = Command::new(python())
        .args([
            "-c",
            "import sys, pathlib, pydicom; from pydicom.uid import generate_uid as g\n\
             template, folder = sys.argv[1], pathlib.Path(sys.argv[2])\n\
             series, per_series = int(sys.argv[3]), int(sys.argv[4])\n\
             folder.mkdir()\n\
             study = g()\n\
             for s in range(1, series + 1):\n\
             \x20   series_uid = g()\n\
             \x20   for i in range(per_series, 0, -1):\n\
             \x20       ds = pydicom.dcmread(template)\n\
             \x20       ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid\n\
             \x20       ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = g()\n\
             \x20       ds.SeriesNumber, ds.InstanceNumber = s, i\n\
             \x20       ds.SeriesDescription = f'series {s}'\n\
             \x20       ds.save_as(folder / f'{s}-{i}.dcm')",
        ])
        .arg(test_files().join("CT_small.dcm"))
        .arg(&folder)
        .arg(series.to_string())
        .arg(per_series.to_string())
        .output()
        .unwrap();
    assert!(written.status.success(), "{written:?}");
    files_under(&folder)
}

#[test]
fn a_studys_metadata_and_imaging_study_name_every_instance_of_every_series() {
    let gateway = Gateway::start();
    let files = write_study(&gateway, 2, 3);
    let parts: Vec<Vec<u8>> = files
        .iter()
        .map(|path| std::fs::read(path).unwrap())
        .collect();
    let (status, answer) = gateway.stow(&gateway.writer_token, "studies", &parts);
    assert_eq!(status, 200, "{answer}");
    let stored: Vec<glastonbury_dicom::Instance> = parts
        .into_iter()
        .map(|part| glastonbury_dicom::instance::from_part10(part).unwrap())
        .collect();
    let study_uid = &stored[0].study_instance_uid;

    // Metadata: each header as stored, its Pixel Data named by the instance's own URL.
    let metadata = gateway.qido(&format!("studies/{study_uid}/metadata"));
    assert_eq!(metadata.len(), 6);
    for header in &metadata {
        let instance = stored
            .iter()
            .find(|instance| {
                text(header, "00080018").as_deref() == Some(&instance.sop_instance_uid)
            })
            .expect("every header is one of the stored instances");
        // As the index stores it (FL values as their shortest f32 text, which a JSON tree of f64
        // numbers would spell longer).
        let expected: Value = serde_json::from_slice(
            &glastonbury_dicom::json::header_json_bytes(&instance.header).unwrap(),
        )
        .unwrap();
        let mut without_pixel_data = header.as_object().unwrap().clone();
        let pixel_data = without_pixel_data.shift_remove("7FE00010").unwrap();
        assert_eq!(Value::Object(without_pixel_data), expected);
        assert_eq!(pixel_data["vr"], "OB");
        let uri = pixel_data["BulkDataURI"].as_str().unwrap();
        assert!(
            uri.ends_with(&format!(
                "/dicomweb/studies/{study_uid}/series/{}/instances/{}",
                instance.series_instance_uid, instance.sop_instance_uid
            )),
            "{uri}"
        );
        assert_eq!(
            header.as_object().unwrap().keys().next_back().unwrap(),
            "7FE00010"
        );
    }

    // The ImagingStudy lists both series, and each one's instances in instance-number order.
    let imaging_study =
        wait_for_imaging_study(&gateway, study_uid, |study| study["numberOfInstances"] == 6);
    assert_lists_every_instance_in_order(&imaging_study, &stored);

    // Instances stored before their listed values were kept beside the header (migration 0011)
    // are listed from the header itself: with every row's listed values gone, a rebuild (here
    // after one instance is stored again) lists the same series and instances.
    forget_listed_values(&gateway);
    let version = imaging_study["meta"]["versionId"].clone();
    let (status, answer) = gateway.stow(
        &gateway.writer_token,
        "studies",
        &[std::fs::read(&files[0]).unwrap()],
    );
    assert_eq!(status, 200, "{answer}");
    let rebuilt = wait_for_imaging_study(&gateway, study_uid, |study| {
        study["meta"]["versionId"] != version
    });
    assert_lists_every_instance_in_order(&rebuilt, &stored);
}

/// A request of many parts is stored while it is read, several parts at a time: the answer
/// still names every part in the order it came, and a part that repeats an earlier part's SOP
/// Instance UID is the version kept, as when parts are stored one after another.
#[test]
fn a_stow_request_of_many_parts_answers_in_order_and_the_later_duplicate_wins() {
    let gateway = Gateway::start();
    let files = write_study(&gateway, 2, 12);
    let mut parts: Vec<Vec<u8>> = files
        .iter()
        .map(|path| std::fs::read(path).unwrap())
        .collect();
    // The second part is the first one again, with another series description of the same
    // length ("series 9" for "series 1" or "series 2"): the same instance, other content, sent
    // while the first one is still being stored.
    let first = parts[0].clone();
    let description = b"series ";
    let at = first
        .windows(description.len())
        .position(|window| window == description)
        .unwrap();
    let mut changed = first.clone();
    changed[at + description.len()] = b'9';
    // Refusals between the stores: their places in the answer follow the parts too.
    parts.insert(1, changed.clone());
    parts.insert(5, b"not dicom at all".to_vec());
    parts.insert(17, read("no_meta.dcm"));

    let (status, answer) = gateway.stow(&gateway.writer_token, "studies", &parts);
    assert_eq!(status, 202, "{answer}");
    let referenced: Vec<String> = answer["00081199"]["Value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| text(item, "00081155").unwrap())
        .collect();
    let expected: Vec<String> = parts
        .iter()
        .filter_map(|part| glastonbury_dicom::instance::from_part10(part.clone()).ok())
        .map(|instance| instance.sop_instance_uid)
        .collect();
    assert_eq!(expected.len(), 25);
    assert_eq!(referenced, expected, "stored parts answered in their order");
    assert_eq!(answer["00081198"]["Value"].as_array().unwrap().len(), 2);

    let instance = glastonbury_dicom::instance::from_part10(first).unwrap();
    let series = gateway.qido(&format!("studies/{}/series", instance.study_instance_uid));
    assert_eq!(series.len(), 2);
    let instances = gateway.qido(&format!(
        "studies/{}/instances",
        instance.study_instance_uid
    ));
    assert_eq!(
        instances.len(),
        24,
        "every distinct instance is stored once"
    );
    let retrieved = gateway.retrieve(
        &instance.study_instance_uid,
        &instance.series_instance_uid,
        &instance.sop_instance_uid,
    );
    assert!(retrieved == changed, "the later part is the stored version");
}

/// The study's ImagingStudy once `ready` holds for it (it is derived shortly after a store).
fn wait_for_imaging_study(
    gateway: &Gateway,
    study_uid: &str,
    ready: impl Fn(&Value) -> bool,
) -> Value {
    let fhir_reader = gateway
        .server
        .token_for("clinician", &["system/ImagingStudy.rs"]);
    let search = format!(
        "{}/fhir/ImagingStudy?identifier=urn:dicom:uid|urn:oid:{study_uid}",
        gateway.server.base_url
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let bundle: Value = gateway
            .client
            .get(&search)
            .bearer_auth(&fhir_reader)
            .send()
            .unwrap()
            .json()
            .unwrap();
        let resource = &bundle["entry"][0]["resource"];
        if ready(resource) {
            return resource.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the ImagingStudy did not become ready: {bundle}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Removes every stored instance's listed values, as rows stored before migration 0011 are.
fn forget_listed_values(gateway: &Gateway) {
    let database = gateway.workspace.path().join("data").join("glastonbury.db");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&database)
            .busy_timeout(std::time::Duration::from_secs(30));
        let mut connection = sqlx::ConnectOptions::connect(&options).await.unwrap();
        let forgotten = sqlx::query("UPDATE dicom_instances SET listed_values = NULL")
            .execute(&mut connection)
            .await
            .unwrap();
        assert_eq!(forgotten.rows_affected(), 6);
    });
}

/// Asserts that an ImagingStudy of the two-series study `stored` lists each series with its
/// instances in instance-number order.
fn assert_lists_every_instance_in_order(
    imaging_study: &Value,
    stored: &[glastonbury_dicom::Instance],
) {
    assert_eq!(imaging_study["numberOfSeries"], 2, "{imaging_study}");
    for series in imaging_study["series"].as_array().unwrap() {
        let number = series["number"].as_u64().unwrap();
        assert_eq!(series["description"], format!("series {number}"));
        assert_eq!(series["modality"]["code"], "CT");
        let mut expected: Vec<&glastonbury_dicom::Instance> = stored
            .iter()
            .filter(|instance| series["uid"] == instance.series_instance_uid.as_str())
            .collect();
        expected.sort_by_key(|instance| {
            glastonbury_dicom::json::first_text(
                &glastonbury_dicom::json::header_json(&instance.header).unwrap(),
                dicom_dictionary_std::tags::INSTANCE_NUMBER,
            )
        });
        let listed: Vec<&str> = series["instance"]
            .as_array()
            .unwrap()
            .iter()
            .map(|instance| instance["uid"].as_str().unwrap())
            .collect();
        let expected: Vec<&str> = expected
            .iter()
            .map(|instance| instance.sop_instance_uid.as_str())
            .collect();
        assert_eq!(listed, expected, "{imaging_study}");
        let numbers: Vec<u64> = series["instance"]
            .as_array()
            .unwrap()
            .iter()
            .map(|instance| instance["number"].as_u64().unwrap())
            .collect();
        assert_eq!(numbers, [1, 2, 3]);
    }
}

#[test]
fn qido_matches_names_dates_uid_lists_and_pages() {
    let gateway = Gateway::start();
    let parts: Vec<Vec<u8>> = DISTINCT.iter().map(|name| read(name)).collect();
    assert_eq!(
        gateway.stow(&gateway.writer_token, "studies", &parts).0,
        200
    );
    let ct = identity("CT_small.dcm");
    let ct_name = patient_name(&ct);
    let prefix: String = ct_name.chars().take(3).collect();
    let by_name = gateway.qido(&format!("studies?PatientName={prefix}*"));
    assert!(by_name.iter().any(|study| text(study, "0020000D").as_deref() == Some(ct.study_instance_uid.as_str())));
    let exact = gateway.qido(&format!("studies?PatientName={}", ct_name.to_lowercase()));
    assert!(
        !exact.is_empty(),
        "person names match without regard to case"
    );
    let nobody = gateway.qido("studies?PatientName=ZZZZNOBODY*");
    assert!(nobody.is_empty());
    let patient_id_of = |instance: &glastonbury_dicom::Instance| {
        glastonbury_dicom::instance::text_of(
            &instance.header,
            dicom_dictionary_std::tags::PATIENT_ID,
        )
    };
    let ct_patient = patient_id_of(&ct).unwrap();
    let holders: BTreeSet<String> = DISTINCT
        .iter()
        .map(|name| identity(name))
        .filter(|instance| patient_id_of(instance).as_deref() == Some(ct_patient.as_str()))
        .map(|instance| instance.sop_instance_uid)
        .collect();
    let by_patient: BTreeSet<String> = gateway
        .qido(&format!("instances?PatientID={ct_patient}"))
        .iter()
        .filter_map(|instance| text(instance, "00080018"))
        .collect();
    assert_eq!(
        by_patient, holders,
        "instance-level matching on a patient attribute"
    );
    // Reconciliation: the instance re-sent with a corrected PatientID is found by the new value
    // only, though its study's index still holds the old value's token.
    let mut corrected = glastonbury_dicom::instance::read_whole(&read("CT_small.dcm")).unwrap();
    corrected.put(dicom_core::DataElement::new(
        dicom_dictionary_std::tags::PATIENT_ID,
        dicom_core::VR::LO,
        dicom_core::PrimitiveValue::from("RECONCILED-7"),
    ));
    let mut corrected_bytes = Vec::new();
    corrected.write_all(&mut corrected_bytes).unwrap();
    assert_eq!(
        gateway
            .stow(&gateway.writer_token, "studies", &[corrected_bytes])
            .0,
        200
    );
    let sop_instances = |path: &str| -> BTreeSet<String> {
        gateway
            .qido(path)
            .iter()
            .filter_map(|instance| text(instance, "00080018"))
            .collect()
    };
    assert!(
        !sop_instances(&format!("instances?PatientID={ct_patient}")).contains(&ct.sop_instance_uid)
    );
    assert!(sop_instances("instances?PatientID=RECONCILED-7").contains(&ct.sop_instance_uid));
    assert!(
        !sop_instances(&format!(
            "studies/{}/instances?PatientID={ct_patient}",
            ct.study_instance_uid
        ))
        .contains(&ct.sop_instance_uid)
    );
    let study_date =
        glastonbury_dicom::instance::text_of(&ct.header, dicom_dictionary_std::tags::STUDY_DATE)
            .unwrap();
    let in_range = gateway.qido(&format!(
        "studies?StudyDate={study_date}-&includefield=StudyDescription"
    ));
    assert!(in_range.iter().any(|study| text(study, "0020000D").as_deref() == Some(ct.study_instance_uid.as_str())));
    let mr = identity("MR_small.dcm");
    let list = gateway.qido(&format!(
        "studies?StudyInstanceUID={},{}",
        ct.study_instance_uid, mr.study_instance_uid
    ));
    let uids: BTreeSet<String> = list
        .iter()
        .filter_map(|study| text(study, "0020000D"))
        .collect();
    assert!(uids.contains(&ct.study_instance_uid) && uids.contains(&mr.study_instance_uid));
    let all = gateway.qido("studies?limit=1000");
    let first_page = gateway.qido("studies?limit=2");
    let second_page = gateway.qido("studies?limit=2&offset=2");
    assert_eq!(first_page.len(), 2);
    assert_eq!(&all[..2], &first_page[..]);
    assert_eq!(&all[2..4], &second_page[..]);
    let series = gateway.qido(&format!("studies/{}/series", ct.study_instance_uid));
    assert_eq!(series.len(), 1);
    assert_eq!(text(&series[0], "00080060").as_deref(), Some("CT"));
    assert_eq!(text(&series[0], "00201209").as_deref(), Some("1"));
    let instances = gateway.qido(&format!("instances?SOPInstanceUID={}", ct.sop_instance_uid));
    assert_eq!(instances.len(), 1);
    let bad = gateway
        .client
        .get(gateway.dicomweb("studies?NoSuchAttribute=1"))
        .bearer_auth(&gateway.reader_token)
        .send()
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    assert_eq!(bad.headers()["content-type"], "application/problem+json");
}

/// The imaging index on PostgreSQL: instances that share a study add its identifying tokens
/// once, and QIDO-RS finds the studies by name prefix and patient id.
#[test]
fn the_imaging_index_works_on_postgres() {
    let Some(admin_url) = crate::common::postgres_admin_url() else {
        println!("notice: GLASTONBURY_TEST_DATABASE_URL is not set; skipping DICOM on PostgreSQL");
        return;
    };
    let database = crate::common::TemporaryPostgres::create(&admin_url);
    let gateway = Gateway::start_with(&[("GLASTONBURY_DATABASE_URL", &database.url)]);
    let parts: Vec<Vec<u8>> = CORPUS.iter().map(|name| read(name)).collect();
    let (status, _) = gateway.stow(&gateway.writer_token, "studies", &parts);
    assert_eq!(status, 200);
    let mr = identity("MR_small.dcm");
    let prefix: String = patient_name(&mr).chars().take(3).collect();
    let by_name = gateway.qido(&format!("studies?PatientName={prefix}*"));
    let mr_studies: Vec<&Value> = by_name
        .iter()
        .filter(|study| text(study, "0020000D").as_deref() == Some(mr.study_instance_uid.as_str()))
        .collect();
    assert_eq!(mr_studies.len(), 1, "one answer per study");
    let by_id = gateway.qido("studies?PatientID=1CT1");
    assert_eq!(by_id.len(), 1);
    assert_eq!(
        text(&by_id[0], "0020000D").as_deref(),
        Some(identity("CT_small.dcm").study_instance_uid.as_str())
    );
}

#[test]
fn malformed_input_fails_with_reasons_and_stores_nothing() {
    let gateway = Gateway::start();
    let good = read("CT_small.dcm");
    let mut wrong_preamble = good.clone();
    wrong_preamble[128..132].copy_from_slice(b"DICX");
    let truncated = read("MR_truncated.dcm");
    let mut lying = good.clone();
    // Make the first data set element after the meta group claim 4 GiB - 2 bytes.
    let meta_end = 132 + 12 + u32::from_le_bytes(good[140..144].try_into().unwrap()) as usize;
    lying[meta_end + 6..meta_end + 8].copy_from_slice(&[0xFE, 0xFF]);
    lying.truncate(meta_end + 400);
    let (status, answer) = gateway.stow(
        &gateway.writer_token,
        "studies",
        &[
            wrong_preamble,
            truncated,
            lying,
            b"not dicom at all".to_vec(),
            read("no_meta.dcm"),
            // Its file meta names another SOP instance than its data set.
            read("rtplan.dcm"),
            // It has no Study or Series Instance UID.
            read("JPEGLSNearLossless_08.dcm"),
            // An undefined-length UN, which dicom-rs would read as a 4 GiB value.
            read("UN_sequence.dcm"),
        ],
    );
    assert_eq!(status, 409, "{answer}");
    let failures = answer["00081198"]["Value"].as_array().unwrap();
    assert_eq!(failures.len(), 8);
    for failure in failures {
        let reason = failure["00081197"]["Value"][0].as_u64().unwrap();
        assert!([0xC000, 0xA900, 0xC122].contains(&reason), "{failure}");
    }
    assert!(gateway.qido("studies").is_empty(), "nothing was stored");
    // Garbage framing: a clear 400 and nothing stored.
    let garbage = gateway
        .client
        .post(gateway.dicomweb("studies"))
        .bearer_auth(&gateway.writer_token)
        .header(
            "content-type",
            "multipart/related; type=\"application/dicom\"; boundary=XYZ",
        )
        .body("this is not multipart")
        .send()
        .unwrap();
    assert_eq!(garbage.status().as_u16(), 400);
    let wrong_type = gateway
        .client
        .post(gateway.dicomweb("studies"))
        .bearer_auth(&gateway.writer_token)
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(wrong_type.status().as_u16(), 415);
    // A mix: the good one is stored (202), the bad one reported.
    let (status, answer) =
        gateway.stow(&gateway.writer_token, "studies", &[good, b"junk".to_vec()]);
    assert_eq!(status, 202, "{answer}");
    assert_eq!(gateway.qido("studies").len(), 1);

    // Over DIMSE, an instance without a Study Instance UID fails its own C-STORE (0xA900) and
    // the association goes on to store the next one.
    let report = gateway.python(&[
        "store".into(),
        "--port".into(),
        gateway.dicom_port.to_string(),
        "--aet".into(),
        "STORESCU".into(),
        "--called".into(),
        "GLASTONBURY".into(),
        test_files()
            .join("JPEGLSNearLossless_08.dcm")
            .display()
            .to_string(),
        test_files().join("MR_small_RLE.dcm").display().to_string(),
    ]);
    assert_eq!(report["stores"][0]["status"], 0xA900, "{report}");
    assert_eq!(report["stores"][1]["status"], 0, "{report}");
    // The server's log too: an unanswered C-ECHO here was seen once in CI and not since.
    assert_eq!(
        report["echo_after"],
        0,
        "{report}\nserver log:\n{}",
        gateway.server.log()
    );
}

#[test]
fn dcmtk_and_pynetdicom_echo_store_and_find() {
    let gateway = Gateway::start();
    let echo = gateway.dcmtk("echoscu", "STORESCU", &[], &[]);
    assert!(
        echo.status.success(),
        "{}",
        String::from_utf8_lossy(&echo.stderr)
    );
    let stranger = gateway.dcmtk("echoscu", "STRANGER", &[], &[]);
    assert!(
        !stranger.status.success(),
        "an unknown calling AE is rejected"
    );
    // storescu proposes one family of transfer syntaxes per run: the uncompressed files go
    // through it, the compressed ones through pynetdicom below.
    let uncompressed = [
        "CT_small.dcm",
        "MR_small.dcm",
        "waveform_ecg.dcm",
        "test-SR.dcm",
    ];
    let files: Vec<String> = uncompressed
        .iter()
        .map(|name| test_files().join(name).display().to_string())
        .collect();
    let file_arguments: Vec<&str> = files.iter().map(String::as_str).collect();
    let stored = gateway.dcmtk("storescu", "STORESCU", &[], &file_arguments);
    assert!(
        stored.status.success(),
        "{}",
        String::from_utf8_lossy(&stored.stderr)
    );
    let ct = identity("CT_small.dcm");
    let found = gateway.dcmtk(
        "findscu",
        "FINDSCU",
        &[
            "-S",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            &format!("StudyInstanceUID={}", ct.study_instance_uid),
            "-k",
            "PatientName",
            "-k",
            "ModalitiesInStudy",
        ],
        &[],
    );
    assert!(
        found.status.success(),
        "{}",
        String::from_utf8_lossy(&found.stderr)
    );
    let listing = String::from_utf8_lossy(&found.stderr).to_string()
        + &String::from_utf8_lossy(&found.stdout);
    assert!(listing.contains(&ct.study_instance_uid), "{listing}");
    assert!(listing.contains("CT"), "{listing}");
    // The modality's AE may store but not query.
    let modality_find = gateway.dcmtk(
        "findscu",
        "STORESCU",
        &["-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientName"],
        &[],
    );
    let modality_listing = String::from_utf8_lossy(&modality_find.stderr).to_string();
    assert!(!modality_listing.contains(&ct.study_instance_uid));

    // pynetdicom: stores the rest, then C-FIND by name with a wildcard.
    let rest: Vec<String> = DISTINCT
        .iter()
        .filter(|name| !uncompressed.contains(name))
        .map(|name| test_files().join(name).display().to_string())
        .collect();
    let mut arguments = vec![
        "store".to_owned(),
        "--port".to_owned(),
        gateway.dicom_port.to_string(),
        "--aet".to_owned(),
        "STORESCU".to_owned(),
        "--called".to_owned(),
        "GLASTONBURY".to_owned(),
    ];
    arguments.extend(rest);
    let report = gateway.python(&arguments);
    for store in report["stores"].as_array().unwrap() {
        assert_eq!(store["status"], 0, "{store}");
    }
    assert_eq!(report["echo_after"], 0);
    let name =
        glastonbury_dicom::instance::text_of(&ct.header, dicom_dictionary_std::tags::PATIENT_NAME)
            .unwrap();
    let prefix: String = name.chars().take(2).collect();
    let find = gateway.find_as_workstation(
        "STUDY",
        &[&format!("PatientName={prefix}*"), "StudyInstanceUID="],
    );
    assert_eq!(find["final"], 0, "{find}");
    assert!(
        find["matches"]
            .as_array()
            .unwrap()
            .iter()
            .any(|found| found["StudyInstanceUID"] == ct.study_instance_uid.as_str()),
        "{find}"
    );
    // Patient Root at PATIENT level: one answer per patient, however many studies they have
    // (the CT patient gets a second study first).
    let second_study = gateway.workspace.path().join("second-study.dcm");
    let written = Command::new(python())
        .args([
            "-c",
            "import sys, pydicom; from pydicom.uid import generate_uid as g\n\
             ds = pydicom.dcmread(sys.argv[1])\n\
             ds.StudyInstanceUID, ds.SeriesInstanceUID = g(), g()\n\
             ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = g()\n\
             ds.save_as(sys.argv[2])",
        ])
        .arg(test_files().join("CT_small.dcm"))
        .arg(&second_study)
        .output()
        .unwrap();
    assert!(written.status.success(), "{written:?}");
    let stored = gateway.dcmtk(
        "storescu",
        "STORESCU",
        &[],
        &[second_study.to_str().unwrap()],
    );
    assert!(stored.status.success(), "{stored:?}");
    let patients = gateway.find_as_workstation("PATIENT", &["PatientName=*", "PatientID="]);
    assert_eq!(patients["final"], 0, "{patients}");
    let answered: Vec<String> = patients["matches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|found| format!("{}|{}", found["PatientName"], found["PatientID"]))
        .collect();
    let distinct: BTreeSet<&String> = answered.iter().collect();
    assert_eq!(distinct.len(), answered.len(), "{patients}");
    assert!(
        answered.contains(&"\"CompressedSamples^CT1\"|\"1CT1\"".to_owned()),
        "{patients}"
    );
    // The refusal of the stranger is in the audit journal.
    let compliance = gateway.server.token_for("compliance", &[]);
    let journal = gateway
        .client
        .get(format!("{}/audit?limit=1000", gateway.server.base_url))
        .bearer_auth(&compliance)
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(journal.contains("dicom-association"), "{journal}");
}

#[test]
fn dicomweb_client_stores_searches_and_retrieves() {
    let gateway = Gateway::start();
    let mut arguments = gateway.dicomweb_client_arguments(
        "dicomweb",
        &gateway.writer_token,
        &["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm"],
    );
    // A store-only token stores, then is refused the search.
    let store_only = Command::new(python())
        .arg(repository().join("tests/python/dicom_peers.py"))
        .args(&arguments)
        .output()
        .unwrap();
    assert!(!store_only.status.success(), "the writer may not search");
    assert!(String::from_utf8_lossy(&store_only.stderr).contains("403"));
    // A workstation that may do both.
    arguments[4] = gateway
        .server
        .token_for("clinician", &["system/ImagingStudy.crs"]);
    let report = gateway.python(&arguments);
    assert_eq!(report["failed"], 0, "{report}");
    for round_trip in report["round_trips"].as_array().unwrap() {
        assert_eq!(round_trip["studies_found"], 1, "{round_trip}");
        assert_eq!(round_trip["instances_found"], 1, "{round_trip}");
        assert_eq!(round_trip["same_sop_instance"], true, "{round_trip}");
    }
}

#[test]
fn no_phi_reaches_the_disk_in_the_clear() {
    let mut gateway = Gateway::start();
    let parts: Vec<Vec<u8>> = DISTINCT.iter().map(|name| read(name)).collect();
    assert_eq!(
        gateway.stow(&gateway.writer_token, "studies", &parts).0,
        200
    );
    let mut names = BTreeSet::new();
    for name in DISTINCT {
        let header = identity(name).header;
        for tag in [
            dicom_dictionary_std::tags::PATIENT_NAME,
            dicom_dictionary_std::tags::PATIENT_ID,
            dicom_dictionary_std::tags::ACCESSION_NUMBER,
        ] {
            if let Some(value) = glastonbury_dicom::instance::text_of(&header, tag) {
                for word in value.split(['^', ' ']) {
                    if word.len() >= 5 {
                        names.insert(word.to_owned());
                    }
                }
            }
        }
    }
    assert!(!names.is_empty());
    gateway.server.kill_hard();
    let scanner = aho_corasick::AhoCorasick::new(&names).unwrap();
    let data_dir = gateway.workspace.path().join("data");
    for file in files_under(&data_dir) {
        let bytes = std::fs::read(&file).unwrap();
        if let Some(found) = scanner.find(&bytes) {
            panic!(
                "{} holds {:?} in the clear",
                file.display(),
                String::from_utf8_lossy(&bytes[found.start()..found.end()])
            );
        }
    }
}

/// A patient's instances are encrypted to the FHIR Patient that carries their PatientID, so
/// shredding that patient makes their files and their indexed headers unreadable (WADO-RS
/// metadata and retrieval answer 410), while another patient's study is served as before.
#[test]
fn shredding_a_patient_makes_their_instances_and_headers_unreadable() {
    let gateway = Gateway::start();
    let patient_id = gateway.register_fhir_patient("1CT1");
    let parts = vec![read("CT_small.dcm"), read("MR_small.dcm")];
    assert_eq!(
        gateway.stow(&gateway.writer_token, "studies", &parts).0,
        200
    );
    let shredded = identity("CT_small.dcm");
    let kept = identity("MR_small.dcm");
    let metadata_status = |instance: &glastonbury_dicom::Instance| {
        gateway
            .client
            .get(gateway.dicomweb(&format!("studies/{}/metadata", instance.study_instance_uid)))
            .bearer_auth(&gateway.reader_token)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(metadata_status(&shredded), 200);

    let output = gateway.server.command(&["patient", "shred", &patient_id]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // The server still holds the patient's key (nothing of theirs was read since another process
    // shredded it): the instance sent again is refused as not authorized, and nothing appears.
    let (status, answer) = gateway.stow(&gateway.writer_token, "studies", &[read("CT_small.dcm")]);
    assert_eq!(status, 409, "{answer}");
    let failure = &answer["00081198"]["Value"][0];
    assert_eq!(failure["00081197"]["Value"][0].as_u64(), Some(0x0124));
    assert_eq!(
        failure["00081155"]["Value"][0].as_str(),
        Some(shredded.sop_instance_uid.as_str())
    );
    assert_eq!(metadata_status(&shredded), 410);
    let retrieval = gateway
        .client
        .get(gateway.dicomweb(&format!(
            "studies/{}/series/{}/instances/{}",
            shredded.study_instance_uid, shredded.series_instance_uid, shredded.sop_instance_uid
        )))
        .bearer_auth(&gateway.reader_token)
        .header(
            "accept",
            "multipart/related; type=\"application/dicom\"; transfer-syntax=*",
        )
        .send()
        .unwrap();
    assert_eq!(retrieval.status().as_u16(), 410);
    assert_eq!(metadata_status(&kept), 200);
    let every_study = gateway.qido("studies");
    assert_eq!(
        every_study.len(),
        1,
        "a shredded study matches nothing and fails no query"
    );
    assert_eq!(
        text(&every_study[0], "0020000D").as_deref(),
        Some(kept.study_instance_uid.as_str())
    );
    let found = gateway.qido(&format!(
        "studies?StudyInstanceUID={}&includefield=PatientID",
        kept.study_instance_uid
    ));
    assert_eq!(found.len(), 1);
    assert_eq!(text(&found[0], "00100020").as_deref(), Some("4MR1"));
}

#[test]
fn an_instance_stored_after_its_patient_is_registered_in_fhir_belongs_to_that_patient() {
    let gateway = Gateway::start();
    let mr = identity("MR_small.dcm");
    let metadata_status = || {
        gateway
            .client
            .get(gateway.dicomweb(&format!("studies/{}/metadata", mr.study_instance_uid)))
            .bearer_auth(&gateway.reader_token)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    // Stored while no FHIR Patient has its PatientID: a DICOM-only patient owns it.
    assert_eq!(
        gateway
            .stow(&gateway.writer_token, "studies", &[read("MR_small.dcm")])
            .0,
        200
    );
    let patient_id = gateway.register_fhir_patient("4MR1");
    // Sent again once the Patient exists: the new version is the FHIR Patient's.
    assert_eq!(
        gateway
            .stow(&gateway.writer_token, "studies", &[read("MR_small.dcm")])
            .0,
        200
    );
    assert_eq!(metadata_status(), 200);

    let output = gateway.server.command(&["patient", "shred", &patient_id]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        metadata_status(),
        410,
        "the instance stored after the Patient was registered is under that Patient's key"
    );
}

#[test]
fn offline_deidentification_is_complete_and_leaves_its_input_alone() {
    let scratch = tempfile::tempdir().unwrap();
    let input = scratch.path().join("in");
    std::fs::create_dir(&input).unwrap();
    for name in [
        "CT_small.dcm",
        "MR_small.dcm",
        "test-SR.dcm",
        "rtplan.dcm",
        "priv_SQ.dcm",
    ] {
        std::fs::copy(test_files().join(name), input.join(name)).unwrap();
    }
    let before: Vec<Vec<u8>> = files_under(&input)
        .iter()
        .map(|file| std::fs::read(file).unwrap())
        .collect();
    let output = scratch.path().join("out");
    let run = Command::new(crate::common::binary())
        .args(["deid", "dicom"])
        .arg(&input)
        .arg(&output)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let after: Vec<Vec<u8>> = files_under(&input)
        .iter()
        .map(|file| std::fs::read(file).unwrap())
        .collect();
    assert_eq!(before, after, "the input is never modified");
    let table = repository().join("dicom/data/confidentiality-profile.json");
    let mut study_uids = BTreeSet::new();
    let mut checked = 0;
    for name in [
        "CT_small.dcm",
        "MR_small.dcm",
        "test-SR.dcm",
        "rtplan.dcm",
        "priv_SQ.dcm",
    ] {
        let check = Command::new(python())
            .arg(repository().join("tests/python/dicom_peers.py"))
            .args(["check-deid", "--table"])
            .arg(&table)
            .arg(input.join(name))
            .arg(output.join(name))
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stderr)
        );
        let report: Value = serde_json::from_slice(&check.stdout).unwrap();
        checked += report["checked"].as_u64().unwrap();
        assert_eq!(
            report["problems"],
            serde_json::json!([]),
            "{name}: {report}"
        );
        if let Some(uid) = report["study_uid"].as_str().filter(|uid| !uid.is_empty()) {
            study_uids.insert(uid.to_owned());
        }
    }
    assert!(
        checked > 50,
        "Table E.1-1 attributes were checked: {checked}"
    );
    assert!(!study_uids.is_empty());
    assert!(study_uids.iter().all(|uid| uid.starts_with("2.25.")));
    let _ = Path::new("");
}

#[test]
fn a_research_feed_is_deidentified_on_ingest_by_policy() {
    let policies = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(repository().join("policies")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, policies.path().join(path.file_name().unwrap())).unwrap();
    }
    let profiles = policies.path().join("deidentification.toml");
    let mut policy = std::fs::read_to_string(&profiles).unwrap();
    policy.push_str("\n[ingest]\nRESEARCH = \"research\"\n");
    std::fs::write(&profiles, policy).unwrap();
    let folder = policies.path().display().to_string();
    let gateway = Gateway::start_with(&[("GLASTONBURY_POLICIES_DIR", folder.as_str())]);
    let ct = identity("CT_small.dcm");
    let store_from_research = || {
        gateway.python(&[
            "store".into(),
            "--port".into(),
            gateway.dicom_port.to_string(),
            "--aet".into(),
            "RESEARCH".into(),
            "--called".into(),
            "GLASTONBURY".into(),
            test_files().join("CT_small.dcm").display().to_string(),
        ])
    };
    let report = store_from_research();
    assert_eq!(report["stores"][0]["status"], 0, "{report}");
    assert!(
        gateway
            .qido(&format!(
                "studies?StudyInstanceUID={}",
                ct.study_instance_uid
            ))
            .is_empty(),
        "the original study UID was not stored"
    );
    let studies = gateway.qido("studies");
    assert_eq!(studies.len(), 1);
    let study_uid = text(&studies[0], "0020000D").unwrap();
    assert!(study_uid.starts_with("2.25."), "{study_uid}");
    let original_name =
        glastonbury_dicom::instance::text_of(&ct.header, dicom_dictionary_std::tags::PATIENT_NAME)
            .unwrap();
    assert!(!studies[0].to_string().contains(&original_name));
    let instances = gateway.qido(&format!("studies/{study_uid}/instances"));
    let series_uid = text(&instances[0], "0020000E").unwrap();
    let instance_uid = text(&instances[0], "00080018").unwrap();
    let stored = glastonbury_dicom::instance::from_part10(gateway.retrieve(
        &study_uid,
        &series_uid,
        &instance_uid,
    ))
    .unwrap();
    assert_eq!(
        glastonbury_dicom::instance::text_of(
            &stored.header,
            dicom_dictionary_std::tags::PATIENT_IDENTITY_REMOVED
        )
        .as_deref(),
        Some("YES")
    );
    // The same feed storing the same image again maps to the same UIDs (one study, one instance).
    store_from_research();
    assert_eq!(
        gateway
            .qido(&format!("studies/{study_uid}/instances"))
            .len(),
        1
    );
    // Other sources are stored as sent.
    assert_eq!(
        gateway
            .stow(&gateway.writer_token, "studies", &[read("CT_small.dcm")])
            .0,
        200
    );
    assert_eq!(
        gateway
            .qido(&format!(
                "studies?StudyInstanceUID={}",
                ct.study_instance_uid
            ))
            .len(),
        1
    );
}

/// Every image transfer syntax of the corpus, lossless and lossy, with the same MR image in
/// several lossless encodings (their renderings must agree).
const RENDERED: &[&str] = &[
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "CT_small.dcm",
    "JPEG2000.dcm",
    "JPGExtended.dcm",
    "JPEGLSNearLossless_16.dcm",
    "SC_rgb_jpeg_gdcm.dcm",
    "SC_rgb_dcmtk_+eb+cr.dcm",
    "SC_rgb_dcmtk_+eb+cy+np.dcm",
    "SC_rgb_rle.dcm",
    "SC_rgb_gdcm_KY.dcm",
    "SC_ybr_full_422_uncompressed.dcm",
    "examples_palette.dcm",
    "examples_ybr_color.dcm",
    "image_dfl.dcm",
    "SC_rgb_rle_2frame.dcm",
    "liver_1frame.dcm",
    "SC_rgb_jls_lossy_line.dcm",
];

#[test]
fn frames_and_rendered_images_for_every_transfer_syntax() {
    let gateway = Gateway::start();
    let workstation = gateway
        .server
        .token_for("clinician", &["system/ImagingStudy.crs"]);
    let arguments = gateway.dicomweb_client_arguments("frames-and-renders", &workstation, RENDERED);
    let report = gateway.python(&arguments);
    for entry in report["files"].as_array().unwrap() {
        let name = entry["file"].as_str().unwrap();
        assert_eq!(entry["frame_matches"], true, "{name}: {entry}");
        // Color JPEG-LS and 12-bit JPEG are served as frames but not rendered, and say why.
        let not_rendered = match name {
            "SC_rgb_jls_lossy_line.dcm" => Some("JPEG-LS"),
            "JPGExtended.dcm" => Some("12-bit"),
            _ => None,
        };
        if let Some(reason) = not_rendered {
            assert_eq!(entry["render_status"], 406, "{entry}");
            assert!(entry["render_detail"].as_str().unwrap().contains(reason));
            continue;
        }
        assert_eq!(entry["render_status"], 200, "{name}: {entry}");
        assert_eq!(entry["jpeg_format"], "JPEG", "{name}");
        let shape = entry["png_shape"].as_array().unwrap();
        assert_eq!(shape[0], entry["rows_columns"][0], "{name}: {entry}");
        assert_eq!(shape[1], entry["rows_columns"][1], "{name}: {entry}");
        assert!(
            entry["distinct_values"].as_u64().unwrap() > 1,
            "{name} rendered as a flat image: {entry}"
        );
        if let Some(difference) = entry["max_difference_from_independent"].as_f64() {
            assert!(difference <= 1.0, "{name}: {entry}");
        }
    }
    let independently_checked = report["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|entry| entry["max_difference_from_independent"].is_number())
        .count();
    assert!(independently_checked >= 5, "{report}");
    // The same MR image decoded from every lossless encoding renders the same.
    for encoding in [
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
    ] {
        let same = &report["same_image_as"][encoding];
        assert_eq!(same["reference"], "MR_small.dcm", "{encoding}: {same}");
        assert_eq!(same["max_difference"], 0.0, "{encoding}: {same}");
    }

    // Raw requests: a frame that does not exist, a bad frame list, a window, a refused format,
    // an unknown rendering parameter, and a reader without PHI access.
    let ct = identity("CT_small.dcm");
    let instance = format!(
        "studies/{}/series/{}/instances/{}",
        ct.study_instance_uid, ct.series_instance_uid, ct.sop_instance_uid
    );
    let get = |path: &str, accept: &str| {
        gateway
            .client
            .get(gateway.dicomweb(path))
            .bearer_auth(&gateway.reader_token)
            .header("accept", accept)
            .send()
            .unwrap()
    };
    let missing = get(&format!("{instance}/frames/2"), "*/*");
    assert_eq!(missing.status().as_u16(), 404);
    assert!(missing.text().unwrap().contains("frame 2 does not exist"));
    assert_eq!(
        get(&format!("{instance}/frames/0,x"), "*/*")
            .status()
            .as_u16(),
        400
    );
    let compressed_as_native = get(
        &format!(
            "studies/{}/series/{}/instances/{}/frames/1",
            identity("JPEG2000.dcm").study_instance_uid,
            identity("JPEG2000.dcm").series_instance_uid,
            identity("JPEG2000.dcm").sop_instance_uid
        ),
        "multipart/related; type=\"application/octet-stream\"",
    );
    assert_eq!(compressed_as_native.status().as_u16(), 406);
    let narrow = get(&format!("{instance}/rendered?window=40,80"), "image/png");
    let wide = get(&format!("{instance}/rendered?window=40,4000"), "image/png");
    assert_eq!(narrow.status().as_u16(), 200);
    assert_eq!(narrow.headers()["content-type"], "image/png");
    assert_ne!(
        narrow.bytes().unwrap(),
        wide.bytes().unwrap(),
        "the window changes the image"
    );
    assert_eq!(
        get(&format!("{instance}/rendered"), "image/gif")
            .status()
            .as_u16(),
        406
    );
    let unknown = get(
        &format!("{instance}/rendered?annotation=patient"),
        "image/jpeg",
    );
    assert_eq!(unknown.status().as_u16(), 400);
    assert!(unknown.text().unwrap().contains("annotation"));
    // CT_small is 128 × 128: a 64 × 32 viewport makes a 32 × 32 image, a thumbnail 128 × 128.
    let fitted = get(&format!("{instance}/rendered?viewport=64,32"), "image/png");
    assert_eq!(fitted.status().as_u16(), 200);
    let fitted = fitted.bytes().unwrap();
    assert_eq!(png_size(&fitted), (32, 32));
    let thumbnail = get(&format!("{instance}/thumbnail"), "image/png")
        .bytes()
        .unwrap();
    assert_eq!(png_size(&thumbnail), (128, 128));
    let rendered_frame = get(&format!("{instance}/frames/1/rendered"), "image/jpeg");
    assert_eq!(rendered_frame.status().as_u16(), 200);
    assert_eq!(&rendered_frame.bytes().unwrap()[..2], &[0xFF, 0xD8]);
    let store_only = gateway
        .client
        .get(gateway.dicomweb(&format!("{instance}/rendered")))
        .bearer_auth(&gateway.writer_token)
        .send()
        .unwrap();
    assert_eq!(store_only.status().as_u16(), 403);
}

#[test]
fn dimse_over_tls_verifies_the_server_and_admits_registered_peers_only() {
    let certificates = tempfile::tempdir().unwrap();
    let certificate = certificates.path().join("cert.pem");
    let key = certificates.path().join("key.pem");
    let generated = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&certificate)
        .output()
        .unwrap();
    assert!(generated.status.success(), "{generated:?}");
    let tls_port = free_port();
    let tls_addr = format!("127.0.0.1:{tls_port}");
    let gateway = Gateway::start_with(&[
        ("GLASTONBURY_DICOM_TLS_CERT", certificate.to_str().unwrap()),
        ("GLASTONBURY_DICOM_TLS_KEY", key.to_str().unwrap()),
        ("GLASTONBURY_DICOM_TLS_ADDR", tls_addr.as_str()),
    ]);
    let tls_tool = |program: &str, aet: &str, trailing: &[&str]| {
        Command::new(program)
            .args(["+tla", "+cf"])
            .arg(&certificate)
            .args(["-aet", aet, "-aec", "GLASTONBURY", "127.0.0.1"])
            .arg(tls_port.to_string())
            .args(trailing)
            .output()
            .unwrap()
    };
    let echo = tls_tool("echoscu", "FINDSCU", &[]);
    assert!(echo.status.success(), "{echo:?}");
    let ct = test_files().join("CT_small.dcm");
    let store = tls_tool("storescu", "STORESCU", &[ct.to_str().unwrap()]);
    assert!(store.status.success(), "{store:?}");
    let stored = gateway.qido(&format!(
        "studies?StudyInstanceUID={}",
        identity("CT_small.dcm").study_instance_uid
    ));
    assert_eq!(stored.len(), 1);
    // An unregistered AE is refused over TLS as in the clear.
    let stranger = tls_tool("echoscu", "STRANGER", &[]);
    assert!(!stranger.status.success());
    // A peer that does not speak TLS gets nowhere on the TLS port, and the plain port still
    // answers.
    let plain = Command::new("echoscu")
        .args([
            "-aet",
            "FINDSCU",
            "-aec",
            "GLASTONBURY",
            "-to",
            "5",
            "127.0.0.1",
        ])
        .arg(tls_port.to_string())
        .output()
        .unwrap();
    assert!(!plain.status.success());
    let plain_port = gateway.dcmtk("echoscu", "FINDSCU", &[], &[]);
    assert!(plain_port.status.success(), "{plain_port:?}");
}

#[test]
fn researchers_get_dicom_deidentified_with_remapped_uids_they_can_follow() {
    let gateway = Gateway::start();
    let ct = identity("CT_small.dcm");
    let (status, _) = gateway.stow(&gateway.writer_token, "studies", &[read("CT_small.dcm")]);
    assert_eq!(status, 200);
    let researcher = gateway
        .server
        .token_for("researcher", &["system/ImagingStudy.rs"]);
    let get = |path: &str, accept: &str| {
        gateway
            .client
            .get(gateway.dicomweb(path))
            .bearer_auth(&researcher)
            .header("accept", accept)
            .send()
            .unwrap()
    };
    // QIDO: the study is found, de-identified, under a remapped UID.
    let studies: Vec<Value> = get("studies?includefield=all", "application/dicom+json")
        .json()
        .unwrap();
    assert_eq!(studies.len(), 1, "{studies:?}");
    let shown_study = text(&studies[0], "0020000D").unwrap();
    assert_ne!(shown_study, ct.study_instance_uid);
    assert!(shown_study.starts_with("2.25."), "{shown_study}");
    let listed = studies[0].to_string();
    for identifying in [
        "CompressedSamples^CT1",
        "1CT1",
        "JFK IMAGING CENTER",
        "20040119",
    ] {
        assert!(
            !listed.contains(identifying),
            "{identifying} in the de-identified QIDO result: {listed}"
        );
    }
    // Matching that could re-identify is refused; matching on the remapped UID is not.
    let by_name = get("studies?PatientName=Compressed*", "application/dicom+json");
    assert_eq!(by_name.status().as_u16(), 400);
    assert!(by_name.text().unwrap().contains("PatientName"));
    let series: Vec<Value> = get(
        &format!("studies/{shown_study}/series"),
        "application/dicom+json",
    )
    .json()
    .unwrap();
    assert_eq!(series.len(), 1);
    let shown_series = text(&series[0], "0020000E").unwrap();
    let instances: Vec<Value> = get(
        &format!("studies/{shown_study}/series/{shown_series}/instances"),
        "application/dicom+json",
    )
    .json()
    .unwrap();
    let shown_instance = text(&instances[0], "00080018").unwrap();
    assert_ne!(shown_instance, ct.sop_instance_uid);
    // WADO-RS by the remapped UIDs: a de-identified Part 10 file, pixels intact.
    let instance_path =
        format!("studies/{shown_study}/series/{shown_series}/instances/{shown_instance}");
    let response = get(
        &instance_path,
        "multipart/related; type=\"application/dicom\"; transfer-syntax=*",
    );
    assert_eq!(response.status().as_u16(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    let boundary = glastonbury_dicom::multipart::boundary_of(&content_type).unwrap();
    let mut reader = glastonbury_dicom::multipart::PartReader::new(&boundary, 1 << 30);
    let mut parts = reader.push(&response.bytes().unwrap()).unwrap();
    reader.finish().unwrap();
    let retrieved = glastonbury_dicom::instance::from_part10(parts.remove(0).body).unwrap();
    assert_eq!(retrieved.sop_instance_uid, shown_instance);
    assert_eq!(retrieved.study_instance_uid, shown_study);
    let patient_name = glastonbury_dicom::instance::text_of(
        &retrieved.header,
        dicom_dictionary_std::tags::PATIENT_NAME,
    );
    assert!(
        patient_name.is_none_or(|name| !name.contains("CompressedSamples")),
        "the patient's name left with the file"
    );
    let original = glastonbury_dicom::instance::read_whole(&read("CT_small.dcm")).unwrap();
    let shown = glastonbury_dicom::instance::read_whole(&retrieved.part10).unwrap();
    assert_eq!(
        glastonbury_dicom::frames::extract(&original, &[1]).unwrap(),
        glastonbury_dicom::frames::extract(&shown, &[1]).unwrap(),
        "de-identification keeps the pixels"
    );
    // Metadata and rendered images follow the same remapped UIDs.
    let metadata: Vec<Value> = get(
        &format!("{instance_path}/metadata"),
        "application/dicom+json",
    )
    .json()
    .unwrap();
    assert!(!metadata[0].to_string().contains("CompressedSamples"));
    assert_eq!(text(&metadata[0], "00120062").as_deref(), Some("YES"));
    assert_eq!(
        get(&format!("{instance_path}/rendered"), "image/png")
            .status()
            .as_u16(),
        200
    );
    // The real UIDs are no oracle in the de-identified view.
    let by_real_uid = get(
        &format!(
            "studies/{}/series/{}/instances/{}",
            ct.study_instance_uid, ct.series_instance_uid, ct.sop_instance_uid
        ),
        "multipart/related; type=\"application/dicom\"; transfer-syntax=*",
    );
    assert_eq!(by_real_uid.status().as_u16(), 404);
    // The study's FHIR ImagingStudy, in the same view, names it by the same remapped UIDs.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let imaging_study = loop {
        let bundle: Value = gateway
            .client
            .get(format!("{}/fhir/ImagingStudy", gateway.server.base_url))
            .bearer_auth(&researcher)
            .send()
            .unwrap()
            .json()
            .unwrap();
        if let Some(resource) = bundle["entry"][0]["resource"].as_object() {
            break Value::Object(resource.clone());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no ImagingStudy: {bundle}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(imaging_study["series"][0]["uid"], shown_series.as_str());
    assert_eq!(
        imaging_study["series"][0]["instance"][0]["uid"],
        shown_instance.as_str()
    );
    assert_eq!(
        imaging_study["identifier"][0]["value"],
        format!("urn:oid:{shown_study}").as_str()
    );
    assert!(!imaging_study.to_string().contains(&ct.series_instance_uid));
    // A clinician still sees the study as stored.
    let clinical = gateway.qido(&format!(
        "studies?StudyInstanceUID={}",
        ct.study_instance_uid
    ));
    assert_eq!(clinical.len(), 1);
}

/// A body that arrives in small pieces with pauses between them, as from a slow link.
struct SlowBody {
    bytes: Vec<u8>,
    sent: usize,
    piece: usize,
    pause: std::time::Duration,
}

impl std::io::Read for SlowBody {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        if self.sent == self.bytes.len() {
            return Ok(0);
        }
        if self.sent > 0 {
            std::thread::sleep(self.pause);
        }
        let end = (self.sent + self.piece.min(buffer.len())).min(self.bytes.len());
        let count = end - self.sent;
        buffer[..count].copy_from_slice(&self.bytes[self.sent..end]);
        self.sent = end;
        Ok(count)
    }
}

#[test]
fn a_stow_upload_may_outlast_the_request_timeout_while_data_keeps_coming() {
    let gateway = Gateway::start_with(&[("GLASTONBURY_REQUEST_TIMEOUT_SECONDS", "1")]);
    let boundary = "slow-link";
    let mut body = format!("--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").into_bytes();
    body.extend(read("CT_small.dcm"));
    body.extend(format!("\r\n--{boundary}--\r\n").as_bytes());
    // About 3 s in all, never more than 0.3 s without data.
    let piece = body.len() / 10 + 1;
    let slow = SlowBody {
        bytes: body,
        sent: 0,
        piece,
        pause: std::time::Duration::from_millis(300),
    };
    let started = std::time::Instant::now();
    let response = gateway
        .client
        .post(gateway.dicomweb("studies"))
        .bearer_auth(&gateway.writer_token)
        .header(
            "content-type",
            format!("multipart/related; type=\"application/dicom\"; boundary={boundary}"),
        )
        .body(reqwest::blocking::Body::new(slow))
        .send()
        .unwrap();
    assert!(started.elapsed() > std::time::Duration::from_secs(2));
    assert_eq!(response.status().as_u16(), 200, "{:?}", response.text());
    let ct = identity("CT_small.dcm");
    assert_eq!(
        gateway
            .qido(&format!(
                "studies?StudyInstanceUID={}",
                ct.study_instance_uid
            ))
            .len(),
        1
    );
}

/// Width and height from a PNG's IHDR chunk.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    (width, height)
}
