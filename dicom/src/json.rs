//! DICOM JSON (PS3.18 Annex F.2) of instance headers: what WADO-RS metadata returns and what
//! QIDO-RS picks its attributes from. Bulk data (Pixel Data) is never inlined: it is referred to
//! by a `BulkDataURI` built for the request.

use dicom_core::Tag;
use dicom_object::InMemDicomObject;
use serde_json::{Map, Value};

/// DICOM JSON of a header (a data set without Pixel Data).
pub fn header_json(header: &InMemDicomObject) -> Result<Value, serde_json::Error> {
    dicom_json::to_value(header)
}

/// DICOM JSON of a header, written straight to bytes (no intermediate JSON tree), as the index
/// stores it: the same bytes as `dicom_json::to_vec` (see [`crate::json_writer`]).
pub fn header_json_bytes(
    header: &InMemDicomObject,
) -> Result<Vec<u8>, crate::json_writer::JsonWriteError> {
    let mut out = Vec::with_capacity(HEADER_JSON_CAPACITY);
    crate::json_writer::write_data_set(&mut out, header)?;
    Ok(out)
}

/// Room for a typical CT or MR header's DICOM JSON, so writing it rarely reallocates.
const HEADER_JSON_CAPACITY: usize = 8192;

/// A header back from DICOM JSON (for de-identifying query results).
pub fn header_from_json(json: &Value) -> Result<InMemDicomObject, serde_json::Error> {
    dicom_json::from_value(json.clone())
}

/// The DICOM JSON key of a tag (`00100010`).
pub fn key(tag: Tag) -> String {
    format!("{:04X}{:04X}", tag.group(), tag.element())
}

/// The tag of a DICOM JSON key, if it is one.
pub fn tag_of_key(key: &str) -> Option<Tag> {
    if key.len() != 8 {
        return None;
    }
    let group = u16::from_str_radix(&key[..4], 16).ok()?;
    let element = u16::from_str_radix(&key[4..], 16).ok()?;
    Some(Tag(group, element))
}

/// The first value of an attribute as text: strings and numbers as written, person names in
/// their alphabetic form. `None` when absent or empty.
pub fn first_text(json: &Value, tag: Tag) -> Option<String> {
    all_text(json, tag).into_iter().next()
}

/// Every value of an attribute as text (see [`first_text`]).
pub fn all_text(json: &Value, tag: Tag) -> Vec<String> {
    json.get(key(tag))
        .and_then(|element| element.get("Value"))
        .and_then(Value::as_array)
        .map(|values| values.iter().filter_map(value_text).collect())
        .unwrap_or_default()
}

fn value_text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        Value::Object(name) => name
            .get("Alphabetic")
            .and_then(Value::as_str)
            .map(str::to_owned),
        _ => None,
    }
}

/// The attributes of `json` whose tags satisfy `keep`.
pub fn select(json: &Value, keep: impl Fn(Tag) -> bool) -> Map<String, Value> {
    json.as_object()
        .map(|object| {
            object
                .iter()
                .filter(|(key, _)| tag_of_key(key).is_some_and(&keep))
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// Sets an attribute with one or more values.
pub fn put(object: &mut Map<String, Value>, tag: Tag, vr: &str, values: Vec<Value>) {
    let mut element = serde_json::json!({ "vr": vr });
    if !values.is_empty() {
        element["Value"] = Value::Array(values);
    }
    object.insert(key(tag), element);
}

/// Points an attribute at its bulk data instead of carrying it.
pub fn put_bulk_data(object: &mut Map<String, Value>, tag: Tag, vr: &str, uri: &str) {
    object.insert(key(tag), serde_json::json!({"vr": vr, "BulkDataURI": uri}));
}

/// A C-FIND identifier from a query result: the keys the request named (empty when the result
/// has no value for one, as C-FIND requires) and the Query/Retrieve Level.
pub fn identifier(
    attributes: &Map<String, Value>,
    keys: &[Tag],
    level: &str,
) -> Option<InMemDicomObject> {
    let mut object = Map::new();
    for tag in keys {
        let element = attributes
            .get(&key(*tag))
            .cloned()
            .unwrap_or_else(|| serde_json::json!({ "vr": crate::qido::vr_of(*tag).to_string() }));
        object.insert(key(*tag), element);
    }
    object.insert(
        key(dicom_dictionary_std::tags::QUERY_RETRIEVE_LEVEL),
        serde_json::json!({"vr": "CS", "Value": [level]}),
    );
    dicom_json::from_value(Value::Object(object)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;

    #[test]
    fn headers_render_as_dicom_json() {
        let header = InMemDicomObject::from_element_iter([
            DataElement::new(tags::PATIENT_NAME, VR::PN, PrimitiveValue::from("Doe^Jane")),
            DataElement::new(tags::SERIES_NUMBER, VR::IS, PrimitiveValue::from("7")),
            DataElement::new(tags::MODALITY, VR::CS, PrimitiveValue::from("CT")),
        ]);
        let json = header_json(&header).unwrap();
        let stored: Value = serde_json::from_slice(&header_json_bytes(&header).unwrap()).unwrap();
        assert_eq!(stored, json);
        assert_eq!(json["00100010"]["vr"], "PN");
        assert_eq!(
            first_text(&json, tags::PATIENT_NAME).as_deref(),
            Some("Doe^Jane")
        );
        assert_eq!(first_text(&json, tags::SERIES_NUMBER).as_deref(), Some("7"));
        assert_eq!(first_text(&json, tags::MODALITY).as_deref(), Some("CT"));
        assert_eq!(tag_of_key("00100010"), Some(tags::PATIENT_NAME));
        assert_eq!(key(tags::PATIENT_NAME), "00100010");
        let only_name = select(&json, |tag| tag == tags::PATIENT_NAME);
        assert_eq!(only_name.len(), 1);
    }
}
