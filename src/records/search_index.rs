//! The stored form of the FHIR search index: how each extracted value becomes blind-index tokens,
//! date ranges and numbers, and how each searched value becomes the tokens it must meet. Both
//! directions live here so that writing and searching can never hash differently.

use glastonbury_fhir::extract::{IndexEntry, IndexValue};
use glastonbury_fhir::query::{Match, SystemMatch};

use crate::vault::BlindIndex;

/// The index rows of one record version.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IndexRows {
    pub tokens: Vec<TokenRow>,
    pub dates: Vec<DateRow>,
    pub numbers: Vec<NumberRow>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct TokenRow {
    pub param: String,
    pub token: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DateRow {
    pub param: String,
    pub low: i64,
    pub high: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NumberRow {
    pub param: String,
    pub value: f64,
    /// A unit token (`system|code`, code, or unit text); `None` on the row every quantity has.
    pub unit: Option<String>,
}

/// Field names that separate tokens by type, parameter and kind, so equal values in different
/// places cannot be linked.
fn field(resource_type: &str, code: &str, kind: &str) -> String {
    format!("{resource_type}.{code}#{kind}")
}

/// The pseudonym of a resource id in de-identified views: its `_id` token, so that the index
/// that finds records by id also finds them by pseudonym.
pub fn id_pseudonym(blind: &BlindIndex, resource_type: &str, id: &str) -> String {
    blind.verbatim(&field(resource_type, "_id", "code"), id)
}

/// The token a FHIR Patient's identifier value has (any system), so other surfaces (DICOM's
/// PatientID) can find the Patient they belong to.
pub fn patient_identifier_token(blind: &BlindIndex, value: &str) -> String {
    blind.verbatim(&field("Patient", "identifier", "code"), value)
}

/// The record type of DICOM instances, and the owner of their index rows.
pub const DICOM_INSTANCE: &str = "DicomInstance";

/// The owner type of a DICOM study's identifying-attribute tokens (owner id: the study key).
/// Patient and study attributes are the same on every instance of a study, so the index keeps
/// them once per study rather than once per instance.
pub const DICOM_STUDY: &str = "DicomStudy";

/// The index rows of one identifying DICOM attribute value: exact values as one token, person
/// names as word-prefix tokens (so `SMI*` finds `Smith^John`).
pub fn dicom_token_rows(
    blind: &BlindIndex,
    keyword: &str,
    kind: glastonbury_dicom::attributes::TokenKind,
    value: &str,
) -> Vec<TokenRow> {
    use glastonbury_dicom::attributes::{TokenKind, name_words};
    let tokens = match kind {
        TokenKind::Exact => vec![dicom_exact_token(blind, keyword, value)],
        TokenKind::Name => blind.word_prefix_tokens(
            &field(DICOM_INSTANCE, keyword, "prefix"),
            &name_words(value).join(" "),
        ),
    };
    tokens
        .into_iter()
        .map(|token| TokenRow {
            param: keyword.to_owned(),
            token,
        })
        .collect()
}

/// The token an exact match of an identifying DICOM attribute needs.
pub fn dicom_exact_token(blind: &BlindIndex, keyword: &str, value: &str) -> String {
    blind.verbatim(&field(DICOM_INSTANCE, keyword, "exact"), value)
}

/// The token a person-name word prefix (`SMI` of `SMI*`) needs.
pub fn dicom_prefix_token(blind: &BlindIndex, keyword: &str, prefix: &str) -> String {
    blind.prefix_query(&field(DICOM_INSTANCE, keyword, "prefix"), prefix)
}

/// Turns extracted values into rows; PHI-bearing values leave here only as tokens.
pub fn index_rows(blind: &BlindIndex, resource_type: &str, entries: &[IndexEntry]) -> IndexRows {
    let mut rows = IndexRows::default();
    for entry in entries {
        let code = entry.code.as_str();
        let mut add_token = |token: String| {
            rows.tokens.push(TokenRow {
                param: code.to_owned(),
                token,
            });
        };
        match &entry.value {
            IndexValue::Text(text) => {
                for token in blind.word_prefix_tokens(&field(resource_type, code, "prefix"), text) {
                    add_token(token);
                }
                for token in blind.substring_tokens(&field(resource_type, code, "contains"), text) {
                    add_token(token);
                }
                add_token(blind.verbatim(&field(resource_type, code, "exact"), text));
            }
            IndexValue::Token {
                system,
                code: value,
            } => {
                add_token(blind.verbatim(&field(resource_type, code, "code"), value));
                match system {
                    Some(system) => {
                        add_token(blind.verbatim(
                            &field(resource_type, code, "system-code"),
                            &format!("{system}|{value}"),
                        ));
                        add_token(blind.verbatim(&field(resource_type, code, "system"), system));
                    }
                    None => {
                        add_token(blind.verbatim(&field(resource_type, code, "no-system"), value))
                    }
                }
            }
            IndexValue::TokenText(text) => {
                for token in blind.word_tokens(&field(resource_type, code, "text"), text) {
                    add_token(token);
                }
            }
            IndexValue::Reference(reference) => {
                let reference_field = field(resource_type, code, "reference");
                add_token(blind.verbatim(&reference_field, reference));
                if let Some((_, id)) = reference.rsplit_once('/') {
                    add_token(blind.verbatim(&reference_field, id));
                }
            }
            IndexValue::Uri(uri) => {
                add_token(blind.verbatim(&field(resource_type, code, "uri"), uri))
            }
            IndexValue::Date(range) => rows.dates.push(DateRow {
                param: code.to_owned(),
                low: range.low,
                high: range.high,
            }),
            IndexValue::Number(value) => rows.numbers.push(NumberRow {
                param: code.to_owned(),
                value: *value,
                unit: None,
            }),
            IndexValue::Quantity {
                value,
                system,
                code: unit_code,
                unit,
            } => {
                let units =
                    quantity_unit_tokens(blind, resource_type, code, system, unit_code, unit);
                rows.numbers.push(NumberRow {
                    param: code.to_owned(),
                    value: *value,
                    unit: None,
                });
                rows.numbers
                    .extend(units.into_iter().map(|token| NumberRow {
                        param: code.to_owned(),
                        value: *value,
                        unit: Some(token),
                    }));
            }
        }
    }
    rows.tokens.sort();
    rows.tokens.dedup();
    rows
}

fn quantity_unit_tokens(
    blind: &BlindIndex,
    resource_type: &str,
    code: &str,
    system: &Option<String>,
    unit_code: &Option<String>,
    unit: &Option<String>,
) -> Vec<String> {
    let mut tokens = Vec::new();
    if let (Some(system), Some(unit_code)) = (system, unit_code) {
        tokens.push(blind.verbatim(
            &field(resource_type, code, "unit-system-code"),
            &format!("{system}|{unit_code}"),
        ));
    }
    for written in [unit_code, unit].into_iter().flatten() {
        let token = blind.verbatim(&field(resource_type, code, "unit-code"), written);
        if !tokens.contains(&token) {
            tokens.push(token);
        }
    }
    tokens
}

/// The tokens a searched string/token/reference/uri value needs (all of them, in the one
/// parameter); `None` for matches that are not token matches.
pub fn required_tokens(
    blind: &BlindIndex,
    resource_type: &str,
    code: &str,
    searched: &Match,
) -> Option<Vec<String>> {
    let tokens = match searched {
        Match::TextStartsWith(text) => {
            vec![blind.prefix_query(&field(resource_type, code, "prefix"), text)]
        }
        Match::TextExact(text) => vec![blind.verbatim(&field(resource_type, code, "exact"), text)],
        Match::TextContains(text) => {
            blind.substring_query(&field(resource_type, code, "contains"), text)
        }
        Match::Token {
            system,
            code: value,
        } => token_query(blind, resource_type, code, system, value.as_deref()),
        Match::TokenText(text) => blind.word_tokens(&field(resource_type, code, "text"), text),
        Match::Reference(reference) => {
            vec![blind.verbatim(&field(resource_type, code, "reference"), reference)]
        }
        Match::Uri(uri) => vec![blind.verbatim(&field(resource_type, code, "uri"), uri)],
        Match::Date(_) | Match::Number(_) | Match::Quantity { .. } => return None,
    };
    Some(tokens)
}

fn token_query(
    blind: &BlindIndex,
    resource_type: &str,
    code: &str,
    system: &SystemMatch,
    value: Option<&str>,
) -> Vec<String> {
    match (system, value) {
        (SystemMatch::Is(system), Some(value)) => vec![blind.verbatim(
            &field(resource_type, code, "system-code"),
            &format!("{system}|{value}"),
        )],
        (SystemMatch::Is(system), None) => {
            vec![blind.verbatim(&field(resource_type, code, "system"), system)]
        }
        (SystemMatch::Absent, Some(value)) => {
            vec![blind.verbatim(&field(resource_type, code, "no-system"), value)]
        }
        (_, value) => vec![blind.verbatim(
            &field(resource_type, code, "code"),
            value.unwrap_or_default(),
        )],
    }
}

/// The unit token a quantity search requires, if it names a unit.
pub fn required_unit(
    blind: &BlindIndex,
    resource_type: &str,
    code: &str,
    system: Option<&str>,
    unit_code: Option<&str>,
) -> Option<String> {
    match (system, unit_code) {
        (Some(system), Some(unit_code)) => Some(blind.verbatim(
            &field(resource_type, code, "unit-system-code"),
            &format!("{system}|{unit_code}"),
        )),
        (_, Some(unit_code)) => {
            Some(blind.verbatim(&field(resource_type, code, "unit-code"), unit_code))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vault::BlindIndexKey;
    use glastonbury_fhir::extract::extract_index;

    fn blind() -> BlindIndex {
        BlindIndex::new(BlindIndexKey([3u8; 32]))
    }

    #[test]
    fn stored_tokens_meet_the_searched_ones_and_hide_the_values() {
        let patient = serde_json::json!({"resourceType": "Patient", "name": [{"family": "Álvarez", "given": ["Maria"]}],
            "identifier": [{"system": "urn:mrn", "value": "MRN-991"}]});
        let rows = index_rows(&blind(), "Patient", &extract_index("Patient", &patient));
        let has = |code: &str, searched: Match| {
            let required =
                required_tokens(&blind(), "Patient", code, &searched).expect("token match");
            required.iter().all(|token| {
                rows.tokens
                    .iter()
                    .any(|row| row.param == code && &row.token == token)
            })
        };
        assert!(has("family", Match::TextStartsWith("alv".into())));
        assert!(has("name", Match::TextContains("VARE".into())));
        assert!(has("family", Match::TextExact("Álvarez".into())));
        assert!(!has("family", Match::TextExact("alvarez".into())));
        assert!(has(
            "identifier",
            Match::Token {
                system: SystemMatch::Is("urn:mrn".into()),
                code: Some("MRN-991".into())
            }
        ));
        assert!(has(
            "identifier",
            Match::Token {
                system: SystemMatch::Any,
                code: Some("MRN-991".into())
            }
        ));
        assert!(!has(
            "identifier",
            Match::Token {
                system: SystemMatch::Absent,
                code: Some("MRN-991".into())
            }
        ));
        assert!(!has("given", Match::TextStartsWith("alv".into())));
        for row in &rows.tokens {
            assert_eq!(row.token.len(), 32);
            assert!(
                row.token
                    .chars()
                    .all(|character| character.is_ascii_hexdigit())
            );
        }
    }
}
