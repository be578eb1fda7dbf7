//! Index extraction: the values of every implemented search parameter of a resource, typed the
//! way the search side compares them. Values are plain here; the binary crate turns the
//! PHI-bearing ones into blind-index tokens before anything is stored.

use serde_json::Value;

use crate::dates::{DateRange, parse_range};
use crate::path::reference_type;
use crate::search_parameters::{ParameterType, SearchParameters};

/// One value of one search parameter.
#[derive(Debug, Clone, PartialEq)]
pub enum IndexValue {
    /// A string parameter's text (one name part, one address line, …).
    Text(String),
    /// A coded value: `system|code`, either side possibly absent.
    Token {
        system: Option<String>,
        code: String,
    },
    /// The display text of a coded value (for `:text`).
    TokenText(String),
    /// A literal reference, normalized to `Type/id` when it has that shape, else as written.
    Reference(String),
    Date(DateRange),
    Number(f64),
    Quantity {
        value: f64,
        system: Option<String>,
        code: Option<String>,
        unit: Option<String>,
    },
    Uri(String),
}

/// A search parameter code with one of its values.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexEntry {
    pub code: String,
    pub value: IndexValue,
}

/// Every index entry of `resource` (of type `resource_type`).
pub fn extract_index(resource_type: &str, resource: &Value) -> Vec<IndexEntry> {
    let mut entries = Vec::new();
    for parameter in SearchParameters::r4().of_type(resource_type) {
        for path in &parameter.paths {
            for value in path.evaluate(resource) {
                for indexed in values_of(parameter.parameter_type, value) {
                    entries.push(IndexEntry {
                        code: parameter.code.clone(),
                        value: indexed,
                    });
                }
            }
        }
    }
    entries
}

/// The literal references a reference parameter of `resource` holds (for `_include`).
pub fn references_of(resource_type: &str, code: &str, resource: &Value) -> Vec<String> {
    let Some(parameter) = SearchParameters::r4().get(resource_type, code) else {
        return Vec::new();
    };
    if parameter.parameter_type != ParameterType::Reference {
        return Vec::new();
    }
    parameter
        .paths
        .iter()
        .flat_map(|path| path.evaluate(resource))
        .flat_map(|value| values_of(ParameterType::Reference, value))
        .filter_map(|value| match value {
            IndexValue::Reference(reference) => Some(reference),
            _ => None,
        })
        .collect()
}

fn values_of(parameter_type: ParameterType, value: &Value) -> Vec<IndexValue> {
    match parameter_type {
        ParameterType::String => text_values(value),
        ParameterType::Token => token_values(value),
        ParameterType::Reference => reference_values(value),
        ParameterType::Date => date_values(value),
        ParameterType::Number => value.as_f64().map(IndexValue::Number).into_iter().collect(),
        ParameterType::Quantity => quantity_values(value),
        ParameterType::Uri => value
            .as_str()
            .map(|uri| IndexValue::Uri(uri.to_owned()))
            .into_iter()
            .collect(),
    }
}

/// Strings as they are; HumanName and Address by their parts (and their `text`).
fn text_values(value: &Value) -> Vec<IndexValue> {
    const PARTS: &[&str] = &[
        "text",
        "family",
        "given",
        "prefix",
        "suffix",
        "line",
        "city",
        "district",
        "state",
        "postalCode",
        "country",
    ];
    match value {
        Value::String(text) => vec![IndexValue::Text(text.clone())],
        Value::Object(object) => PARTS
            .iter()
            .filter_map(|part| object.get(*part))
            .flat_map(|part| match part {
                Value::Array(items) => items.iter().filter_map(Value::as_str).collect(),
                Value::String(text) => vec![text.as_str()],
                _ => Vec::new(),
            })
            .map(|text| IndexValue::Text(text.to_owned()))
            .collect(),
        _ => Vec::new(),
    }
}

fn token_values(value: &Value) -> Vec<IndexValue> {
    match value {
        Value::String(code) => vec![IndexValue::Token {
            system: None,
            code: code.clone(),
        }],
        Value::Bool(flag) => vec![IndexValue::Token {
            system: None,
            code: flag.to_string(),
        }],
        Value::Object(object) => {
            let mut values = Vec::new();
            if let Some(codings) = object.get("coding").and_then(Value::as_array) {
                values.extend(codings.iter().flat_map(coding_values));
            }
            if object.contains_key("code") || object.contains_key("display") {
                values.extend(coding_values(value));
            }
            if let Some(identifier_value) = object.get("value").and_then(Value::as_str) {
                // Identifier (system|value) and ContactPoint (system is phone/email/…).
                values.push(IndexValue::Token {
                    system: string_member(value, "system"),
                    code: identifier_value.to_owned(),
                });
            }
            if let Some(text) = object.get("text").and_then(Value::as_str) {
                values.push(IndexValue::TokenText(text.to_owned()));
            }
            if let Some(type_text) = object.get("type").and_then(|kind| kind.get("text")) {
                values.extend(
                    type_text
                        .as_str()
                        .map(|text| IndexValue::TokenText(text.to_owned())),
                );
            }
            values
        }
        _ => Vec::new(),
    }
}

fn coding_values(coding: &Value) -> Vec<IndexValue> {
    let mut values = Vec::new();
    if let Some(code) = coding.get("code").and_then(Value::as_str) {
        values.push(IndexValue::Token {
            system: string_member(coding, "system"),
            code: code.to_owned(),
        });
    }
    if let Some(display) = coding.get("display").and_then(Value::as_str) {
        values.push(IndexValue::TokenText(display.to_owned()));
    }
    values
}

fn reference_values(value: &Value) -> Vec<IndexValue> {
    let literal = match value {
        Value::String(canonical) => Some(canonical.split('|').next().unwrap_or_default()),
        Value::Object(object) => object.get("reference").and_then(Value::as_str),
        _ => None,
    };
    literal
        .filter(|reference| !reference.is_empty() && !reference.starts_with('#'))
        .map(|reference| IndexValue::Reference(normalize_reference(reference)))
        .into_iter()
        .collect()
}

/// `http://host/fhir/Patient/1/_history/2` and `Patient/1` both become `Patient/1`; anything
/// without a `Type/id` tail (a urn, a canonical without one) stays as written.
pub fn normalize_reference(reference: &str) -> String {
    let Some(resource_type) = reference_type(reference) else {
        return reference.to_owned();
    };
    let without_history = match reference.find("/_history/") {
        Some(position) => &reference[..position],
        None => reference,
    };
    let id = without_history.rsplit('/').next().unwrap_or_default();
    format!("{resource_type}/{id}")
}

fn date_values(value: &Value) -> Vec<IndexValue> {
    match value {
        Value::String(text) => parse_range(text)
            .map(IndexValue::Date)
            .into_iter()
            .collect(),
        Value::Object(object) if object.contains_key("start") || object.contains_key("end") => {
            let start = object
                .get("start")
                .and_then(Value::as_str)
                .and_then(parse_range);
            let end = object
                .get("end")
                .and_then(Value::as_str)
                .and_then(parse_range);
            if start.is_none() && end.is_none() {
                return Vec::new();
            }
            vec![IndexValue::Date(DateRange {
                low: start.map_or(DateRange::UNBOUNDED.low, |range| range.low),
                high: end.map_or(DateRange::UNBOUNDED.high, |range| range.high),
            })]
        }
        Value::Object(object) => object
            .get("event")
            .and_then(Value::as_array)
            .map(|events| events.iter().flat_map(date_values).collect())
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

fn quantity_values(value: &Value) -> Vec<IndexValue> {
    let Some(number) = value.get("value").and_then(Value::as_f64) else {
        return Vec::new();
    };
    vec![IndexValue::Quantity {
        value: number,
        system: string_member(value, "system"),
        code: string_member(value, "code"),
        unit: string_member(value, "unit"),
    }]
}

fn string_member(value: &Value, member: &str) -> Option<String> {
    value.get(member).and_then(Value::as_str).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn values(entries: &[IndexEntry], code: &str) -> Vec<IndexValue> {
        entries
            .iter()
            .filter(|entry| entry.code == code)
            .map(|entry| entry.value.clone())
            .collect()
    }

    #[test]
    fn patient_names_identifiers_and_dates() {
        let patient = json!({
            "resourceType": "Patient", "id": "p1",
            "name": [{"family": "Smith", "given": ["John", "Q"]}],
            "identifier": [{"system": "urn:mrn", "value": "12345"}],
            "telecom": [{"system": "phone", "value": "555-0100"}],
            "birthDate": "1970-05-06", "gender": "male",
            "meta": {"tag": [{"system": "urn:t", "code": "vip"}]},
        });
        let entries = extract_index("Patient", &patient);
        assert!(values(&entries, "family").contains(&IndexValue::Text("Smith".into())));
        assert_eq!(values(&entries, "given").len(), 2);
        assert!(values(&entries, "name").contains(&IndexValue::Text("Q".into())));
        assert!(values(&entries, "identifier").contains(&IndexValue::Token {
            system: Some("urn:mrn".into()),
            code: "12345".into()
        }));
        assert_eq!(values(&entries, "phone").len(), 1);
        assert!(matches!(
            values(&entries, "birthdate")[0],
            IndexValue::Date(_)
        ));
        assert_eq!(
            values(&entries, "_tag"),
            vec![IndexValue::Token {
                system: Some("urn:t".into()),
                code: "vip".into()
            }]
        );
        assert_eq!(values(&entries, "_id").len(), 1);
    }

    #[test]
    fn observation_codes_references_and_quantities() {
        let observation = json!({
            "resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}], "text": "HR"},
            "subject": {"reference": "https://elsewhere/fhir/Patient/p1/_history/3"},
            "effectivePeriod": {"start": "2024-01-01"},
            "valueQuantity": {"value": 72, "system": "http://unitsofmeasure.org", "code": "/min"},
        });
        let entries = extract_index("Observation", &observation);
        assert!(values(&entries, "code").contains(&IndexValue::Token {
            system: Some("http://loinc.org".into()),
            code: "8867-4".into()
        }));
        assert!(values(&entries, "code").contains(&IndexValue::TokenText("HR".into())));
        assert_eq!(
            values(&entries, "subject"),
            vec![IndexValue::Reference("Patient/p1".into())]
        );
        assert_eq!(
            values(&entries, "patient"),
            vec![IndexValue::Reference("Patient/p1".into())]
        );
        let IndexValue::Date(range) = values(&entries, "date")[0] else {
            panic!("date")
        };
        assert_eq!(range.high, DateRange::UNBOUNDED.high);
        assert!(
            matches!(values(&entries, "value-quantity")[0], IndexValue::Quantity { value, .. } if value == 72.0)
        );
        assert_eq!(
            references_of("Observation", "subject", &observation),
            vec!["Patient/p1".to_owned()]
        );
    }

    #[test]
    fn references_keep_their_shape() {
        assert_eq!(normalize_reference("Patient/1"), "Patient/1");
        assert_eq!(normalize_reference("urn:uuid:abc"), "urn:uuid:abc");
        assert_eq!(
            normalize_reference("http://x/fhir/Device/d/_history/1"),
            "Device/d"
        );
    }
}
