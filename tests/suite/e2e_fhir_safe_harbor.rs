//! The HIPAA Safe Harbor view end to end through the real binary: a researcher (and a clinician
//! who states research as the purpose) receives de-identified resources under stable
//! pseudonyms, reads and searches by pseudonym, and is refused what would re-identify.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::e2e_fhir::{Engine, FhirServer, Reply, load_population, matched_ids};

/// Every string a de-identified answer must not contain for these patients: names, record
/// numbers, phones, street lines, full birth dates and the real resource ids.
fn identifying_strings(
    population: &[(glastonbury_fhir::synthetic::SyntheticPatient, String)],
) -> Vec<String> {
    population
        .iter()
        .flat_map(|(patient, id)| {
            let identity = &patient.identity;
            [
                identity.family.clone(),
                identity.given.clone(),
                identity.medical_record_number.clone(),
                identity.phone.clone(),
                identity.street_line.clone(),
                identity.birth_date.clone(),
                id.clone(),
            ]
        })
        .collect()
}

fn assert_deidentified(text: &str, identifying: &[String]) {
    for needle in identifying {
        assert!(
            !text.contains(needle.as_str()),
            "{needle:?} appears in a de-identified answer"
        );
    }
}

fn get_as(fhir: &FhirServer, token: &str, path: &str) -> Reply {
    fhir.send_as(token, fhir.client.get(fhir.url(path)))
}

/// Every date-like string in a resource has at most a year.
fn dates_are_years_only(value: &Value) -> bool {
    match value {
        Value::Object(object) => object.values().all(dates_are_years_only),
        Value::Array(items) => items.iter().all(dates_are_years_only),
        Value::String(text) => {
            let bytes = text.as_bytes();
            !(bytes.len() >= 7
                && bytes[..4].iter().all(u8::is_ascii_digit)
                && bytes[4] == b'-'
                && bytes[5].is_ascii_digit())
        }
        _ => true,
    }
}

fn security_codes(resource: &Value) -> BTreeSet<String> {
    resource["meta"]["security"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|label| label["code"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn researchers_see_only_deidentified_data_under_stable_pseudonyms() {
    let fhir = FhirServer::start(Engine::Sqlite).unwrap();
    let population = load_population(&fhir, 11, 8);
    let identifying = identifying_strings(&population);
    let researcher = fhir.server.token_for("researcher", &["system/*.rs"]);

    // A search: every match de-identified and labelled, references under pseudonyms.
    let heart_rates = get_as(
        &fhir,
        &researcher,
        "Observation?code=http://loinc.org|8867-4&_count=1000",
    );
    assert_eq!(heart_rates.status, 200, "{}", heart_rates.body);
    let identified_total = fhir.total("Observation", "code=http://loinc.org|8867-4");
    assert_eq!(heart_rates.body["total"].as_u64(), Some(identified_total));
    assert!(identified_total > 0);
    assert_deidentified(&heart_rates.body.to_string(), &identifying);
    let entries = heart_rates.body["entry"].as_array().unwrap();
    for entry in entries {
        let resource = &entry["resource"];
        assert!(security_codes(resource).contains("PSEUDED"), "{resource}");
        assert!(dates_are_years_only(resource), "{resource}");
        assert_eq!(resource["effectiveDateTime"].as_str().unwrap().len(), 4);
        assert!(resource["meta"].get("lastUpdated").is_none());
        assert_eq!(resource["code"]["coding"][0]["code"], "8867-4");
        assert!(resource["valueQuantity"]["value"].is_number());
    }
    let again = get_as(
        &fhir,
        &researcher,
        "Observation?code=http://loinc.org|8867-4&_count=1000",
    );
    assert_eq!(
        matched_ids(&again.body),
        matched_ids(&heart_rates.body),
        "pseudonyms are stable"
    );

    // Reading a patient by the pseudonym its observations name.
    let subject = entries[0]["resource"]["subject"]["reference"]
        .as_str()
        .unwrap()
        .to_owned();
    let pseudonym = subject.strip_prefix("Patient/").unwrap().to_owned();
    let patient = get_as(&fhir, &researcher, &subject);
    assert_eq!(patient.status, 200, "{}", patient.body);
    assert_eq!(patient.body["id"], pseudonym.as_str());
    assert!(patient.body.get("name").is_none());
    assert!(patient.body.get("telecom").is_none());
    assert_eq!(patient.body["address"][0].get("line"), None);
    assert!(
        patient.header("last-modified").is_none(),
        "the update time is a full date"
    );
    assert!(security_codes(&patient.body).contains("REDACTED"));
    assert_deidentified(&patient.body.to_string(), &identifying);
    match patient.body.get("birthDate") {
        Some(year) => assert_eq!(year.as_str().unwrap().len(), 4),
        None => assert!(
            patient.body["extension"]
                .to_string()
                .contains("90 or older"),
            "a birth date goes only for the oldest patients"
        ),
    }

    // The real id is not a pseudonym: not found in this view.
    let (_, real_id) = &population[0];
    assert_eq!(
        get_as(&fhir, &researcher, &format!("Patient/{real_id}")).status,
        404
    );

    // Searching by reference works with the pseudonym: its observations are exactly one loaded
    // patient's (compared by code and value, the ids being different).
    let measurements = |bundle: &Value| -> Vec<String> {
        let mut found: Vec<String> = bundle["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|entry| {
                format!(
                    "{} {}",
                    entry["resource"]["code"]["coding"][0]["code"],
                    entry["resource"]["valueQuantity"]["value"]
                )
            })
            .collect();
        found.sort();
        found
    };
    let pseudonymous = get_as(
        &fhir,
        &researcher,
        &format!("Observation?subject={subject}&_count=1000"),
    );
    assert_eq!(pseudonymous.status, 200, "{}", pseudonymous.body);
    assert!(!measurements(&pseudonymous.body).is_empty());
    let owners: Vec<&String> = population
        .iter()
        .map(|(_, id)| id)
        .filter(|id| {
            measurements(&fhir.search("Observation", &format!("subject=Patient/{id}&_count=1000")))
                == measurements(&pseudonymous.body)
        })
        .collect();
    assert_eq!(owners.len(), 1, "the pseudonym stands for one patient");
    let real_of_pseudonym = owners[0];
    let everything = get_as(&fhir, &researcher, &format!("{subject}/$everything"));
    assert_eq!(everything.status, 200, "{}", everything.body);
    let identified_everything = fhir.get(&format!("Patient/{real_of_pseudonym}/$everything"));
    assert_eq!(
        everything.body["total"],
        identified_everything.body["total"]
    );
    assert_deidentified(&everything.body.to_string(), &identifying);

    // Searches that would re-identify are refused with the reason.
    let (sample, _) = &population[1];
    for refused in [
        format!("Patient?family={}", sample.identity.family),
        format!(
            "Patient?identifier=urn:oid:2.16.840.1.113883.19.5|{}",
            sample.identity.medical_record_number
        ),
        format!("Patient?phone={}", sample.identity.phone),
        format!("Patient?birthdate={}", sample.identity.birth_date),
        "Observation?date=2023-03-04".to_owned(),
        "Observation?subject.family=a".to_owned(),
    ] {
        let reply = get_as(&fhir, &researcher, &refused);
        assert_eq!(reply.status, 403, "{refused}: {}", reply.body);
        assert_eq!(reply.body["resourceType"], "OperationOutcome");
        assert_deidentified(&reply.body.to_string(), &identifying);
    }
    assert_eq!(
        get_as(&fhir, &researcher, "Observation?date=ge2018&_summary=count").status,
        200
    );
    assert_eq!(
        get_as(&fhir, &researcher, &format!("{subject}/_history")).status,
        403
    );
    assert_eq!(
        get_as(&fhir, &researcher, "Observation/_history").status,
        403
    );

    // Research is read-only.
    let write = fhir.send_as(
        &researcher,
        fhir.client
            .post(fhir.url("Observation"))
            .header("content-type", "application/fhir+json")
            .body(
                json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}})
                    .to_string(),
            ),
    );
    assert_eq!(write.status, 403);

    // A clinician who states research as the purpose gets the same view, not PHI.
    let clinician_for_research = fhir.send_as(
        &fhir.token,
        fhir.client
            .get(fhir.url("Observation?code=http://loinc.org|8867-4&_count=1000"))
            .header("x-purpose-of-use", "HRESCH"),
    );
    assert_eq!(clinician_for_research.status, 200);
    assert_eq!(
        matched_ids(&clinician_for_research.body),
        matched_ids(&heart_rates.body)
    );
    assert_deidentified(&clinician_for_research.body.to_string(), &identifying);
}

#[test]
fn a_researcher_without_a_scope_for_a_type_gets_nothing_of_it() {
    let fhir = FhirServer::start(Engine::Sqlite).unwrap();
    load_population(&fhir, 12, 2);
    let researcher = fhir
        .server
        .token_for("researcher", &["system/Observation.rs"]);
    assert_eq!(
        get_as(&fhir, &researcher, "Observation?_summary=count").status,
        200
    );
    assert_eq!(
        get_as(&fhir, &researcher, "Patient?_summary=count").status,
        403
    );
    let with_include = get_as(
        &fhir,
        &researcher,
        "Observation?_include=Observation:subject&_count=5",
    );
    assert_eq!(with_include.status, 200);
    assert!(
        with_include.body["entry"]
            .as_array()
            .unwrap()
            .iter()
            .all(|entry| entry["resource"]["resourceType"] != "Patient"),
        "included patients are left out without a Patient scope"
    );
}
