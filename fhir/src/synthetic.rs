//! A deterministic synthetic patient population for tests and benchmarks: each patient is one
//! transaction Bundle (Patient, encounters, vital signs and labs, conditions, medication
//! requests, sometimes an imaging study) linked with `urn:uuid:` references. Same seed, same data.

use serde_json::{Value, json};

// Long, distinctive values: the PHI scan looks for each of them in raw database bytes, where a
// short name could turn up by chance in ciphertext.
const FAMILIES: &[&str] = &[
    "Abernathy",
    "Okonkwo-Reyes",
    "Lindqvister",
    "Moreauville",
    "Tanakashiro",
    "Castellanos",
    "Novakovich",
    "Haddadeen",
    "Oyelaranmi",
    "Fitzgerald",
    "Ivanovskaya",
    "Brightwater",
    "Kowalczykow",
    "Delacroixe",
    "Nakamurasaki",
    "Valdivieso",
    "Thorsenberg",
    "Achterberg",
    "Quinteroso",
    "Szabolcsiak",
];
const GIVEN_FEMALE: &[&str] = &[
    "Annabelle",
    "Beatrijsje",
    "Christabel",
    "Dagmarina",
    "Esmeralda",
    "Faridahlia",
    "Gretchenka",
    "Hannelore",
];
const GIVEN_MALE: &[&str] = &[
    "Anselmino",
    "Bartholomew",
    "Cormacdara",
    "Dmitrievich",
    "Emekachukwu",
    "Florentino",
    "Gideonovich",
    "Hamidullah",
];
const STREETS: &[&str] = &[
    "Juniper Lane",
    "Harbor View Road",
    "Old Mill Street",
    "Quarry Hill Avenue",
    "Lantern Court",
];
const CITIES: &[(&str, &str, &str)] = &[
    ("Springfield", "IL", "627"),
    ("Riverton", "WY", "825"),
    ("Fairview", "TN", "370"),
    ("Glenwood", "IA", "515"),
];

/// `(LOINC code, display, unit, low, high)` of the vital signs and labs generated.
const OBSERVATIONS: &[(&str, &str, &str, f64, f64)] = &[
    ("8867-4", "Heart rate", "/min", 52.0, 110.0),
    ("8310-5", "Body temperature", "Cel", 36.0, 38.9),
    ("29463-7", "Body weight", "kg", 45.0, 120.0),
    (
        "2339-0",
        "Glucose [Mass/volume] in Blood",
        "mg/dL",
        65.0,
        240.0,
    ),
    (
        "4548-4",
        "Hemoglobin A1c/Hemoglobin.total in Blood",
        "%",
        4.5,
        11.0,
    ),
    ("8480-6", "Systolic blood pressure", "mm[Hg]", 95.0, 175.0),
];

/// `(SNOMED code, display)` of the conditions generated.
const CONDITIONS: &[(&str, &str)] = &[
    ("44054006", "Diabetes mellitus type 2"),
    ("38341003", "Hypertensive disorder"),
    ("195967001", "Asthma"),
    ("55822004", "Hyperlipidemia"),
    ("35489007", "Depressive disorder"),
];

/// `(RxNorm code, display)` of the medications generated.
const MEDICATIONS: &[(&str, &str)] = &[
    ("860975", "metformin 500 MG Oral Tablet"),
    ("314076", "lisinopril 10 MG Oral Tablet"),
    ("617312", "atorvastatin 20 MG Oral Tablet"),
    ("745679", "albuterol 0.09 MG/ACTUAT Inhaler"),
];

/// The PHI a generated patient carries (what a leak scan looks for).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntheticIdentity {
    pub family: String,
    pub given: String,
    pub medical_record_number: String,
    pub phone: String,
    pub street_line: String,
    pub birth_date: String,
}

/// One synthetic patient: their transaction Bundle and their identity.
#[derive(Debug, Clone)]
pub struct SyntheticPatient {
    pub bundle: Value,
    pub identity: SyntheticIdentity,
    pub resource_count: usize,
}

/// SplitMix64: small, fast, and the same everywhere.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut mixed = self.0;
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        mixed ^ (mixed >> 31)
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound.max(1) as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn between(&mut self, low: f64, high: f64) -> f64 {
        let fraction = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((low + fraction * (high - low)) * 10.0).round() / 10.0
    }
}

/// Patient number `index` of the population `seed`.
pub fn synthetic_patient(seed: u64, index: usize) -> SyntheticPatient {
    let mut random = Random(seed ^ (index as u64).wrapping_mul(0x2545_F491_4F6C_DD1D));
    let female = random.below(2) == 0;
    let family = (*random.pick(FAMILIES)).to_owned();
    let given = (*random.pick(if female { GIVEN_FEMALE } else { GIVEN_MALE })).to_owned();
    let (city, state, area) = *random.pick(CITIES);
    let identity = SyntheticIdentity {
        medical_record_number: format!("MRN{seed:02}{index:07}"),
        phone: format!("{area}-555-{:04}", index % 10_000),
        street_line: format!("{} {}", 100 + random.below(9_800), random.pick(STREETS)),
        birth_date: format!(
            "{}-{:02}-{:02}",
            1930 + random.below(85),
            1 + random.below(12),
            1 + random.below(28)
        ),
        family,
        given,
    };
    let patient_url = urn(seed, index, 0);
    let mut entries = vec![entry(
        &patient_url,
        json!({
            "resourceType": "Patient",
            "identifier": [{"system": "urn:oid:2.16.840.1.113883.19.5", "value": identity.medical_record_number,
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}}],
            "active": true,
            "name": [{"use": "official", "family": identity.family, "given": [identity.given]}],
            "telecom": [{"system": "phone", "value": identity.phone, "use": "home"}],
            "gender": if female { "female" } else { "male" },
            "birthDate": identity.birth_date,
            "address": [{"line": [identity.street_line], "city": city, "state": state, "postalCode": format!("{area}{:02}", index % 100)}],
        }),
        Some(format!(
            "identifier=urn:oid:2.16.840.1.113883.19.5|{}",
            identity.medical_record_number
        )),
    )];
    let mut serial = 1;
    let encounter_count = 2 + random.below(3);
    for encounter_number in 0..encounter_count {
        let encounter_url = urn(seed, index, serial);
        serial += 1;
        let day = format!(
            "20{:02}-{:02}-{:02}",
            18 + random.below(7),
            1 + random.below(12),
            1 + random.below(28)
        );
        entries.push(entry(&encounter_url, json!({
            "resourceType": "Encounter",
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": if encounter_number == 0 { "AMB" } else { *random.pick(&["AMB", "EMER", "IMP"]) }},
            "type": [{"coding": [{"system": "http://snomed.info/sct", "code": "185349003", "display": "Encounter for check up"}]}],
            "subject": {"reference": patient_url},
            "period": {"start": format!("{day}T09:00:00Z"), "end": format!("{day}T09:40:00Z")},
        }), None));
        for _ in 0..(2 + random.below(3)) {
            let (code, display, unit, low, high) = *random.pick(OBSERVATIONS);
            entries.push(entry(&urn(seed, index, serial), json!({
                "resourceType": "Observation",
                "status": "final",
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": if unit == "mg/dL" || unit == "%" { "laboratory" } else { "vital-signs" }}]}],
                "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": display}], "text": display},
                "subject": {"reference": patient_url},
                "encounter": {"reference": encounter_url},
                "effectiveDateTime": format!("{day}T09:{:02}:00Z", 5 + random.below(30)),
                "valueQuantity": {"value": random.between(low, high), "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
            }), None));
            serial += 1;
        }
    }
    for _ in 0..(1 + random.below(2)) {
        let (code, display) = *random.pick(CONDITIONS);
        entries.push(entry(&urn(seed, index, serial), json!({
            "resourceType": "Condition",
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": code, "display": display}], "text": display},
            "subject": {"reference": patient_url},
            "onsetDateTime": format!("20{:02}-{:02}-01", 10 + random.below(10), 1 + random.below(12)),
        }), None));
        serial += 1;
    }
    for _ in 0..(1 + random.below(2)) {
        let (code, display) = *random.pick(MEDICATIONS);
        entries.push(entry(&urn(seed, index, serial), json!({
            "resourceType": "MedicationRequest",
            "status": "active",
            "intent": "order",
            "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": code, "display": display}]},
            "subject": {"reference": patient_url},
            "authoredOn": format!("20{:02}-{:02}-15", 18 + random.below(7), 1 + random.below(12)),
        }), None));
        serial += 1;
    }
    if random.below(3) == 0 {
        entries.push(entry(&urn(seed, index, serial), json!({
            "resourceType": "ImagingStudy",
            "status": "available",
            "identifier": [{"system": "urn:dicom:uid", "value": format!("urn:oid:2.25.{}{:07}", seed + 1, index)}],
            "subject": {"reference": patient_url},
            "started": format!("20{:02}-{:02}-10T14:00:00Z", 18 + random.below(7), 1 + random.below(12)),
            "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": *random.pick(&["CT", "MR", "CR", "US"])}],
            "numberOfSeries": 1,
            "numberOfInstances": 1 + random.below(200),
        }), None));
    }
    let resource_count = entries.len();
    SyntheticPatient {
        bundle: json!({"resourceType": "Bundle", "type": "transaction", "entry": entries}),
        identity,
        resource_count,
    }
}

fn urn(seed: u64, index: usize, serial: usize) -> String {
    format!(
        "urn:uuid:{:08x}-{:04x}-4000-8000-{:012x}",
        seed as u32, serial, index
    )
}

fn entry(full_url: &str, resource: Value, if_none_exist: Option<String>) -> Value {
    let resource_type = resource["resourceType"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let mut request = json!({"method": "POST", "url": resource_type});
    if let Some(condition) = if_none_exist {
        request["ifNoneExist"] = Value::String(condition);
    }
    json!({"fullUrl": full_url, "resource": resource, "request": request})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_population() {
        let first = synthetic_patient(7, 3);
        assert_eq!(first.bundle, synthetic_patient(7, 3).bundle);
        assert_ne!(first.identity, synthetic_patient(7, 4).identity);
        assert_ne!(
            first.identity.medical_record_number,
            synthetic_patient(8, 3).identity.medical_record_number
        );
    }

    #[test]
    fn every_reference_points_into_the_bundle() {
        let patient = synthetic_patient(1, 42);
        let entries = patient.bundle["entry"].as_array().expect("entries");
        assert_eq!(entries.len(), patient.resource_count);
        assert!(patient.resource_count >= 6);
        let urls: Vec<&str> = entries
            .iter()
            .filter_map(|entry| entry["fullUrl"].as_str())
            .collect();
        for entry in entries.iter().skip(1) {
            let subject = entry["resource"]["subject"]["reference"]
                .as_str()
                .expect("subject");
            assert_eq!(subject, urls[0]);
            let extracted = crate::extract::extract_index(
                entry["resource"]["resourceType"].as_str().expect("type"),
                &entry["resource"],
            );
            assert!(extracted.iter().any(|index| index.code == "subject"));
        }
    }
}
