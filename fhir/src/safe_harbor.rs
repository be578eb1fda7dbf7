//! HIPAA Safe Harbor de-identification of FHIR R4 resources (45 CFR 164.514(b)(2)): what a
//! caller whose policy grants only de-identified views receives instead of the stored resource,
//! and which searches such a caller may run without learning what the view hides.
//!
//! The eighteen identifiers and what happens to them:
//! names (HumanName anywhere), telecom, photos, e-mail, URLs and IP addresses are removed;
//! addresses keep only state, country and the first three digits of a US ZIP code ("000" for the
//! sparsely populated three-digit areas HHS lists); every date keeps only its year, instants
//! (which cannot be year-only) are removed, and a birth year that puts the patient at 90 or older
//! is removed and replaced by the "90 or older" category, as are ages over 89; identifiers,
//! serial numbers and resource ids become stable keyed pseudonyms so that records stay linked;
//! free text (narrative, notes, comments, descriptions, string values, reference displays) is
//! removed. Every output carries the security labels `PSEUDED` and, when anything was removed,
//! `REDACTED`.

use serde_json::{Map, Value};

use crate::query::{Criterion, Match, SearchRequest, SortKey, Test};
use crate::search_parameters::{ParameterType, SearchParameters};

/// The code system of the security labels that mark a de-identified resource.
pub const SECURITY_LABEL_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";

/// The extension that replaces a birth date (or age) of a patient aged 90 or older.
pub const AGE_CATEGORY_EXTENSION: &str =
    "https://glastonbury.dev/fhir/StructureDefinition/safe-harbor-age-category";

/// Three-digit ZIP areas of 20,000 people or fewer (HHS, 2000 Census): their ZIP becomes "000".
pub const RESTRICTED_ZIP3: [&str; 17] = [
    "036", "059", "063", "102", "203", "556", "692", "790", "821", "823", "830", "831", "878",
    "879", "884", "890", "893",
];

/// Ages above this are aggregated into one "90 or older" category.
pub const OLDEST_REPORTED_AGE: f64 = 89.0;

/// Elements that hold only free text, a photo or contact details: removed wherever they occur.
const REMOVED_ELEMENTS: &[&str] = &[
    "telecom",
    "photo",
    "note",
    "comment",
    "comments",
    "description",
    "conclusion",
    "patientInstruction",
    "summary",
    "valueString",
    "valueMarkdown",
    "valueAttachment",
    "valueContactPoint",
    "valueHumanName",
    "valueAnnotation",
    "udiCarrier",
    "distinctIdentifier",
    "position",
];

/// Elements of type `instant` wherever they occur: an instant must carry a full time, so it
/// cannot be reduced to a year and is removed.
const INSTANT_ELEMENTS: &[&str] = &["issued", "recorded", "lastUpdated", "when", "timestamp"];

/// Top-level elements of type `instant` in particular resources.
const INSTANT_ELEMENTS_OF_TYPE: &[(&str, &str)] = &[
    ("DocumentReference", "date"),
    ("Slot", "start"),
    ("Slot", "end"),
    ("Appointment", "start"),
    ("Appointment", "end"),
    ("AppointmentResponse", "start"),
    ("AppointmentResponse", "end"),
];

/// The identifier system of DICOM UIDs (an ImagingStudy's StudyInstanceUID).
const DICOM_UID_SYSTEM: &str = "urn:dicom:uid";

/// Identifier-like strings that are not typed `Identifier`: replaced by pseudonyms.
const IDENTIFYING_STRINGS: &[&str] = &["serialNumber", "lotNumber", "subscriberId"];

/// Members whose strings are codes, systems or links, never dates or free text.
const CODE_LIKE: &[&str] = &[
    "system", "code", "version", "url", "profile", "id", "unit", "status", "use", "type",
];

/// Search parameters a de-identified view must not search by, whatever their type: they would
/// confirm who is in the data set.
const IDENTIFYING_PARAMETERS: &[&str] = &[
    "identifier",
    "telecom",
    "phone",
    "email",
    "address",
    "address-city",
    "address-postalcode",
    "name",
    "family",
    "given",
    "phonetic",
    "birthdate",
    "death-date",
];

/// Keyed, stable pseudonyms: the same input always gives the same output under one appliance's
/// key, and nobody without the key can go back.
pub trait Pseudonyms {
    /// The pseudonym of a resource's logical id (a valid FHIR id).
    fn resource_id(&self, resource_type: &str, id: &str) -> String;
    /// The pseudonym of an identifier value within its system (or kind, for serial numbers).
    fn identifier(&self, system: &str, value: &str) -> String;
    /// The replacement of a DICOM UID (`ImagingStudy.series.uid`, `…instance.uid`): a valid UID,
    /// the same one the de-identified view of DICOM data names the series or instance by.
    fn uid(&self, uid: &str) -> String;
}

/// The Safe Harbor transform under one set of pseudonyms, as of one calendar year.
#[derive(Clone, Copy)]
pub struct SafeHarbor<'a> {
    pseudonyms: &'a dyn Pseudonyms,
    current_year: i32,
}

impl std::fmt::Debug for SafeHarbor<'_> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SafeHarbor")
            .field("current_year", &self.current_year)
            .finish_non_exhaustive()
    }
}

/// What a transform removed, for the security labels.
#[derive(Debug, Default)]
struct Findings {
    removed: bool,
}

impl<'a> SafeHarbor<'a> {
    /// `current_year` decides which birth years mean "90 or older".
    pub fn new(pseudonyms: &'a dyn Pseudonyms, current_year: i32) -> Self {
        Self {
            pseudonyms,
            current_year,
        }
    }

    /// The de-identified copy of one resource (the input is not changed).
    pub fn deidentify(&self, resource: &Value) -> Value {
        let mut findings = Findings::default();
        let Some(object) = resource.as_object() else {
            return Value::Null;
        };
        let resource_type = object
            .get("resourceType")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let mut cleaned = self.clean_resource(&resource_type, object, &mut findings);
        add_security_labels(&mut cleaned, findings.removed);
        Value::Object(cleaned)
    }

    /// The pseudonymous form of a reference (`Type/id`, or an absolute URL ending in one).
    /// Contained (`#x`) and `urn:` references are local to their Bundle and stay as they are.
    pub fn reference(&self, reference: &str) -> String {
        if reference.starts_with('#') || reference.starts_with("urn:") {
            return reference.to_owned();
        }
        let (path, _) = reference.split_once('?').unwrap_or((reference, ""));
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
        let history = segments.iter().position(|segment| *segment == "_history");
        let end = history.unwrap_or(segments.len());
        if end < 2 {
            return String::new();
        }
        let resource_type = segments[end - 2];
        let id = segments[end - 1];
        if !SearchParameters::r4().is_resource_type(resource_type) {
            return String::new();
        }
        format!(
            "{resource_type}/{}",
            self.pseudonyms.resource_id(resource_type, id)
        )
    }

    fn clean_resource(
        &self,
        resource_type: &str,
        object: &Map<String, Value>,
        findings: &mut Findings,
    ) -> Map<String, Value> {
        let mut cleaned = Map::new();
        let mut ninety_or_older = false;
        for (key, value) in object {
            if INSTANT_ELEMENTS_OF_TYPE.contains(&(resource_type, key.as_str())) {
                findings.removed = true;
                continue;
            }
            let replacement = match key.as_str() {
                "resourceType" => Some(value.clone()),
                "id" => value
                    .as_str()
                    .map(|id| Value::String(self.pseudonyms.resource_id(resource_type, id))),
                "text" if value.is_object() => {
                    findings.removed = true;
                    None
                }
                "contained" => Some(self.clean_contained(value, findings)),
                "meta" => Some(clean_meta(value)),
                "birthDate" => match value.as_str().and_then(year_of) {
                    Some(year) if self.current_year - year >= 90 => {
                        ninety_or_older = true;
                        findings.removed = true;
                        None
                    }
                    Some(year) => Some(Value::String(format!("{year:04}"))),
                    None => None,
                },
                _ => self.clean_member(key, value, object, findings),
            };
            if let Some(replacement) = replacement.filter(|value| !is_empty(value)) {
                cleaned.insert(key.clone(), replacement);
            }
        }
        if ninety_or_older {
            let category = serde_json::json!({
                "url": AGE_CATEGORY_EXTENSION,
                "valueString": "90 or older",
            });
            match cleaned
                .entry("extension")
                .or_insert_with(|| Value::Array(Vec::new()))
            {
                Value::Array(extensions) => extensions.push(category),
                other => *other = Value::Array(vec![category]),
            }
        }
        cleaned
    }

    fn clean_contained(&self, value: &Value, findings: &mut Findings) -> Value {
        let Some(items) = value.as_array() else {
            return Value::Null;
        };
        let cleaned = items
            .iter()
            .filter_map(Value::as_object)
            .map(|contained| {
                let resource_type = contained
                    .get("resourceType")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let mut resource = self.clean_resource(resource_type, contained, findings);
                // A contained resource's id is local to its container (`#id`): keep it.
                if let Some(id) = contained.get("id") {
                    resource.insert("id".to_owned(), id.clone());
                }
                Value::Object(resource)
            })
            .collect();
        Value::Array(cleaned)
    }

    /// One member of an element (or of a resource, when no resource-level rule applied).
    fn clean_member(
        &self,
        key: &str,
        value: &Value,
        parent: &Map<String, Value>,
        findings: &mut Findings,
    ) -> Option<Value> {
        if REMOVED_ELEMENTS.contains(&key) || INSTANT_ELEMENTS.contains(&key) {
            findings.removed = true;
            return None;
        }
        if IDENTIFYING_STRINGS.contains(&key) {
            return value
                .as_str()
                .map(|text| Value::String(self.pseudonyms.identifier(key, text)));
        }
        match key {
            "name" if !value.is_string() => {
                findings.removed = true;
                None
            }
            "text" | "display" if !is_coding(parent) => {
                findings.removed = true;
                None
            }
            "reference" => value
                .as_str()
                .map(|reference| Value::String(self.reference(reference))),
            "uid" => value
                .as_str()
                .map(|uid| Value::String(self.pseudonyms.uid(uid))),
            "address" | "valueAddress" => self.clean_addresses(value, findings),
            "identifier" | "masterIdentifier" | "valueIdentifier" => {
                Some(self.clean_identifiers(value, findings))
            }
            "extension" | "modifierExtension" => Some(self.clean_extensions(value, findings)),
            "data" | "title" if is_attachment(parent) => {
                findings.removed = true;
                None
            }
            "url" if is_attachment(parent) => {
                findings.removed = true;
                None
            }
            _ if key.ends_with("Age") || is_age(value) => {
                Some(cap_age(self.clean_value(key, value, findings)))
            }
            _ => Some(self.clean_value(key, value, findings)),
        }
    }

    /// Any value: objects member by member, arrays item by item, date strings to their year.
    fn clean_value(&self, key: &str, value: &Value, findings: &mut Findings) -> Value {
        match value {
            Value::Object(object) => {
                let mut cleaned = Map::new();
                for (member, member_value) in object {
                    if let Some(replacement) = self
                        .clean_member(member, member_value, object, findings)
                        .filter(|value| !is_empty(value))
                    {
                        cleaned.insert(member.clone(), replacement);
                    }
                }
                Value::Object(cleaned)
            }
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|item| self.clean_value(key, item, findings))
                    .filter(|value| !is_empty(value))
                    .collect(),
            ),
            Value::String(text) if !CODE_LIKE.contains(&key) => match year_of(text) {
                Some(year) if looks_like_date(text) => Value::String(format!("{year:04}")),
                _ => value.clone(),
            },
            _ => value.clone(),
        }
    }

    /// Addresses keep use, type, state, country and a three-digit US ZIP; a string address (an
    /// endpoint, a network address) goes.
    fn clean_addresses(&self, value: &Value, findings: &mut Findings) -> Option<Value> {
        findings.removed = true;
        match value {
            Value::Array(items) => Some(Value::Array(
                items.iter().filter_map(clean_address).collect(),
            )),
            Value::Object(_) => clean_address(value),
            _ => None,
        }
    }

    fn clean_identifiers(&self, value: &Value, findings: &mut Findings) -> Value {
        match value {
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|item| self.clean_identifier(item, findings))
                    .filter(|value| !is_empty(value))
                    .collect(),
            ),
            other => self.clean_identifier(other, findings),
        }
    }

    fn clean_identifier(&self, identifier: &Value, findings: &mut Findings) -> Value {
        let Some(object) = identifier.as_object() else {
            return Value::Null;
        };
        let system = object
            .get("system")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let mut cleaned = Map::new();
        for (key, value) in object {
            let replacement = match key.as_str() {
                "value" => value.as_str().map(|text| {
                    Value::String(match text.strip_prefix("urn:oid:") {
                        // A DICOM UID (a study's): remapped as the DICOM view remaps it.
                        Some(uid) if system == DICOM_UID_SYSTEM => {
                            format!("urn:oid:{}", self.pseudonyms.uid(uid))
                        }
                        _ => self.pseudonyms.identifier(system, text),
                    })
                }),
                "assigner" | "period" => Some(self.clean_value(key, value, findings)),
                _ => self.clean_member(key, value, object, findings),
            };
            if let Some(replacement) = replacement.filter(|value| !is_empty(value)) {
                cleaned.insert(key.clone(), replacement);
            }
        }
        Value::Object(cleaned)
    }

    /// Extensions are cleaned like any element; one left without a value (its value was free
    /// text, a name, a contact) goes too.
    fn clean_extensions(&self, value: &Value, findings: &mut Findings) -> Value {
        let Some(items) = value.as_array() else {
            return Value::Null;
        };
        Value::Array(
            items
                .iter()
                .map(|item| self.clean_value("extension", item, findings))
                .filter(|extension| {
                    extension.as_object().is_some_and(|object| {
                        object
                            .keys()
                            .any(|key| key.starts_with("value") || key == "extension")
                    })
                })
                .collect(),
        )
    }
}

fn clean_address(address: &Value) -> Option<Value> {
    let object = address.as_object()?;
    let country = object
        .get("country")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let mut cleaned = Map::new();
    for key in ["use", "type", "state", "country"] {
        if let Some(value) = object.get(key).filter(|value| value.is_string()) {
            cleaned.insert(key.to_owned(), value.clone());
        }
    }
    let us = country.is_empty() || matches!(country.to_ascii_uppercase().as_str(), "US" | "USA");
    if us
        && let Some(zip3) = object
            .get("postalCode")
            .and_then(Value::as_str)
            .and_then(three_digit_zip)
    {
        cleaned.insert("postalCode".to_owned(), Value::String(zip3));
    }
    (!cleaned.is_empty()).then_some(Value::Object(cleaned))
}

/// The first three digits of a US ZIP (5 or 9 digits), or "000" for a restricted area.
pub fn three_digit_zip(postal_code: &str) -> Option<String> {
    let digits: String = postal_code.chars().filter(char::is_ascii_digit).collect();
    if digits.len() != 5 && digits.len() != 9 {
        return None;
    }
    let zip3 = &digits[..3];
    if RESTRICTED_ZIP3.contains(&zip3) {
        return Some("000".to_owned());
    }
    Some(zip3.to_owned())
}

/// The server-owned parts of meta that can stay (tags and profiles); `source` can name a
/// system and `lastUpdated` is a full date.
fn clean_meta(meta: &Value) -> Value {
    let Some(object) = meta.as_object() else {
        return Value::Null;
    };
    let mut cleaned = Map::new();
    for key in ["profile", "tag", "security"] {
        if let Some(value) = object.get(key) {
            cleaned.insert(key.to_owned(), value.clone());
        }
    }
    Value::Object(cleaned)
}

fn add_security_labels(resource: &mut Map<String, Value>, removed: bool) {
    let meta = resource
        .entry("meta")
        .or_insert_with(|| Value::Object(Map::new()));
    if !meta.is_object() {
        *meta = Value::Object(Map::new());
    }
    let mut labels = vec![serde_json::json!({
        "system": SECURITY_LABEL_SYSTEM, "code": "PSEUDED", "display": "pseudonymized",
    })];
    if removed {
        labels.push(serde_json::json!({
            "system": SECURITY_LABEL_SYSTEM, "code": "REDACTED", "display": "redacted",
        }));
    }
    match meta.get_mut("security").and_then(Value::as_array_mut) {
        Some(security) => security.extend(labels),
        None => meta["security"] = Value::Array(labels),
    }
}

/// A Coding (it has a system or a code): its display is the code's name, not free text.
fn is_coding(parent: &Map<String, Value>) -> bool {
    parent.contains_key("code") || parent.contains_key("system")
}

/// An Attachment: its data, URL and title can be a photo, a document or a name.
fn is_attachment(parent: &Map<String, Value>) -> bool {
    parent.contains_key("contentType")
        || parent.contains_key("data")
        || (parent.contains_key("url") && parent.contains_key("size"))
}

/// A Quantity in years of age (UCUM `a`).
fn is_age(value: &Value) -> bool {
    value.get("code").and_then(Value::as_str) == Some("a")
        && value.get("value").is_some_and(Value::is_number)
}

/// Ages over 89 become "90 or more".
fn cap_age(mut value: Value) -> Value {
    let too_old = value
        .get("value")
        .and_then(Value::as_f64)
        .is_some_and(|age| age > OLDEST_REPORTED_AGE);
    if too_old && let Some(object) = value.as_object_mut() {
        object.insert("value".to_owned(), Value::from(90));
        object.insert("comparator".to_owned(), Value::String(">=".to_owned()));
    }
    value
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::String(text) => text.is_empty(),
        Value::Array(items) => items.is_empty(),
        Value::Object(object) => object.is_empty(),
        _ => false,
    }
}

/// The year of a FHIR date, dateTime or instant (`YYYY`, `YYYY-MM`, `YYYY-MM-DD…`).
fn year_of(text: &str) -> Option<i32> {
    let year = text.get(..4)?;
    if !year.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    if text.len() > 4 && text.as_bytes()[4] != b'-' {
        return None;
    }
    year.parse().ok()
}

/// A string that is a date with more than a year (`YYYY-MM…`): what Safe Harbor reduces.
fn looks_like_date(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.len() >= 7
        && bytes[4] == b'-'
        && bytes[5].is_ascii_digit()
        && bytes[6].is_ascii_digit()
        && crate::dates::parse_range(text).is_some()
}

/// Why a de-identified view may not run a search (answered with 400, no PHI in the text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ViewRestriction(pub String);

/// Checks that a search run on a de-identified view cannot learn what the view hides: no
/// string parameters (names, addresses, free text), no identifying parameters, dates only to
/// the year, no chains (they would search identified data on the way), and `_id` and
/// references only by pseudonym (the caller translates those before searching).
pub fn check_deidentified_search(
    resource_type: &str,
    request: &SearchRequest,
) -> Result<(), ViewRestriction> {
    for criterion in &request.criteria {
        check_criterion(resource_type, criterion)?;
    }
    for sort in &request.sort {
        check_sort(sort)?;
    }
    Ok(())
}

fn check_criterion(resource_type: &str, criterion: &Criterion) -> Result<(), ViewRestriction> {
    match criterion {
        Criterion::Id(_) => Ok(()),
        Criterion::LastUpdated(dates) => {
            if dates.iter().all(|date| is_whole_years(&date.range)) {
                return Ok(());
            }
            Err(year_only())
        }
        Criterion::Chain { .. } | Criterion::Has { .. } => Err(ViewRestriction(
            "a de-identified view cannot use chained or _has parameters".to_owned(),
        )),
        Criterion::Indexed(indexed) => {
            if IDENTIFYING_PARAMETERS.contains(&indexed.code.as_str()) {
                return Err(ViewRestriction(format!(
                    "a de-identified view cannot search {resource_type} by {}",
                    indexed.code
                )));
            }
            if indexed.parameter_type == ParameterType::String {
                return Err(ViewRestriction(format!(
                    "a de-identified view cannot search by text ({})",
                    indexed.code
                )));
            }
            let Test::AnyOf(matches) = &indexed.test else {
                return Ok(());
            };
            for found in matches {
                check_match(found)?;
            }
            Ok(())
        }
    }
}

fn check_match(found: &Match) -> Result<(), ViewRestriction> {
    match found {
        Match::Date(date) if !is_whole_years(&date.range) => Err(year_only()),
        Match::TokenText(_) => Err(ViewRestriction(
            "a de-identified view cannot search by :text".to_owned(),
        )),
        Match::TextStartsWith(_) | Match::TextExact(_) | Match::TextContains(_) => Err(
            ViewRestriction("a de-identified view cannot search by text".to_owned()),
        ),
        _ => Ok(()),
    }
}

fn check_sort(sort: &SortKey) -> Result<(), ViewRestriction> {
    if IDENTIFYING_PARAMETERS.contains(&sort.code.as_str()) {
        return Err(ViewRestriction(format!(
            "a de-identified view cannot sort by {}",
            sort.code
        )));
    }
    Ok(())
}

fn year_only() -> ViewRestriction {
    ViewRestriction("a de-identified view searches dates by year only (e.g. ge2020)".to_owned())
}

/// Whether a searched date range is a whole number of calendar years (what `2020` parses to).
fn is_whole_years(range: &crate::dates::DateRange) -> bool {
    let starts_a_year = |micros: i64| {
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
            .is_ok_and(|moment| moment.ordinal() == 1 && moment.time() == time::Time::MIDNIGHT)
    };
    range == &crate::dates::DateRange::UNBOUNDED
        || (starts_a_year(range.low) && starts_a_year(range.high.saturating_add(1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct TestPseudonyms;

    impl Pseudonyms for TestPseudonyms {
        fn resource_id(&self, resource_type: &str, id: &str) -> String {
            format!("p-{}-{}", resource_type.len(), id.len())
        }
        fn identifier(&self, system: &str, value: &str) -> String {
            format!("pid-{}-{}", system.len(), value.len())
        }
        fn uid(&self, uid: &str) -> String {
            format!("2.25.{}", uid.len())
        }
    }

    fn transform(resource: Value) -> Value {
        SafeHarbor::new(&TestPseudonyms, 2026).deidentify(&resource)
    }

    fn patient() -> Value {
        json!({
            "resourceType": "Patient",
            "id": "mrn-123456",
            "meta": {"versionId": "3", "lastUpdated": "2024-05-06T07:08:09Z", "source": "http://ehr.example/node7"},
            "text": {"status": "generated", "div": "<div>Jane Q Public</div>"},
            "identifier": [{"system": "urn:oid:1.2.3", "value": "123-45-6789", "assigner": {"display": "Mercy Hospital"}}],
            "name": [{"family": "Public", "given": ["Jane", "Q"]}],
            "telecom": [{"system": "phone", "value": "555-0100"}],
            "gender": "female",
            "birthDate": "1961-07-14",
            "address": [{"line": ["12 Elm Street"], "city": "Springfield", "state": "MA", "postalCode": "01103-2201", "country": "US"}],
            "contact": [{"name": {"family": "Public"}, "telecom": [{"value": "555-0101"}], "relationship": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0131", "code": "N"}]}]}],
            "photo": [{"contentType": "image/jpeg", "data": "AAAA"}],
            "extension": [
                {"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex", "valueCode": "F"},
                {"url": "http://example.org/mothers-maiden-name", "valueString": "Smith"}
            ],
            "generalPractitioner": [{"reference": "Practitioner/dr-who", "display": "Dr. John Who"}]
        })
    }

    #[test]
    fn names_contacts_photos_and_narrative_are_removed() {
        let output = transform(patient());
        let text = output.to_string();
        for phi in [
            "Public",
            "Jane",
            "555-01",
            "12 Elm",
            "Springfield",
            "123-45-6789",
            "mrn-123456",
            "Mercy",
            "John Who",
            "Smith",
            "node7",
            "AAAA",
        ] {
            assert!(!text.contains(phi), "{phi} survived: {text}");
        }
        assert!(output.get("name").is_none());
        assert!(output.get("telecom").is_none());
        assert!(output.get("photo").is_none());
        assert!(output.get("text").is_none());
        assert_eq!(output["gender"], "female");
        assert_eq!(
            output["contact"][0]["relationship"][0]["coding"][0]["code"],
            "N"
        );
        assert_eq!(output["extension"].as_array().unwrap().len(), 1);
        assert_eq!(output["extension"][0]["valueCode"], "F");
    }

    #[test]
    fn dates_keep_their_year_and_instants_go() {
        let output = transform(patient());
        assert_eq!(output["birthDate"], "1961");
        assert!(output["meta"].get("lastUpdated").is_none());
        let observation = transform(json!({
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}], "text": "pulse taken by Dr Smith"},
            "subject": {"reference": "Patient/mrn-123456"},
            "effectivePeriod": {"start": "2023-03-04T10:11:12+01:00", "end": "2023-03-05"},
            "issued": "2023-03-04T10:11:12Z",
            "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
            "note": [{"text": "patient anxious"}]
        }));
        assert_eq!(observation["effectivePeriod"]["start"], "2023");
        assert_eq!(observation["effectivePeriod"]["end"], "2023");
        assert!(observation.get("issued").is_none());
        assert!(observation.get("note").is_none());
        assert!(observation["code"].get("text").is_none());
        assert_eq!(observation["code"]["coding"][0]["display"], "Heart rate");
        assert_eq!(observation["valueQuantity"]["value"], 72);
        assert_eq!(observation["subject"]["reference"], "Patient/p-7-10");
    }

    #[test]
    fn the_oldest_patients_lose_their_birth_year() {
        let mut old = patient();
        old["birthDate"] = json!("1930-01-01");
        let output = transform(old);
        assert!(output.get("birthDate").is_none());
        let extensions = output["extension"].as_array().unwrap();
        assert!(
            extensions
                .iter()
                .any(|extension| extension["url"] == AGE_CATEGORY_EXTENSION
                    && extension["valueString"] == "90 or older")
        );
        let mut eighty_nine = patient();
        eighty_nine["birthDate"] = json!("1937-12-31");
        assert_eq!(transform(eighty_nine)["birthDate"], "1937");
        let condition = transform(json!({
            "resourceType": "Condition",
            "subject": {"reference": "Patient/x"},
            "onsetAge": {"value": 93, "unit": "years", "system": "http://unitsofmeasure.org", "code": "a"}
        }));
        assert_eq!(condition["onsetAge"]["value"], 90);
        assert_eq!(condition["onsetAge"]["comparator"], ">=");
    }

    #[test]
    fn zip_codes_keep_three_digits_unless_the_area_is_small() {
        assert_eq!(three_digit_zip("01103-2201").as_deref(), Some("011"));
        assert_eq!(three_digit_zip("03601").as_deref(), Some("000"));
        assert_eq!(three_digit_zip("N1 9GU"), None);
        let output = transform(patient());
        assert_eq!(
            output["address"][0],
            json!({"state": "MA", "postalCode": "011", "country": "US"})
        );
    }

    #[test]
    fn identifiers_and_ids_become_stable_pseudonyms() {
        let first = transform(patient());
        let second = transform(patient());
        assert_eq!(first, second);
        assert_eq!(first["id"], "p-7-10");
        assert_eq!(first["identifier"][0]["value"], "pid-13-11");
        assert_eq!(first["identifier"][0]["system"], "urn:oid:1.2.3");
        assert_eq!(
            first["generalPractitioner"][0]["reference"],
            "Practitioner/p-12-6"
        );
        let device = transform(
            json!({"resourceType": "Device", "serialNumber": "SN-998877", "lotNumber": "L1"}),
        );
        assert_eq!(device["serialNumber"], "pid-12-9");
    }

    #[test]
    fn dicom_uids_in_imaging_studies_are_replaced() {
        let study = json!({
            "resourceType": "ImagingStudy",
            "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.840.113619.2.55"}],
            "series": [{"uid": "1.2.840.113619.2.55.3", "instance": [{"uid": "1.2.840.113619.2.55.3.1"}]}]
        });
        let shown = transform(study);
        assert_eq!(shown["identifier"][0]["value"], "urn:oid:2.25.19");
        assert_eq!(shown["series"][0]["uid"], "2.25.21");
        assert_eq!(shown["series"][0]["instance"][0]["uid"], "2.25.23");
    }

    #[test]
    fn outputs_are_labelled() {
        let output = transform(json!({"resourceType": "Observation", "status": "final"}));
        let codes: Vec<&str> = output["meta"]["security"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|label| label["code"].as_str())
            .collect();
        assert_eq!(codes, ["PSEUDED"]);
        let codes: Vec<String> = transform(patient())["meta"]["security"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|label| label["code"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(codes, ["PSEUDED", "REDACTED"]);
    }

    #[test]
    fn references_keep_their_type_and_lose_their_id() {
        let harbor = SafeHarbor::new(&TestPseudonyms, 2026);
        assert_eq!(harbor.reference("Patient/abc"), "Patient/p-7-3");
        assert_eq!(
            harbor.reference("https://ehr.example/fhir/Patient/abc/_history/2"),
            "Patient/p-7-3"
        );
        assert_eq!(harbor.reference("#med1"), "#med1");
        assert_eq!(harbor.reference("NotAType/abc"), "");
    }

    fn search(resource_type: &str, query: &[(&str, &str)]) -> Result<(), ViewRestriction> {
        let pairs: Vec<(String, String)> = query
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect();
        let request = crate::query::parse_search(resource_type, &pairs).unwrap();
        check_deidentified_search(resource_type, &request)
    }

    #[test]
    fn searches_that_would_reidentify_are_refused() {
        assert!(
            search(
                "Observation",
                &[("code", "http://loinc.org|8867-4"), ("date", "ge2020")]
            )
            .is_ok()
        );
        assert!(search("Condition", &[("code", "38341003"), ("_count", "10")]).is_ok());
        assert!(search("Patient", &[("gender", "female"), ("birthdate", "1960")]).is_err());
        assert!(search("Patient", &[("family", "smi")]).is_err());
        assert!(search("Patient", &[("identifier", "urn:oid:1.2.3|123")]).is_err());
        assert!(search("Observation", &[("date", "2023-03-04")]).is_err());
        assert!(search("Observation", &[("date", "ge2023-03")]).is_err());
        assert!(search("Observation", &[("subject.family", "smi")]).is_err());
        assert!(search("Observation", &[("code:text", "heart")]).is_err());
        assert!(search("Observation", &[("_lastUpdated", "ge2024")]).is_ok());
    }
}
