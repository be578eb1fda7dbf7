//! The compliance officer's view, end to end through the real binary: the `/audit` API (role
//! checks, filters, paging, disclosures, checkpoint, public key), and the `audit` commands:
//! export in three formats, offline verification on a machine without the database (chained to
//! the previous export, tampering named), fsck, disclosures and signing key rotation.

use std::path::Path;
use std::process::{Command, Output};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use reqwest::blocking::Client;
use serde_json::{Value, json};

use crate::common::{Server, binary};

struct Officer {
    client: Client,
    base_url: String,
    token: String,
}

impl Officer {
    fn get(&self, path: &str) -> (u16, String, Value) {
        let response = self
            .client
            .get(format!("{}{path}", self.base_url))
            .bearer_auth(&self.token)
            .send()
            .unwrap();
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|value| value.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let text = response.text().unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, content_type, body)
    }
}

fn create(client: &Client, server: &Server, token: &str, resource: &Value) -> String {
    let response = client
        .post(format!(
            "{}/fhir/{}",
            server.base_url,
            resource["resourceType"].as_str().unwrap()
        ))
        .bearer_auth(token)
        .header("content-type", "application/fhir+json")
        .json(resource)
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    let body: Value = response.json().unwrap();
    body["id"].as_str().unwrap().to_owned()
}

fn succeeded(output: &Output) -> String {
    assert!(
        output.status.success(),
        "command failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

/// `glastonbury audit verify` on a "machine" that has never seen the appliance: an empty
/// environment whose data dir does not exist.
fn verify_offline(root: &Path, arguments: &[&str]) -> Output {
    let nowhere = root.join("no-appliance-here");
    let mut command = Command::new(binary());
    command.args(["audit", "verify"]).args(arguments);
    for (name, _) in std::env::vars() {
        if name.starts_with("GLASTONBURY_") {
            command.env_remove(name);
        }
    }
    let output = command
        .env("GLASTONBURY_DATA_DIR", &nowhere)
        .current_dir(root)
        .output()
        .unwrap();
    assert!(!nowhere.exists(), "verify must not create an appliance");
    output
}

#[test]
fn compliance_officers_query_export_and_verify_offline() {
    let workspace = tempfile::tempdir().unwrap();
    let server = Server::start(&workspace.path().join("data"), &[]);
    let client = Client::new();
    let clinician = server.token_for("clinician", &["system/*.cruds"]);
    let officer = Officer {
        client: client.clone(),
        base_url: server.base_url.clone(),
        token: server.token_for("compliance", &[]),
    };

    let patient = create(
        &client,
        &server,
        &clinician,
        &json!({"resourceType": "Patient", "name": [{"family": "Auditee"}]}),
    );
    let observation = create(
        &client,
        &server,
        &clinician,
        &json!({"resourceType": "Observation", "status": "final", "code": {"text": "hr"},
                "subject": {"reference": format!("Patient/{patient}")}}),
    );
    let read_without_purpose = client
        .get(format!(
            "{}/fhir/Observation/{observation}",
            server.base_url
        ))
        .bearer_auth(&clinician)
        .send()
        .unwrap();
    assert_eq!(read_without_purpose.status().as_u16(), 200);

    // Only compliance officers read the journal; the clinician's attempt is itself journaled.
    let refused = client
        .get(format!("{}/audit", server.base_url))
        .bearer_auth(&clinician)
        .send()
        .unwrap();
    assert_eq!(refused.status().as_u16(), 403);
    assert_eq!(
        refused.headers()["content-type"].to_str().unwrap(),
        "application/problem+json"
    );
    let anonymous = client
        .get(format!("{}/audit", server.base_url))
        .send()
        .unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);

    let (status, _, page) = officer.get(&format!("/audit?patient={patient}"));
    assert_eq!(status, 200);
    let entries = page["entries"].as_array().unwrap();
    assert_eq!(
        entries.len(),
        4,
        "create patient, create observation, read, and this query itself: {page}"
    );
    assert_eq!(entries[3]["event"]["event_type"]["code"], "110101");
    assert!(
        entries
            .iter()
            .all(|entry| entry["event"]["entities"][0]["patient_pseudonym"].is_string())
    );
    assert!(
        !page.to_string().contains("Auditee"),
        "no PHI in the journal"
    );
    let (_, _, denials) = officer.get("/audit?type=110113");
    assert_eq!(denials["entries"].as_array().unwrap().len(), 1);
    assert_eq!(denials["entries"][0]["event"]["outcome"], 4);
    let (_, _, first_page) = officer.get("/audit?limit=2");
    let next = first_page["next"]
        .as_str()
        .expect("a next link while more remain");
    let (_, _, second_page) = officer.get(next);
    assert_eq!(
        second_page["entries"][0]["index"].as_u64().unwrap(),
        first_page["entries"][1]["index"].as_u64().unwrap() + 1
    );
    let (status, _, problem) = officer.get("/audit?since=yesterday");
    assert_eq!(status, 400, "{problem}");
    let (_, _, used) = officer.get("/audit?type=110101");
    let queries = used["entries"].as_array().unwrap();
    assert!(
        queries
            .iter()
            .any(|entry| entry["detail"] == format!("patient={patient}")),
        "the officer's own patient query is journaled with its (sealed) text: {used}"
    );

    let (_, _, disclosures) = officer.get(&format!("/audit/disclosures?patient={patient}"));
    let listed = disclosures["disclosures"].as_array().unwrap();
    assert_eq!(
        listed.len(),
        1,
        "only the read (no stated purpose) needs accounting: {disclosures}"
    );
    assert_eq!(
        listed[0]["purpose"], "not stated",
        "a read without a stated purpose is accounted for"
    );
    assert!(
        listed[0]["description"]
            .as_str()
            .unwrap()
            .starts_with("read Observation/")
    );

    let (status, content_type, checkpoint) = officer.get("/audit/checkpoint");
    assert_eq!(status, 200);
    assert!(content_type.starts_with("text/plain"));
    assert!(
        checkpoint
            .as_str()
            .unwrap()
            .contains("/glastonbury-audit\n")
    );

    // Exports and offline verification.
    let key = succeeded(&server.command(&["audit", "public-key"]))
        .trim()
        .to_owned();
    let (_, _, published) = officer.get("/audit/public-key");
    assert_eq!(published["current"], key.as_str());
    let first = workspace.path().join("first.json");
    succeeded(&server.command(&["audit", "export", "--out", first.to_str().unwrap()]));
    let verified = succeeded(&verify_offline(
        workspace.path(),
        &[first.to_str().unwrap(), "--trusted-key", &key],
    ));
    assert!(verified.starts_with("ok: "), "{verified}");
    let no_key = verify_offline(workspace.path(), &[first.to_str().unwrap()]);
    assert!(!no_key.status.success());
    assert!(String::from_utf8_lossy(&no_key.stderr).contains("--trusted-key"));

    create(
        &client,
        &server,
        &clinician,
        &json!({"resourceType": "Patient", "name": [{"family": "Later"}]}),
    );
    let second = workspace.path().join("second.json");
    succeeded(&server.command(&[
        "audit",
        "export",
        "--out",
        second.to_str().unwrap(),
        "--previous",
        first.to_str().unwrap(),
    ]));
    let chained = succeeded(&verify_offline(
        workspace.path(),
        &[
            second.to_str().unwrap(),
            "--trusted-key",
            &key,
            "--previous",
            first.to_str().unwrap(),
        ],
    ));
    assert!(
        chained.contains("consistent with the previous export"),
        "{chained}"
    );

    let mut export: Value = serde_json::from_slice(&std::fs::read(&second).unwrap()).unwrap();
    let victim = export["entries"][3]["index"].as_u64().unwrap();
    let mut leaf = BASE64
        .decode(export["entries"][3]["leaf"].as_str().unwrap())
        .unwrap();
    let position = leaf.iter().position(|byte| *byte == b'R').unwrap();
    leaf[position] = b'X';
    export["entries"][3]["leaf"] = json!(BASE64.encode(&leaf));
    let tampered = workspace.path().join("tampered.json");
    std::fs::write(&tampered, serde_json::to_vec(&export).unwrap()).unwrap();
    let refused = verify_offline(
        workspace.path(),
        &[tampered.to_str().unwrap(), "--trusted-key", &key],
    );
    assert!(!refused.status.success());
    let complaint = String::from_utf8_lossy(&refused.stderr);
    assert!(
        complaint.contains(&format!("entry {victim}")),
        "the changed entry {victim} is named: {complaint}"
    );

    let bundle_path = workspace.path().join("bundle.json");
    succeeded(&server.command(&[
        "audit",
        "export",
        "--format",
        "fhir",
        "--patient",
        &patient,
        "--out",
        bundle_path.to_str().unwrap(),
    ]));
    let bundle: Value = serde_json::from_slice(&std::fs::read(&bundle_path).unwrap()).unwrap();
    assert_eq!(bundle["resourceType"], "Bundle");
    assert!(bundle["entry"].as_array().unwrap().len() >= 3);
    assert!(
        bundle["entry"]
            .as_array()
            .unwrap()
            .iter()
            .all(|entry| entry["resource"]["resourceType"] == "AuditEvent")
    );
    let csv_path = workspace.path().join("audit.csv");
    succeeded(&server.command(&[
        "audit",
        "export",
        "--format",
        "csv",
        "--out",
        csv_path.to_str().unwrap(),
    ]));
    let csv = std::fs::read_to_string(&csv_path).unwrap();
    assert!(csv.starts_with("index,recorded,event_type,"));
    assert!(csv.lines().count() > 5);

    let accounting = succeeded(&server.command(&["audit", "disclosures", "--patient", &patient]));
    assert!(accounting.contains("not stated"), "{accounting}");

    // Rotation: old checkpoints keep verifying with the old key, new exports use the new one.
    succeeded(&server.command(&["audit", "rotate-key"]));
    let keys = succeeded(&server.command(&["audit", "public-key", "--all"]));
    assert_eq!(keys.lines().count(), 2);
    let new_key = succeeded(&server.command(&["audit", "public-key"]))
        .trim()
        .to_owned();
    assert_ne!(new_key, key);
    let third = workspace.path().join("third.json");
    succeeded(&server.command(&[
        "audit",
        "export",
        "--out",
        third.to_str().unwrap(),
        "--previous",
        second.to_str().unwrap(),
    ]));
    let keys_file = workspace.path().join("keys.txt");
    std::fs::write(&keys_file, &keys).unwrap();
    succeeded(&verify_offline(
        workspace.path(),
        &[
            third.to_str().unwrap(),
            "--trusted-key",
            keys_file.to_str().unwrap(),
            "--previous",
            second.to_str().unwrap(),
        ],
    ));
    let fsck = succeeded(&server.command(&["audit", "fsck"]));
    assert!(fsck.starts_with("ok: "), "{fsck}");
}
