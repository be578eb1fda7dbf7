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

/// DICOM JSON of only the attributes `tags` of a header (those it has), in the form
/// [`header_json_bytes`] writes: for reads that need those few attributes of many instances,
/// kept beside the whole header so they need not open it.
pub fn selected_json_bytes(
    header: &InMemDicomObject,
    tags: &[Tag],
) -> Result<Vec<u8>, crate::json_writer::JsonWriteError> {
    let selected = InMemDicomObject::from_element_iter(
        tags.iter().filter_map(|tag| header.get(*tag).cloned()),
    );
    let mut out = Vec::new();
    crate::json_writer::write_data_set(&mut out, &selected)?;
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

/// One DICOM JSON value as text: a string, a number, or a person name's alphabetic group.
pub fn value_text(value: &Value) -> Option<String> {
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

/// The first value, as text (see [`first_text`]), of each of `tags` in a header's DICOM JSON
/// bytes, read without building a tree of the other attributes: serde skips them. For reads
/// that need a few attributes of many headers (a study's ImagingStudy, a retrieval's UIDs).
pub fn first_texts_of<const N: usize>(
    object: &[u8],
    tags: [Tag; N],
) -> Result<[Option<String>; N], serde_json::Error> {
    let keys = tags.map(|tag| {
        let mut key = [0_u8; 8];
        key.copy_from_slice(self::key(tag).as_bytes());
        key
    });
    let mut deserializer = serde_json::Deserializer::from_slice(object);
    let found = serde::de::DeserializeSeed::deserialize(FirstTexts { keys }, &mut deserializer)?;
    deserializer.end()?;
    Ok(found)
}

/// The visitor of [`first_texts_of`]: the keys it looks for, as their 8 ASCII hex digits.
struct FirstTexts<const N: usize> {
    keys: [[u8; 8]; N],
}

impl<'de, const N: usize> serde::de::DeserializeSeed<'de> for FirstTexts<N> {
    type Value = [Option<String>; N];

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de, const N: usize> serde::de::Visitor<'de> for FirstTexts<N> {
    type Value = [Option<String>; N];

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("a DICOM JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found: [Option<String>; N] = std::array::from_fn(|_| None);
        while let Some(AttributeKey(key)) = map.next_key()? {
            match self.keys.iter().position(|wanted| Some(*wanted) == key) {
                Some(index) => {
                    let element: ElementValues = map.next_value()?;
                    found[index] = element.values.iter().find_map(value_text);
                }
                None => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(found)
    }
}

/// An attribute's key as its 8 bytes, without allocating; `None` for a key of another length.
struct AttributeKey(Option<[u8; 8]>);

impl<'de> serde::Deserialize<'de> for AttributeKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(AttributeKeyVisitor)
    }
}

/// Reads an attribute key into [`AttributeKey`].
struct AttributeKeyVisitor;

impl serde::de::Visitor<'_> for AttributeKeyVisitor {
    type Value = AttributeKey;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("a DICOM JSON attribute key")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(AttributeKey(key.as_bytes().try_into().ok()))
    }
}

/// The values of one attribute (its `vr` and anything else are skipped).
#[derive(serde::Deserialize)]
struct ElementValues {
    #[serde(rename = "Value", default)]
    values: Vec<Value>,
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

/// Appends `object` (one header's DICOM JSON, compact, as the index stores it) to `out` with
/// the attribute `tag` added as a bulk data reference to `uri`, as [`put_bulk_data`] would add it
/// (last), but without parsing the object into a tree: a large study's metadata is then a copy
/// of stored bytes. An object that already holds `tag`, or that is not a compact object, is
/// parsed and written again instead. `object` must be a JSON object: the bytes are copied, not
/// checked (the index's own bytes, written by [`crate::json_writer`], are one).
pub fn write_with_bulk_data(
    out: &mut Vec<u8>,
    object: &[u8],
    tag: Tag,
    vr: &str,
    uri: &str,
) -> Result<(), serde_json::Error> {
    let quoted_key = format!("\"{}\":", key(tag));
    let reference = serde_json::json!({"vr": vr, "BulkDataURI": uri});
    let Some(members) =
        compact_object_members(object).filter(|members| !contains(members, quoted_key.as_bytes()))
    else {
        let mut parsed: Map<String, Value> = serde_json::from_slice(object)?;
        put_bulk_data(&mut parsed, tag, vr, uri);
        return serde_json::to_writer(out, &parsed);
    };
    out.push(b'{');
    out.extend_from_slice(members);
    if !members.is_empty() {
        out.push(b',');
    }
    out.extend_from_slice(quoted_key.as_bytes());
    serde_json::to_writer(&mut *out, &reference)?;
    out.push(b'}');
    Ok(())
}

/// The bytes between the braces of a JSON object written without surrounding whitespace
/// (empty for an object with no members, whitespace inside its braces included).
fn compact_object_members(object: &[u8]) -> Option<&[u8]> {
    let members = object.strip_prefix(b"{")?.strip_suffix(b"}")?;
    if members.iter().all(u8::is_ascii_whitespace) {
        return Some(&[]);
    }
    Some(members)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
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

    /// The metadata writer's output, parsed, against the header parsed with `put_bulk_data`.
    fn spliced_and_parsed(stored: &[u8]) -> (Value, Value) {
        let uri = "http://host/dicomweb/studies/1.2/series/1.3/instances/1.4";
        let mut out = Vec::new();
        write_with_bulk_data(&mut out, stored, tags::PIXEL_DATA, "OB", uri).unwrap();
        let spliced: Value = serde_json::from_slice(&out).unwrap();
        let mut expected: Map<String, Value> = serde_json::from_slice(stored).unwrap();
        put_bulk_data(&mut expected, tags::PIXEL_DATA, "OB", uri);
        (spliced, Value::Object(expected))
    }

    #[test]
    fn metadata_adds_the_pixel_data_reference_to_stored_header_bytes() {
        let header = InMemDicomObject::from_element_iter([
            DataElement::new(tags::PATIENT_NAME, VR::PN, PrimitiveValue::from("Doe^Jane")),
            DataElement::new(tags::MODALITY, VR::CS, PrimitiveValue::from("CT")),
        ]);
        let stored = header_json_bytes(&header).unwrap();
        let (spliced, expected) = spliced_and_parsed(&stored);
        assert_eq!(spliced, expected);
        assert_eq!(
            spliced["7FE00010"]["BulkDataURI"],
            "http://host/dicomweb/studies/1.2/series/1.3/instances/1.4"
        );
        assert_eq!(spliced["00080060"]["Value"][0], "CT");
        assert_eq!(
            spliced.as_object().unwrap().keys().next_back().unwrap(),
            "7FE00010"
        );
    }

    #[test]
    fn metadata_of_an_empty_or_already_referenced_header_is_still_one_object() {
        let (spliced, expected) = spliced_and_parsed(b"{}");
        assert_eq!(spliced, expected);
        assert_eq!(spliced.as_object().unwrap().len(), 1);
        let already = br#"{"00080060":{"vr":"CS","Value":["MR"]},"7FE00010":{"vr":"OW","InlineBinary":"AAAA"}}"#;
        let (spliced, expected) = spliced_and_parsed(already);
        assert_eq!(spliced, expected);
        assert_eq!(spliced["7FE00010"]["vr"], "OB");
        assert!(spliced["7FE00010"].get("InlineBinary").is_none());
        let (spliced, expected) = spliced_and_parsed(b"{ }");
        assert_eq!(spliced, expected);
        let spaced = b" { \"00080060\" : {\"vr\":\"CS\"} } ";
        let (spliced, expected) = spliced_and_parsed(spaced);
        assert_eq!(spliced, expected);
    }

    #[test]
    fn metadata_of_a_header_that_is_not_json_is_an_error() {
        let mut out = Vec::new();
        assert!(write_with_bulk_data(&mut out, b"{\"0008", tags::PIXEL_DATA, "OB", "u").is_err());
    }

    #[test]
    fn first_texts_read_from_bytes_are_those_of_the_parsed_header() {
        let stored = br#"{"00080018":{"vr":"UI","Value":["1.2.3.4"]},"00080060":{"vr":"CS","Value":["CT"]},"00100010":{"vr":"PN","Value":[{"Ideographic":"X"},{"Alphabetic":"Doe^Jane"}]},"00200011":{"vr":"IS","Value":[7]},"00280301":{"vr":"CS"},"7FE00010":{"vr":"OB","BulkDataURI":"u"}}"#;
        let wanted = [
            tags::SOP_INSTANCE_UID,
            tags::PATIENT_NAME,
            tags::SERIES_NUMBER,
            tags::BURNED_IN_ANNOTATION,
            tags::STUDY_INSTANCE_UID,
        ];
        let parsed: Value = serde_json::from_slice(stored).unwrap();
        let read = first_texts_of(stored, wanted).unwrap();
        assert_eq!(read, wanted.map(|tag| first_text(&parsed, tag)));
        assert_eq!(read[0].as_deref(), Some("1.2.3.4"));
        assert_eq!(read[1].as_deref(), Some("Doe^Jane"));
        assert_eq!(read[2].as_deref(), Some("7"));
        assert_eq!(read[3], None);
        assert_eq!(read[4], None);
    }

    #[test]
    fn first_texts_of_damaged_bytes_are_an_error() {
        assert!(first_texts_of(b"{\"00080018\":", [tags::SOP_INSTANCE_UID]).is_err());
        assert!(first_texts_of(b"[]", [tags::SOP_INSTANCE_UID]).is_err());
        assert!(first_texts_of(b"{} {}", [tags::SOP_INSTANCE_UID]).is_err());
    }
}
