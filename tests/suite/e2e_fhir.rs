//! The FHIR R4 server end to end through the real binary: CRUD with versions and conditions,
//! PATCH, Prefer, errors as OperationOutcome, search of every parameter type over the blind
//! index (both engines), paging, includes, transactions and batches, history, `$everything`,
//! the synthetic population with a PHI scan of everything at rest, and the Python `fhirpy` client.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use glastonbury_fhir::synthetic::{SyntheticPatient, synthetic_patient};
use reqwest::blocking::{Client, RequestBuilder};
use serde_json::{Value, json};

use crate::common::{Server, TemporaryPostgres, files_under, postgres_admin_url};
use crate::e2e_core::{assert_no_hits, pg_dump};

/// A running server with a clinician token.
pub(crate) struct FhirServer {
    pub(crate) workspace: tempfile::TempDir,
    pub(crate) server: Server,
    pub(crate) client: Client,
    pub(crate) token: String,
    pub(crate) _database: Option<TemporaryPostgres>,
}

/// One HTTP answer.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) body: Value,
    pub(crate) headers: reqwest::header::HeaderMap,
}

impl Reply {
    pub(crate) fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    }

    fn issue_code(&self) -> &str {
        self.body["issue"][0]["code"].as_str().unwrap_or_default()
    }
}

#[derive(Clone, Copy)]
pub(crate) enum Engine {
    Sqlite,
    Postgres,
}

impl FhirServer {
    pub(crate) fn start(engine: Engine) -> Option<Self> {
        Self::start_with(engine, &[])
    }

    pub(crate) fn start_with(engine: Engine, settings: &[(&str, &str)]) -> Option<Self> {
        let workspace = tempfile::tempdir().unwrap();
        let database = match engine {
            Engine::Sqlite => None,
            Engine::Postgres => {
                let Some(admin_url) = postgres_admin_url() else {
                    println!(
                        "notice: GLASTONBURY_TEST_DATABASE_URL is not set; skipping the PostgreSQL run"
                    );
                    return None;
                };
                Some(TemporaryPostgres::create(&admin_url))
            }
        };
        let mut environment: Vec<(&str, &str)> = database
            .as_ref()
            .map(|database| vec![("GLASTONBURY_DATABASE_URL", database.url.as_str())])
            .unwrap_or_default();
        environment.extend_from_slice(settings);
        let server = Server::start(&workspace.path().join("data"), &environment);
        let token = server.token_for("clinician", &["system/*.cruds"]);
        Some(Self {
            workspace,
            server,
            client: Client::new(),
            token,
            _database: database,
        })
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}/fhir/{path}", self.server.base_url)
    }

    pub(crate) fn send(&self, request: RequestBuilder) -> Reply {
        self.send_as(&self.token, request)
    }

    /// Sends `request` with another caller's bearer token.
    pub(crate) fn send_as(&self, token: &str, request: RequestBuilder) -> Reply {
        let response = request.bearer_auth(token).send().unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Reply {
            status,
            body,
            headers,
        }
    }

    pub(crate) fn get(&self, path: &str) -> Reply {
        self.send(self.client.get(self.url(path)))
    }

    pub(crate) fn post(&self, path: &str, body: &Value) -> Reply {
        self.send(
            self.client
                .post(self.url(path))
                .header("content-type", "application/fhir+json")
                .body(body.to_string()),
        )
    }

    pub(crate) fn put(&self, path: &str, body: &Value) -> Reply {
        self.send(
            self.client
                .put(self.url(path))
                .header("content-type", "application/fhir+json")
                .body(body.to_string()),
        )
    }

    pub(crate) fn create(&self, resource: &Value) -> String {
        let reply = self.post(resource["resourceType"].as_str().unwrap(), resource);
        assert_eq!(reply.status, 201, "{}", reply.body);
        reply.body["id"].as_str().unwrap().to_owned()
    }

    /// A search; returns the Bundle.
    pub(crate) fn search(&self, resource_type: &str, query: &str) -> Value {
        let reply = self.get(&format!("{resource_type}?{query}"));
        assert_eq!(reply.status, 200, "{resource_type}?{query}: {}", reply.body);
        assert_eq!(reply.body["type"], "searchset");
        reply.body
    }

    /// The ids of the `match` entries of a search (one page, `_count=1000`).
    pub(crate) fn ids(&self, resource_type: &str, query: &str) -> BTreeSet<String> {
        let bundle = self.search(resource_type, &format!("{query}&_count=1000"));
        matched_ids(&bundle)
    }

    pub(crate) fn total(&self, resource_type: &str, query: &str) -> u64 {
        self.search(resource_type, &format!("{query}&_summary=count"))["total"]
            .as_u64()
            .unwrap()
    }

    pub(crate) fn transaction(&self, bundle: &Value) -> Reply {
        self.post("", bundle)
    }
}

pub(crate) fn matched_ids(bundle: &Value) -> BTreeSet<String> {
    bundle["entry"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .filter(|entry| entry["search"]["mode"] == "match")
                .map(|entry| entry["resource"]["id"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn included_types(bundle: &Value) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|entry| entry["search"]["mode"] == "include")
        .map(|entry| {
            entry["resource"]["resourceType"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// Loads patients `0..count` of population `seed` with one transaction each; returns them with
/// the id their Patient got.
pub(crate) fn load_population(
    fhir: &FhirServer,
    seed: u64,
    count: usize,
) -> Vec<(SyntheticPatient, String)> {
    (0..count)
        .map(|index| {
            let patient = synthetic_patient(seed, index);
            let reply = fhir.transaction(&patient.bundle);
            assert_eq!(reply.status, 200, "{}", reply.body);
            assert_eq!(reply.body["type"], "transaction-response");
            let entries = reply.body["entry"].as_array().unwrap();
            assert_eq!(entries.len(), patient.resource_count);
            let location = entries[0]["response"]["location"].as_str().unwrap();
            let id = location.split('/').nth(1).unwrap().to_owned();
            (patient, id)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Instance interactions

#[test]
fn create_read_update_delete_with_versions_and_preconditions() {
    let fhir = FhirServer::start(Engine::Sqlite).unwrap();
    let patient = json!({"resourceType": "Patient", "name": [{"family": "Marchetti", "given": ["Lucia"]}],
        "identifier": [{"system": "urn:mrn", "value": "A-1"}], "extension": [{"url": "urn:x-unknown", "valueString": "kept"}]});
    let created = fhir.post("Patient", &patient);
    assert_eq!(created.status, 201);
    assert_eq!(created.header("etag").as_deref(), Some("W/\"1\""));
    let id = created.body["id"].as_str().unwrap().to_owned();
    assert!(
        created
            .header("location")
            .unwrap()
            .ends_with(&format!("Patient/{id}/_history/1"))
    );
    assert!(created.header("last-modified").is_some());

    let read = fhir.get(&format!("Patient/{id}"));
    assert_eq!(read.status, 200);
    assert_eq!(
        read.body["extension"][0]["valueString"], "kept",
        "unknown content is returned as given"
    );
    assert_eq!(read.body["meta"]["versionId"], "1");

    let mut changed = read.body.clone();
    changed["active"] = json!(true);
    let stale = fhir.send(
        fhir.client
            .put(fhir.url(&format!("Patient/{id}")))
            .header("if-match", "W/\"7\"")
            .header("content-type", "application/fhir+json")
            .body(changed.to_string()),
    );
    assert_eq!(stale.status, 412);
    assert_eq!(stale.body["resourceType"], "OperationOutcome");
    let updated = fhir.send(
        fhir.client
            .put(fhir.url(&format!("Patient/{id}")))
            .header("if-match", "W/\"1\"")
            .header("content-type", "application/fhir+json")
            .body(changed.to_string()),
    );
    assert_eq!(updated.status, 200, "{}", updated.body);
    assert_eq!(updated.header("etag").as_deref(), Some("W/\"2\""));
    assert_eq!(
        fhir.get(&format!("Patient/{id}/_history/1"))
            .body
            .get("active"),
        None
    );
    assert_eq!(
        fhir.get(&format!("Patient/{id}/_history/2")).body["active"],
        true
    );
    let not_modified = fhir.send(
        fhir.client
            .get(fhir.url(&format!("Patient/{id}")))
            .header("if-none-match", "W/\"2\""),
    );
    assert_eq!(not_modified.status, 304);

    // Client-assigned ids.
    let assigned = fhir.put(
        "Patient/chosen-id",
        &json!({"resourceType": "Patient", "id": "chosen-id"}),
    );
    assert_eq!(assigned.status, 201);
    assert_eq!(
        fhir.put(
            "Patient/chosen-id",
            &json!({"resourceType": "Patient", "id": "chosen-id", "active": false})
        )
        .status,
        200
    );

    // PATCH (JSON Patch), and a failing test operation that changes nothing.
    let patch = |operations: Value, if_match: Option<&str>| {
        let mut request = fhir
            .client
            .patch(fhir.url(&format!("Patient/{id}")))
            .header("content-type", "application/json-patch+json")
            .body(operations.to_string());
        if let Some(etag) = if_match {
            request = request.header("if-match", etag);
        }
        fhir.send(request)
    };
    let patched = patch(
        json!([{"op": "replace", "path": "/active", "value": false}, {"op": "add", "path": "/gender", "value": "female"}]),
        Some("W/\"2\""),
    );
    assert_eq!(patched.status, 200, "{}", patched.body);
    assert_eq!(patched.body["gender"], "female");
    assert_eq!(patched.body["meta"]["versionId"], "3");
    assert_eq!(
        patch(
            json!([{"op": "test", "path": "/gender", "value": "male"}]),
            None
        )
        .status,
        422
    );
    assert_eq!(
        patch(
            json!([{"op": "replace", "path": "/id", "value": "other"}]),
            None
        )
        .status,
        422
    );
    assert_eq!(patch(json!([]), Some("W/\"1\"")).status, 412);
    assert_eq!(
        patch(json!([{"op": "copy", "from": "", "path": "/copy"}]), None).status,
        422,
        "copying the whole resource into itself is refused"
    );
    assert_eq!(
        fhir.get(&format!("Patient/{id}")).body["meta"]["versionId"],
        "3"
    );

    // Prefer.
    let minimal = fhir.send(
        fhir.client
            .post(fhir.url("Patient"))
            .header("prefer", "return=minimal")
            .header("content-type", "application/fhir+json")
            .body(json!({"resourceType": "Patient"}).to_string()),
    );
    assert_eq!(minimal.status, 201);
    assert_eq!(minimal.body, Value::Null);
    assert!(minimal.header("location").is_some());
    let outcome = fhir.send(
        fhir.client
            .post(fhir.url("Patient"))
            .header("prefer", "return=OperationOutcome")
            .header("content-type", "application/fhir+json")
            .body(json!({"resourceType": "Patient"}).to_string()),
    );
    assert_eq!(outcome.body["resourceType"], "OperationOutcome");

    // Delete, then history shows every version.
    let deleted = fhir.send(fhir.client.delete(fhir.url(&format!("Patient/{id}"))));
    assert_eq!(deleted.status, 204);
    assert_eq!(fhir.get(&format!("Patient/{id}")).status, 410);
    let history = fhir.get(&format!("Patient/{id}/_history"));
    assert_eq!(history.body["type"], "history");
    let methods: Vec<&str> = history.body["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["request"]["method"].as_str().unwrap())
        .collect();
    assert_eq!(methods, ["DELETE", "PUT", "PUT", "POST"]);
    assert!(
        fhir.ids("Patient", &format!("_id={id}")).is_empty(),
        "deleted resources are not found"
    );
}

#[test]
fn conditional_create_update_and_delete() {
    let fhir = FhirServer::start(Engine::Sqlite).unwrap();
    let conditional_create = |value: &str| {
        fhir.send(
            fhir.client.post(fhir.url("Patient"))
                .header("if-none-exist", format!("identifier=urn:mrn|{value}"))
                .header("content-type", "application/fhir+json")
                .body(json!({"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": value}]}).to_string()),
        )
    };
    let first = conditional_create("C-1");
    assert_eq!(first.status, 201);
    let again = conditional_create("C-1");
    assert_eq!(
        again.status, 200,
        "an existing match is returned, not duplicated"
    );
    assert_eq!(again.body["id"], first.body["id"]);
    assert_eq!(fhir.total("Patient", "identifier=urn:mrn|C-1"), 1);
    fhir.create(
        &json!({"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "C-2"}]}),
    );
    fhir.create(
        &json!({"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "C-2"}]}),
    );
    assert_eq!(conditional_create("C-2").status, 412);

    // Conditional update: creates on no match, updates the one match, refuses several.
    let created = fhir.put(
        "Patient?identifier=urn:mrn|C-3",
        &json!({"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "C-3"}]}),
    );
    assert_eq!(created.status, 201);
    let updated = fhir.put("Patient?identifier=urn:mrn|C-3", &json!({"resourceType": "Patient", "active": true, "identifier": [{"system": "urn:mrn", "value": "C-3"}]}));
    assert_eq!(updated.status, 200);
    assert_eq!(updated.body["id"], created.body["id"]);
    assert_eq!(
        fhir.put(
            "Patient?identifier=urn:mrn|C-2",
            &json!({"resourceType": "Patient"})
        )
        .status,
        412
    );
    let existing = fhir.create(&json!({"resourceType": "Patient", "active": true}));
    assert_eq!(
        fhir.put(
            "Patient?identifier=urn:mrn|C-404",
            &json!({"resourceType": "Patient", "id": existing})
        )
        .status,
        409,
        "a condition that matched nothing may not overwrite another resource"
    );
    assert_eq!(
        fhir.get(&format!("Patient/{existing}")).body["active"],
        true
    );
    assert_eq!(
        fhir.put("Patient?nonsense=1", &json!({"resourceType": "Patient"}))
            .status,
        412,
        "a condition must say something"
    );

    // Conditional delete.
    assert_eq!(
        fhir.send(
            fhir.client
                .delete(fhir.url("Patient?identifier=urn:mrn|C-2"))
        )
        .status,
        412
    );
    assert_eq!(
        fhir.send(
            fhir.client
                .delete(fhir.url("Patient?identifier=urn:mrn|C-3"))
        )
        .status,
        204
    );
    assert_eq!(fhir.total("Patient", "identifier=urn:mrn|C-3"), 0);
}

#[test]
fn bad_requests_are_operation_outcomes_and_store_nothing() {
    let fhir = FhirServer::start_with(Engine::Sqlite, &[("GLASTONBURY_MAX_BODY_BYTES", "1048576")])
        .unwrap();
    let before = fhir.total("Patient", "_lastUpdated=gt2000");
    let cases: Vec<(Reply, u16)> = vec![
        (fhir.send(fhir.client.post(fhir.url("Patient")).header("content-type", "application/fhir+json").body("{not json")), 400),
        (fhir.post("Patient", &json!({"resourceType": "Observation"})), 400),
        (fhir.post("Patient", &json!([1, 2])), 400),
        (fhir.put("Patient/a", &json!({"resourceType": "Patient", "id": "b"})), 400),
        (fhir.post("Patient", &json!({"resourceType": "Patient", "managingOrganization": {"reference": "Nonsense/1"}})), 400),
        (fhir.post("Patient", &json!({"resourceType": "Patient", "id": "bad id!"})), 400),
        (fhir.post("Patients", &json!({"resourceType": "Patients"})), 404),
        (fhir.send(fhir.client.post(fhir.url("Patient")).header("content-type", "application/fhir+xml").body("<Patient/>")), 415),
        (fhir.get("Patient?birthdate=yesterday"), 400),
        (fhir.get("Patient?name:fuzzy=x"), 400),
        (fhir.get("Patient?_sort=family"), 400),
        (fhir.get("Patient?_format=xml"), 406),
        (fhir.post("Patient", &json!({"resourceType": "Patient", "meta": 1})), 400),
        (fhir.get("Patient?_id="), 400),
        (fhir.get("Patient?_offset=99999999999999999999999"), 400),
        // Structure, checked against the R4 model: wrong JSON types, codes outside their value
        // set, missing required elements; unknown elements only under strict handling.
        (fhir.post("Patient", &json!({"resourceType": "Patient", "birthDate": 19700506})), 400),
        (fhir.post("Patient", &json!({"resourceType": "Patient", "gender": "Marchetti"})), 400),
        (fhir.post("Patient", &json!({"resourceType": "Patient", "name": "Lucia Marchetti"})), 400),
        (fhir.post("Observation", &json!({"resourceType": "Observation", "code": {"text": "pulse"}})), 400),
        (fhir.send(fhir.client.post(fhir.url("Patient")).header("content-type", "application/fhir+json")
            .header("prefer", "handling=strict").body(json!({"resourceType": "Patient", "nickname": "Lu"}).to_string())), 400),
        (fhir.send(fhir.client.post(fhir.url("")).header("content-type", "application/fhir+json")
            .header("prefer", "handling=strict").body(json!({"resourceType": "Bundle", "type": "transaction", "entry": [
                {"resource": {"resourceType": "Patient", "nickname": "Lu"}, "request": {"method": "POST", "url": "Patient"}}]}).to_string())), 400),
        // On a client of its own: the server closes a connection whose body it refused, and a
        // pooled connection must not carry the next request into that close.
        (fhir.send(Client::new().post(fhir.url("Patient")).header("content-type", "application/fhir+json").body(vec![b' '; 2 * 1024 * 1024])), 413),
    ];
    for (position, (reply, expected)) in cases.iter().enumerate() {
        assert_eq!(reply.status, *expected, "case {position}: {}", reply.body);
        assert_eq!(
            reply.body["resourceType"], "OperationOutcome",
            "case {position}"
        );
        assert!(!reply.issue_code().is_empty(), "case {position}");
    }
    assert_eq!(
        fhir.total("Patient", "_lastUpdated=gt2000"),
        before,
        "nothing was stored"
    );
    // Structural errors name the element and never echo the value (it can be PHI).
    let (wrong_type, _) = &cases[15];
    assert!(
        wrong_type.body.to_string().contains("birthDate"),
        "{}",
        wrong_type.body
    );
    for (reply, _) in &cases[15..18] {
        assert!(
            !reply.body.to_string().contains("Marchetti"),
            "{}",
            reply.body
        );
    }
    assert!(
        cases[19].0.body.to_string().contains("nickname"),
        "{}",
        cases[19].0.body
    );
    // Without strict handling an unknown element is kept as sent.
    let lenient_id = fhir.create(&json!({"resourceType": "Patient", "nickname": "Lu"}));
    assert_eq!(
        fhir.get(&format!("Patient/{lenient_id}")).body["nickname"],
        "Lu"
    );
    // The last representable day is a common "no end" and must be storable and searchable.
    let open_ended = fhir.create(
        &json!({"resourceType": "Encounter", "status": "planned", "class": {"code": "AMB"},
        "period": {"start": "2024-01-01", "end": "9999-12-31"}}),
    );
    assert_eq!(
        fhir.ids("Encounter", "date=ge9999-12-31"),
        BTreeSet::from([open_ended])
    );
    let strict = fhir.send(
        fhir.client
            .get(fhir.url("Patient?unknown-parameter=1"))
            .header("prefer", "handling=strict"),
    );
    assert_eq!(strict.status, 400);
    let lenient = fhir.search("Patient", "unknown-parameter=1");
    let outcome = lenient["entry"]
        .as_array()
        .unwrap()
        .iter()
        .find(|entry| entry["search"]["mode"] == "outcome")
        .unwrap();
    assert!(
        outcome["resource"]["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("unknown-parameter")
    );
    let pretty = fhir
        .client
        .get(fhir.url("metadata?_pretty=true"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(pretty.contains("\n  \"resourceType\""));
}

// ---------------------------------------------------------------------------------------------
// Search

fn search_every_parameter_type(engine: Engine) {
    let Some(fhir) = FhirServer::start(engine) else {
        return;
    };
    let population = load_population(&fhir, 11, 12);
    let (first, first_id) = &population[0];
    let identity = &first.identity;

    // string: default prefix on any word, accents and case ignored; :exact; :contains.
    let same_family: BTreeSet<String> = population
        .iter()
        .filter(|(patient, _)| patient.identity.family == identity.family)
        .map(|(_, id)| id.clone())
        .collect();
    assert_eq!(
        fhir.ids(
            "Patient",
            &format!("family={}", &identity.family[..4].to_uppercase())
        ),
        same_family
    );
    assert!(
        fhir.ids("Patient", &format!("name={}", &identity.given[..3]))
            .contains(first_id)
    );
    assert!(
        fhir.ids("Patient", &format!("family:exact={}", identity.family))
            .contains(first_id)
    );
    assert!(
        fhir.ids(
            "Patient",
            &format!("family:exact={}", identity.family.to_lowercase())
        )
        .is_empty()
    );
    assert!(
        fhir.ids(
            "Patient",
            &format!("family:contains={}", &identity.family[2..7])
        )
        .contains(first_id)
    );
    let accented = fhir.create(&json!({"resourceType": "Patient", "name": [{"family": "Núñez-Ibáñez", "given": ["José"]}]}));
    assert_eq!(
        fhir.ids("Patient", "family=nunez"),
        BTreeSet::from([accented.clone()])
    );
    assert_eq!(
        fhir.ids("Patient", "given=JOSE"),
        BTreeSet::from([accented.clone()])
    );
    let street_word = identity.street_line.split(' ').nth(1).unwrap();
    assert!(
        fhir.ids("Patient", &format!("address={street_word}"))
            .contains(first_id)
    );

    // token: system|code, code, |code, system|, :not, :text; identifiers and telecom.
    assert_eq!(
        fhir.ids(
            "Patient",
            &format!(
                "identifier=urn:oid:2.16.840.1.113883.19.5|{}",
                identity.medical_record_number
            )
        ),
        BTreeSet::from([first_id.clone()])
    );
    assert_eq!(
        fhir.ids(
            "Patient",
            &format!("identifier={}", identity.medical_record_number)
        ),
        BTreeSet::from([first_id.clone()])
    );
    assert!(
        fhir.ids(
            "Patient",
            &format!("identifier=urn:other|{}", identity.medical_record_number)
        )
        .is_empty()
    );
    assert!(
        fhir.ids(
            "Patient",
            &format!("identifier=|{}", identity.medical_record_number)
        )
        .is_empty()
    );
    assert_eq!(
        fhir.ids("Patient", &format!("phone={}", identity.phone)),
        BTreeSet::from([first_id.clone()])
    );
    let females = fhir.ids("Patient", "gender=female");
    let not_females = fhir.ids("Patient", "gender:not=female");
    assert_eq!(females.len() + not_females.len(), population.len() + 1);
    assert!(females.is_disjoint(&not_females));
    let heart_rates = fhir.total("Observation", "code=http://loinc.org|8867-4");
    assert_eq!(heart_rates, fhir.total("Observation", "code=8867-4"));
    assert_eq!(heart_rates, fhir.total("Observation", "code:text=heart"));
    assert_eq!(
        heart_rates,
        count_in_population(
            &population,
            |resource| resource["code"]["coding"][0]["code"] == "8867-4"
        )
    );
    let either = fhir.total("Observation", "code=8867-4,8310-5");
    assert_eq!(
        either,
        count_in_population(&population, |resource| matches!(
            resource["code"]["coding"][0]["code"].as_str(),
            Some("8867-4" | "8310-5")
        ))
    );
    assert_eq!(
        fhir.total("Observation", "code=http://loinc.org|"),
        count_in_population(&population, |resource| resource["resourceType"]
            == "Observation")
    );

    // reference: Type/id, bare id, :Type modifier, one level of chaining, _has.
    let first_count = first.resource_count as u64;
    let own_observations =
        count_in_bundle(first, |resource| resource["resourceType"] == "Observation");
    assert_eq!(
        fhir.total("Observation", &format!("subject=Patient/{first_id}")),
        own_observations
    );
    assert_eq!(
        fhir.total("Observation", &format!("patient={first_id}")),
        own_observations
    );
    assert_eq!(
        fhir.total("Observation", &format!("subject:Patient={first_id}")),
        own_observations
    );
    assert_eq!(
        fhir.total(
            "Observation",
            &format!("subject.identifier={}", identity.medical_record_number)
        ),
        own_observations
    );
    assert_eq!(
        fhir.total(
            "Observation",
            &format!("patient.family:exact={}", identity.family)
        ),
        observations_of_family(&population, &identity.family)
    );
    let diabetics: BTreeSet<String> = population
        .iter()
        .filter(|(patient, _)| {
            count_in_bundle(patient, |resource| {
                resource["code"]["coding"][0]["code"] == "44054006"
            }) > 0
        })
        .map(|(_, id)| id.clone())
        .collect();
    assert_eq!(
        fhir.ids(
            "Patient",
            "_has:Condition:patient:code=http://snomed.info/sct|44054006"
        ),
        diabetics
    );

    // date: partial dates are ranges; every prefix.
    let birth_year = &identity.birth_date[..4];
    assert!(
        fhir.ids("Patient", &format!("birthdate={birth_year}"))
            .contains(first_id)
    );
    assert!(
        fhir.ids("Patient", &format!("birthdate={}", identity.birth_date))
            .contains(first_id)
    );
    assert!(
        fhir.ids(
            "Patient",
            &format!(
                "birthdate=ge{}&birthdate=le{}",
                identity.birth_date, identity.birth_date
            )
        )
        .contains(first_id)
    );
    assert!(
        !fhir
            .ids("Patient", &format!("birthdate=gt{}", identity.birth_date))
            .contains(first_id)
    );
    assert!(
        !fhir
            .ids("Patient", &format!("birthdate=lt{}", identity.birth_date))
            .contains(first_id)
    );
    assert!(
        !fhir
            .ids("Patient", &format!("birthdate=ne{}", identity.birth_date))
            .contains(first_id)
    );
    assert!(
        fhir.ids("Patient", &format!("birthdate=sa{}", 1900))
            .contains(first_id)
    );
    assert!(
        fhir.ids("Patient", &format!("birthdate=eb{}", 2030))
            .contains(first_id)
    );
    let encounters_2020s = fhir.total("Encounter", "date=ge2020-01-01&date=lt2023-01-01");
    assert_eq!(
        encounters_2020s,
        count_in_population(&population, |resource| resource["resourceType"]
            == "Encounter"
            && (2020..2023).contains(
                &resource["period"]["start"].as_str().unwrap()[..4]
                    .parse::<i32>()
                    .unwrap()
            ))
    );

    // quantity (with and without units) and number comparisons.
    let high_glucose = count_in_population(&population, |resource| {
        resource["code"]["coding"][0]["code"] == "2339-0"
            && resource["valueQuantity"]["value"].as_f64().unwrap() > 150.0
    });
    assert_eq!(
        fhir.total(
            "Observation",
            "code=2339-0&value-quantity=gt150|http://unitsofmeasure.org|mg/dL"
        ),
        high_glucose
    );
    assert_eq!(
        fhir.total("Observation", "code=2339-0&value-quantity=gt150||mg/dL"),
        high_glucose
    );
    assert_eq!(
        fhir.total("Observation", "code=2339-0&value-quantity=gt150"),
        high_glucose
    );
    assert_eq!(
        fhir.total(
            "Observation",
            "code=2339-0&value-quantity=gt150|http://unitsofmeasure.org|kg"
        ),
        0
    );
    let study_id = fhir.create(&json!({"resourceType": "RiskAssessment", "status": "final", "subject": {"reference": format!("Patient/{first_id}")}, "prediction": [{"probabilityDecimal": 0.25}]}));
    assert_eq!(
        fhir.ids("RiskAssessment", "probability=0.25"),
        BTreeSet::from([study_id.clone()])
    );
    assert_eq!(
        fhir.ids("RiskAssessment", "probability=gt0.2"),
        BTreeSet::from([study_id.clone()])
    );
    assert!(fhir.ids("RiskAssessment", "probability=lt0.2").is_empty());

    // uri, _tag, _profile, _id, _lastUpdated, :missing.
    let tagged = fhir.create(&json!({"resourceType": "Patient", "meta": {"tag": [{"system": "urn:tags", "code": "vip"}], "profile": ["http://example.org/StructureDefinition/special-patient"]}}));
    assert_eq!(
        fhir.ids("Patient", "_tag=urn:tags|vip"),
        BTreeSet::from([tagged.clone()])
    );
    assert_eq!(
        fhir.ids(
            "Patient",
            "_profile=http://example.org/StructureDefinition/special-patient"
        ),
        BTreeSet::from([tagged.clone()])
    );
    assert_eq!(
        fhir.ids("Patient", &format!("_id={tagged},{accented}")),
        BTreeSet::from([tagged.clone(), accented.clone()])
    );
    assert_eq!(
        fhir.ids("Patient", "birthdate:missing=true"),
        BTreeSet::from([tagged.clone(), accented.clone()])
    );
    assert_eq!(
        fhir.total("Patient", "birthdate:missing=false"),
        population.len() as u64
    );
    assert_eq!(
        fhir.total("Patient", "_lastUpdated=gt2020-01-01"),
        population.len() as u64 + 2
    );
    assert_eq!(fhir.total("Patient", "_lastUpdated=lt2020-01-01"), 0);

    // Paging: every match exactly once across the next links.
    let total_observations = fhir.total("Observation", "");
    let mut seen = BTreeSet::new();
    let mut page = fhir.search("Observation", "_count=7");
    let mut pages = 1;
    loop {
        assert_eq!(page["total"].as_u64().unwrap(), total_observations);
        for id in matched_ids(&page) {
            assert!(seen.insert(id), "no resource appears on two pages");
        }
        let next = page["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|link| link["relation"] == "next")
            .map(|link| link["url"].as_str().unwrap().to_owned());
        let Some(next) = next else { break };
        let reply = fhir.send(fhir.client.get(next));
        assert_eq!(reply.status, 200);
        page = reply.body;
        pages += 1;
    }
    assert_eq!(seen.len() as u64, total_observations);
    assert_eq!(pages as u64, total_observations.div_ceil(7));

    // _sort on dates (missing values last), _id and _lastUpdated.
    let sorted = fhir.search("Patient", "_sort=birthdate&_count=1000");
    let birth_dates: Vec<String> = sorted["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|entry| entry["resource"]["birthDate"].as_str().map(str::to_owned))
        .collect();
    let mut expected = birth_dates.clone();
    expected.sort();
    assert_eq!(birth_dates, expected);
    let descending = fhir.search("Patient", "_sort=-birthdate&_count=1000");
    assert_eq!(
        descending["entry"][0]["resource"]["birthDate"]
            .as_str()
            .unwrap(),
        expected.last().unwrap()
    );
    let by_id = fhir.search("Patient", "_sort=_id&_count=1000");
    let ids: Vec<&str> = by_id["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["resource"]["id"].as_str().unwrap())
        .collect();
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]));

    // _include, _revinclude, _summary=count, _elements, POST _search.
    let with_patients = fhir.search(
        "Observation",
        &format!("patient={first_id}&_include=Observation:patient"),
    );
    assert_eq!(included_types(&with_patients), ["Patient"]);
    let with_observations = fhir.search(
        "Patient",
        &format!("_id={first_id}&_revinclude=Observation:subject"),
    );
    assert_eq!(
        included_types(&with_observations).len() as u64,
        own_observations
    );
    let count_only = fhir.search("Observation", "_summary=count");
    assert_eq!(count_only["total"].as_u64().unwrap(), total_observations);
    assert!(count_only.get("entry").is_none());
    let elements = fhir.search("Patient", &format!("_id={first_id}&_elements=birthDate"));
    let subset = &elements["entry"][0]["resource"];
    assert_eq!(subset["birthDate"], identity.birth_date.as_str());
    assert!(subset.get("name").is_none());
    assert_eq!(subset["meta"]["tag"][0]["code"], "SUBSETTED");
    let posted = fhir.send(
        fhir.client
            .post(fhir.url("Patient/_search"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("identifier={}", identity.medical_record_number)),
    );
    assert_eq!(
        matched_ids(&posted.body),
        BTreeSet::from([first_id.clone()])
    );

    // $everything: the patient's whole compartment.
    let everything = fhir.get(&format!("Patient/{first_id}/$everything"));
    assert_eq!(everything.status, 200);
    let risk_assessments = 1;
    assert_eq!(
        everything.body["total"].as_u64().unwrap(),
        first_count + risk_assessments
    );
}

fn count_in_bundle(patient: &SyntheticPatient, predicate: impl Fn(&Value) -> bool) -> u64 {
    patient.bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|entry| predicate(&entry["resource"]))
        .count() as u64
}

fn count_in_population(
    population: &[(SyntheticPatient, String)],
    predicate: impl Fn(&Value) -> bool + Copy,
) -> u64 {
    population
        .iter()
        .map(|(patient, _)| count_in_bundle(patient, predicate))
        .sum()
}

fn observations_of_family(population: &[(SyntheticPatient, String)], family: &str) -> u64 {
    population
        .iter()
        .filter(|(patient, _)| patient.identity.family == family)
        .map(|(patient, _)| {
            count_in_bundle(patient, |resource| {
                resource["resourceType"] == "Observation"
            })
        })
        .sum()
}

#[test]
fn search_every_parameter_type_on_sqlite() {
    search_every_parameter_type(Engine::Sqlite);
}

#[test]
fn search_every_parameter_type_on_postgres() {
    search_every_parameter_type(Engine::Postgres);
}

// ---------------------------------------------------------------------------------------------
// Bundles and history

#[test]
fn transactions_are_atomic_and_batches_are_not() {
    let fhir = FhirServer::start(Engine::Sqlite).unwrap();
    let existing = fhir.create(
        &json!({"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "T-1"}]}),
    );
    let good = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:0b6a1b58-7b8f-4b8e-9d3c-000000000001", "resource": {"resourceType": "Encounter", "status": "finished",
            "class": {"code": "AMB"}, "subject": {"reference": "Patient?identifier=urn:mrn|T-1"}}, "request": {"method": "POST", "url": "Encounter"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "subject": {"reference": "Patient?identifier=urn:mrn|T-1"},
            "encounter": {"reference": "urn:uuid:0b6a1b58-7b8f-4b8e-9d3c-000000000001"}}, "request": {"method": "POST", "url": "Observation"}},
        {"resource": {"resourceType": "Patient", "id": "tx-put", "active": true}, "request": {"method": "PUT", "url": "Patient/tx-put"}},
        {"request": {"method": "GET", "url": format!("Patient/{existing}")}},
    ]});
    let reply = fhir.transaction(&good);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let entries = reply.body["entry"].as_array().unwrap();
    assert_eq!(entries[0]["response"]["status"], "201 Created");
    assert_eq!(entries[2]["response"]["status"], "201 Created");
    assert_eq!(entries[3]["resource"]["id"], existing.as_str());
    let encounter_id = entries[0]["response"]["location"]
        .as_str()
        .unwrap()
        .split('/')
        .nth(1)
        .unwrap()
        .to_owned();
    let observation = &entries[1]["resource"];
    assert_eq!(
        observation["encounter"]["reference"],
        format!("Encounter/{encounter_id}")
    );
    assert_eq!(
        observation["subject"]["reference"],
        format!("Patient/{existing}")
    );
    assert_eq!(
        fhir.total(
            "Observation",
            &format!("encounter=Encounter/{encounter_id}")
        ),
        1
    );

    // One failing entry (a stale If-Match) and nothing of the transaction is stored.
    let before = (fhir.total("Observation", ""), fhir.total("Patient", ""));
    let failing = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "lost"}}, "request": {"method": "POST", "url": "Observation"}},
        {"resource": {"resourceType": "Patient", "id": "tx-put", "active": false}, "request": {"method": "PUT", "url": "Patient/tx-put", "ifMatch": "W/\"9\""}},
    ]});
    let refused = fhir.transaction(&failing);
    assert_eq!(refused.status, 412, "{}", refused.body);
    assert_eq!(refused.body["resourceType"], "OperationOutcome");
    assert_eq!(
        (fhir.total("Observation", ""), fhir.total("Patient", "")),
        before
    );
    assert_eq!(fhir.get("Patient/tx-put").body["active"], true);
    let dangling = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": "urn:uuid:11111111-2222-3333-4444-555555555555"}}, "request": {"method": "POST", "url": "Observation"}},
    ]});
    assert_eq!(fhir.transaction(&dangling).status, 400);
    assert_eq!(fhir.total("Observation", ""), before.0);

    // A batch runs each entry on its own.
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "kept"}}, "request": {"method": "POST", "url": "Observation"}},
        {"resource": {"resourceType": "Patient", "id": "tx-put"}, "request": {"method": "PUT", "url": "Patient/tx-put", "ifMatch": "W/\"9\""}},
        {"request": {"method": "GET", "url": "Patient/does-not-exist"}},
        {"request": {"method": "GET", "url": "Observation?code:text=kept"}},
    ]});
    let reply = fhir.transaction(&batch);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body["type"], "batch-response");
    let statuses: Vec<&str> = reply.body["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["response"]["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        [
            "201 Created",
            "412 Precondition Failed",
            "404 Not Found",
            "200 OK"
        ]
    );
    assert_eq!(reply.body["entry"][3]["resource"]["total"], 1);
    assert_eq!(fhir.total("Observation", ""), before.0 + 1);
}

#[test]
fn type_and_system_history_page_and_filter_by_time() {
    let fhir = FhirServer::start(Engine::Sqlite).unwrap();
    let id = fhir.create(&json!({"resourceType": "Patient"}));
    fhir.put(
        &format!("Patient/{id}"),
        &json!({"resourceType": "Patient", "id": id, "active": true}),
    );
    let midpoint = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    fhir.create(&json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}}));
    let type_history = fhir.get("Patient/_history");
    assert_eq!(type_history.body["type"], "history");
    assert_eq!(type_history.body["total"], 2);
    let system_history = fhir.get("_history?_count=2");
    assert_eq!(system_history.body["total"], 3);
    assert_eq!(system_history.body["entry"].as_array().unwrap().len(), 2);
    assert_eq!(
        system_history.body["entry"][0]["resource"]["resourceType"], "Observation",
        "newest first"
    );
    assert!(
        system_history.body["link"]
            .as_array()
            .unwrap()
            .iter()
            .any(|link| link["relation"] == "next")
    );
    let since = fhir.get(&format!("_history?_since={}", midpoint.replace('+', "%2B")));
    assert_eq!(since.body["total"], 1);
}

#[test]
fn capability_statement_lists_what_the_server_does() {
    let fhir = FhirServer::start(Engine::Sqlite).unwrap();
    let statement = fhir
        .client
        .get(fhir.url("metadata"))
        .send()
        .unwrap()
        .json::<Value>()
        .unwrap();
    assert_eq!(statement["fhirVersion"], "4.0.1");
    let rest = &statement["rest"][0];
    let system: Vec<&str> = rest["interaction"]
        .as_array()
        .unwrap()
        .iter()
        .map(|interaction| interaction["code"].as_str().unwrap())
        .collect();
    assert_eq!(system, ["transaction", "batch", "history-system"]);
    let patient = rest["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|resource| resource["type"] == "Patient")
        .unwrap();
    assert_eq!(patient["conditionalCreate"], true);
    // Every advertised parameter is accepted by the server (none comes back as "ignored").
    for parameter in patient["searchParam"].as_array().unwrap() {
        let name = parameter["name"].as_str().unwrap();
        let value = match parameter["type"].as_str().unwrap() {
            "date" => "2020",
            "number" => "1",
            "quantity" => "1",
            "reference" => "Patient/x",
            _ => "x",
        };
        let bundle = fhir.search("Patient", &format!("{name}={value}"));
        let ignored = bundle["entry"]
            .as_array()
            .unwrap()
            .iter()
            .any(|entry| entry["search"]["mode"] == "outcome");
        assert!(!ignored, "advertised parameter {name} was ignored");
    }
}

// ---------------------------------------------------------------------------------------------
// The synthetic population and the PHI scan

fn population_leaves_no_phi_at_rest(engine: Engine, patients: usize) {
    let Some(mut fhir) = FhirServer::start(engine) else {
        return;
    };
    let loading = std::time::Instant::now();
    let population = load_population(&fhir, 5, patients);
    println!("{patients} patients loaded in {:?}", loading.elapsed());
    let resources: u64 = population
        .iter()
        .map(|(patient, _)| patient.resource_count as u64)
        .sum();
    let stored: u64 = [
        "Patient",
        "Encounter",
        "Observation",
        "Condition",
        "MedicationRequest",
        "ImagingStudy",
    ]
    .iter()
    .map(|resource_type| fhir.total(resource_type, ""))
    .sum();
    assert_eq!(stored, resources);
    // Searching by PHI works, although no PHI is stored in the clear.
    let (sample, sample_id) = &population[patients / 2];
    assert!(
        fhir.ids(
            "Patient",
            &format!(
                "family={}&given={}",
                sample.identity.family, sample.identity.given
            )
        )
        .contains(sample_id)
    );
    assert_eq!(
        fhir.ids("Patient", &format!("phone={}", sample.identity.phone)),
        BTreeSet::from([sample_id.clone()])
    );
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(fhir.server.child.id().to_string())
        .status();
    let _ = fhir.server.child.wait();

    let mut markers: BTreeSet<String> = BTreeSet::new();
    for (patient, _) in &population {
        let identity = &patient.identity;
        markers.extend([
            identity.family.clone(),
            identity.given.clone(),
            identity.medical_record_number.clone(),
            identity.phone.clone(),
            identity.street_line.clone(),
        ]);
    }
    let scanner = aho_corasick::AhoCorasick::builder()
        .ascii_case_insensitive(true)
        .build(&markers)
        .unwrap();
    let scan = |source: &str, bytes: &[u8]| -> Vec<String> {
        scanner
            .find_iter(bytes)
            .map(|found| {
                let text = String::from_utf8_lossy(&bytes[found.start()..found.end()]);
                format!("{source} @{}: {text}", found.start())
            })
            .collect()
    };
    let data_dir = fhir.workspace.path().join("data");
    let files = files_under(&data_dir);
    assert!(!files.is_empty(), "the data dir is scanned");
    let mut hits: Vec<String> = files
        .iter()
        .flat_map(|file| scan(&file.display().to_string(), &std::fs::read(file).unwrap()))
        .collect();
    hits.extend(scan("server log", fhir.server.log().as_bytes()));
    if let Some(database) = &fhir._database {
        hits.extend(scan("pg_dump", &pg_dump(&database.url)));
    }
    assert_no_hits(&hits);
    // The scanner finds what it looks for.
    let planted = format!("..{}..", sample.identity.family.to_uppercase());
    assert_eq!(scan("probe", planted.as_bytes()).len(), 1);
}

#[test]
fn synthetic_population_leaves_no_phi_at_rest_on_sqlite() {
    population_leaves_no_phi_at_rest(Engine::Sqlite, 300);
}

#[test]
fn synthetic_population_leaves_no_phi_at_rest_on_postgres() {
    population_leaves_no_phi_at_rest(Engine::Postgres, 100);
}

#[test]
fn synth_command_writes_a_loadable_population() {
    let workspace = tempfile::tempdir().unwrap();
    let out = workspace.path().join("population");
    let output = Command::new(crate::common::binary())
        .args(["synth", "--patients", "3", "--seed", "4", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let first: Value =
        serde_json::from_slice(&std::fs::read(out.join("patient-0000000.json")).unwrap()).unwrap();
    assert_eq!(first, synthetic_patient(4, 0).bundle);
    assert_eq!(files_under(&out).len(), 3);
}

// ---------------------------------------------------------------------------------------------
// A real Python client

#[test]
fn python_fhirpy_creates_searches_pages_updates_and_deletes() {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        python.exists(),
        "the Python test clients are not installed: run scripts/install-test-deps.sh"
    );
    let fhir = FhirServer::start(Engine::Sqlite).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/fhirpy_workflow.py");
    let output = Command::new(python)
        .arg(script)
        .arg(fhir.url(""))
        .arg(&fhir.token)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("ok: 25 patients paged, updated v2, deleted"),
        "{stdout}"
    );
}
