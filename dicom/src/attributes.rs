//! The attributes of an instance the gateway indexes: what QIDO-RS and C-FIND match on. Values
//! that identify a patient (names, ids, birth date, accession number, referring physician) leave
//! here in the clear only so the binary crate can turn them into blind-index tokens; the rest
//! (dates, modality, SOP class, numbers) may be stored as they are.

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use crate::instance::text_of;

/// Attributes matched through blind-index tokens (never stored in the clear), and whether a
/// name's words are indexed for prefix (wildcard) matching.
pub const TOKEN_ATTRIBUTES: &[(Tag, TokenKind)] = &[
    (tags::PATIENT_NAME, TokenKind::Name),
    (tags::PATIENT_ID, TokenKind::Exact),
    (tags::PATIENT_BIRTH_DATE, TokenKind::Exact),
    (tags::ACCESSION_NUMBER, TokenKind::Exact),
    (tags::REFERRING_PHYSICIAN_NAME, TokenKind::Name),
    (tags::STUDY_ID, TokenKind::Exact),
    (tags::ISSUER_OF_PATIENT_ID, TokenKind::Exact),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// The whole value, exactly.
    Exact,
    /// A person name: each component word, for exact and prefix matching.
    Name,
}

/// What one instance contributes to the index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexedAttributes {
    /// `(tag, value)` of the token attributes present.
    pub tokens: Vec<(Tag, String)>,
    pub modality: Option<String>,
    /// Study Date as `YYYYMMDD` digits, when valid.
    pub study_date: Option<i64>,
    pub series_number: Option<i64>,
    pub instance_number: Option<i64>,
    pub patient_id: Option<String>,
    pub issuer_of_patient_id: Option<String>,
}

/// The indexed attributes of a header.
pub fn indexed_attributes(header: &InMemDicomObject) -> IndexedAttributes {
    let number = |tag: Tag| {
        text_of(header, tag)
            .and_then(|text| text.trim().parse::<f64>().ok())
            .map(|value| value as i64)
    };
    IndexedAttributes {
        tokens: TOKEN_ATTRIBUTES
            .iter()
            .filter_map(|(tag, _)| text_of(header, *tag).map(|value| (*tag, value)))
            .collect(),
        modality: text_of(header, tags::MODALITY),
        study_date: text_of(header, tags::STUDY_DATE).and_then(|date| date_number(&date)),
        series_number: number(tags::SERIES_NUMBER),
        instance_number: number(tags::INSTANCE_NUMBER),
        patient_id: text_of(header, tags::PATIENT_ID),
        issuer_of_patient_id: text_of(header, tags::ISSUER_OF_PATIENT_ID),
    }
}

/// `YYYYMMDD` (also `YYYY.MM.DD`, an old form) as a number, when it is a plausible date.
pub fn date_number(text: &str) -> Option<i64> {
    let digits: String = text.chars().filter(char::is_ascii_digit).collect();
    if digits.len() != 8 {
        return None;
    }
    let value: i64 = digits.parse().ok()?;
    let month = (value / 100) % 100;
    let day = value % 100;
    ((1..=12).contains(&month) && (1..=31).contains(&day)).then_some(value)
}

/// The words of a person name (`Doe^Jane^^Dr` → `doe`, `jane`, `dr`), upper-cased: what name
/// tokens are made of.
pub fn name_words(name: &str) -> Vec<String> {
    name.split(['^', ' ', '=', ','])
        .map(str::trim)
        .filter(|word| !word.is_empty())
        .map(str::to_uppercase)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::{DataElement, PrimitiveValue, VR};

    #[test]
    fn extracts_tokens_and_clear_values() {
        let header = InMemDicomObject::from_element_iter([
            DataElement::new(tags::PATIENT_NAME, VR::PN, PrimitiveValue::from("Doe^Jane")),
            DataElement::new(tags::PATIENT_ID, VR::LO, PrimitiveValue::from("MRN-7 ")),
            DataElement::new(tags::MODALITY, VR::CS, PrimitiveValue::from("MR")),
            DataElement::new(tags::STUDY_DATE, VR::DA, PrimitiveValue::from("20240131")),
            DataElement::new(tags::SERIES_NUMBER, VR::IS, PrimitiveValue::from("3")),
        ]);
        let attributes = indexed_attributes(&header);
        assert!(
            attributes
                .tokens
                .contains(&(tags::PATIENT_ID, "MRN-7".to_owned()))
        );
        assert_eq!(attributes.modality.as_deref(), Some("MR"));
        assert_eq!(attributes.study_date, Some(20240131));
        assert_eq!(attributes.series_number, Some(3));
        assert_eq!(name_words("Doe^Jane^^Dr."), ["DOE", "JANE", "DR."]);
        assert_eq!(date_number("2024.01.31"), Some(20240131));
        assert_eq!(date_number("20241301"), None);
    }
}
