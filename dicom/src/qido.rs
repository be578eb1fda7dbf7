//! QIDO-RS queries (PS3.18 10.6): the query string parsed into attribute matches (single value,
//! wildcard `*`/`?`, UID lists, date and time ranges, universal), `includefield`, `limit` and
//! `offset`, and the matching rules themselves, applied to header values.

use dicom_core::dictionary::DataDictionary;
use dicom_core::{Tag, VR};
use dicom_dictionary_std::{StandardDataDictionary, tags};

/// Results per page when the client names no `limit`, and the most it may ask for.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;

/// The level a query returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Study,
    Series,
    Instance,
}

/// A query the server cannot run (400, the message names the parameter, never a value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct QidoError(pub String);

/// A parsed query.
#[derive(Debug, Clone, PartialEq)]
pub struct QidoQuery {
    pub level: Level,
    /// All must hold.
    pub criteria: Vec<Criterion>,
    /// Attributes asked for with an empty value (universal matching): returned, not matched.
    pub requested: Vec<Tag>,
    pub include: Include,
    pub limit: usize,
    pub offset: usize,
    /// Things the server did not apply (answered in a `Warning` header).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Include {
    Default,
    All,
    Tags(Vec<Tag>),
}

/// One attribute condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Criterion {
    pub tag: Tag,
    pub matcher: Matcher,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Matcher {
    /// Single value matching.
    Exact(String),
    /// `*` (any run) and `?` (any one character).
    Wildcard(String),
    /// Any of these UIDs.
    UidList(Vec<String>),
    /// An inclusive range of dates, times or date-times (either end open).
    Range {
        low: Option<String>,
        high: Option<String>,
    },
}

/// Attributes returned at each level when no `includefield` asks for others (PS3.18 Tables
/// 10.6.3-3 to 10.6.3-5).
pub const STUDY_ATTRIBUTES: &[Tag] = &[
    tags::SPECIFIC_CHARACTER_SET,
    tags::STUDY_DATE,
    tags::STUDY_TIME,
    tags::ACCESSION_NUMBER,
    tags::INSTANCE_AVAILABILITY,
    tags::MODALITIES_IN_STUDY,
    tags::REFERRING_PHYSICIAN_NAME,
    tags::TIMEZONE_OFFSET_FROM_UTC,
    tags::RETRIEVE_URL,
    tags::PATIENT_NAME,
    tags::PATIENT_ID,
    tags::PATIENT_BIRTH_DATE,
    tags::PATIENT_SEX,
    tags::STUDY_INSTANCE_UID,
    tags::STUDY_ID,
    tags::STUDY_DESCRIPTION,
    tags::NUMBER_OF_STUDY_RELATED_SERIES,
    tags::NUMBER_OF_STUDY_RELATED_INSTANCES,
];

pub const SERIES_ATTRIBUTES: &[Tag] = &[
    tags::SPECIFIC_CHARACTER_SET,
    tags::MODALITY,
    tags::TIMEZONE_OFFSET_FROM_UTC,
    tags::SERIES_DESCRIPTION,
    tags::RETRIEVE_URL,
    tags::SERIES_INSTANCE_UID,
    tags::SERIES_NUMBER,
    tags::NUMBER_OF_SERIES_RELATED_INSTANCES,
    tags::PERFORMED_PROCEDURE_STEP_START_DATE,
    tags::PERFORMED_PROCEDURE_STEP_START_TIME,
    tags::REQUEST_ATTRIBUTES_SEQUENCE,
];

pub const INSTANCE_ATTRIBUTES: &[Tag] = &[
    tags::SPECIFIC_CHARACTER_SET,
    tags::SOP_CLASS_UID,
    tags::SOP_INSTANCE_UID,
    tags::INSTANCE_AVAILABILITY,
    tags::TIMEZONE_OFFSET_FROM_UTC,
    tags::RETRIEVE_URL,
    tags::INSTANCE_NUMBER,
    tags::ROWS,
    tags::COLUMNS,
    tags::BITS_ALLOCATED,
    tags::NUMBER_OF_FRAMES,
];

impl Level {
    /// The attributes a result of this level carries by default.
    pub fn default_attributes(self) -> &'static [Tag] {
        match self {
            Self::Study => STUDY_ATTRIBUTES,
            Self::Series => SERIES_ATTRIBUTES,
            Self::Instance => INSTANCE_ATTRIBUTES,
        }
    }
}

/// Parses a QIDO-RS query string's pairs for `level`.
pub fn parse_query(level: Level, pairs: &[(String, String)]) -> Result<QidoQuery, QidoError> {
    let mut query = QidoQuery {
        level,
        criteria: Vec::new(),
        requested: Vec::new(),
        include: Include::Default,
        limit: DEFAULT_LIMIT,
        offset: 0,
        warnings: Vec::new(),
    };
    for (name, value) in pairs {
        match name.as_str() {
            "limit" => query.limit = number(name, value)?.min(MAX_LIMIT),
            "offset" => query.offset = number(name, value)?,
            "includefield" => add_include_fields(&mut query.include, value)?,
            "fuzzymatching" => {
                if value == "true" {
                    query
                        .warnings
                        .push("fuzzymatching is not supported; exact matching was used".to_owned());
                }
            }
            // Content negotiation and tooling parameters that are not attribute matches.
            "accept" | "charset" | "_" => {}
            attribute => {
                let tag = attribute_tag(attribute)
                    .ok_or_else(|| QidoError(format!("unknown query attribute {attribute:?}")))?;
                if value.is_empty() {
                    query.requested.push(tag);
                    continue;
                }
                let matcher = matcher_for(tag, value)?;
                query.criteria.push(Criterion { tag, matcher });
            }
        }
    }
    Ok(query)
}

fn number(name: &str, value: &str) -> Result<usize, QidoError> {
    value
        .parse()
        .map_err(|_| QidoError(format!("{name} must be a non-negative integer")))
}

fn add_include_fields(include: &mut Include, value: &str) -> Result<(), QidoError> {
    for field in value
        .split(',')
        .map(str::trim)
        .filter(|field| !field.is_empty())
    {
        if field == "all" {
            *include = Include::All;
            continue;
        }
        let tag = attribute_tag(field).ok_or_else(|| {
            QidoError(format!("includefield names an unknown attribute {field:?}"))
        })?;
        match include {
            Include::All => {}
            Include::Default => *include = Include::Tags(vec![tag]),
            Include::Tags(tags) => tags.push(tag),
        }
    }
    Ok(())
}

/// A keyword (`PatientName`) or a tag in hex (`00100010`).
pub fn attribute_tag(name: &str) -> Option<Tag> {
    if name.len() == 8
        && let (Ok(group), Ok(element)) = (
            u16::from_str_radix(&name[..4], 16),
            u16::from_str_radix(&name[4..], 16),
        )
    {
        return Some(Tag(group, element));
    }
    StandardDataDictionary
        .by_name(name)
        .map(|entry| entry.tag.inner())
}

/// The dictionary VR of a tag (UN when unknown).
pub fn vr_of(tag: Tag) -> VR {
    StandardDataDictionary
        .by_tag(tag)
        .map(|entry| entry.vr.relaxed())
        .unwrap_or(VR::UN)
}

fn matcher_for(tag: Tag, value: &str) -> Result<Matcher, QidoError> {
    let vr = vr_of(tag);
    if vr == VR::UI {
        let uids: Vec<String> = value
            .split([',', '\\'])
            .map(str::trim)
            .filter(|uid| !uid.is_empty())
            .map(str::to_owned)
            .collect();
        if uids.len() == 1 {
            return Ok(Matcher::Exact(uids[0].clone()));
        }
        return Ok(Matcher::UidList(uids));
    }
    if matches!(vr, VR::DA | VR::TM | VR::DT) {
        if let Some((low, high)) = value.split_once('-') {
            let low = (!low.trim().is_empty()).then(|| low.trim().to_owned());
            let high = (!high.trim().is_empty()).then(|| high.trim().to_owned());
            if low.is_none() && high.is_none() {
                return Err(QidoError(format!("{} has an empty range", keyword(tag))));
            }
            return Ok(Matcher::Range { low, high });
        }
        return Ok(Matcher::Exact(value.trim().to_owned()));
    }
    if value.contains(['*', '?']) {
        return Ok(Matcher::Wildcard(value.to_owned()));
    }
    Ok(Matcher::Exact(value.to_owned()))
}

fn keyword(tag: Tag) -> String {
    StandardDataDictionary
        .by_tag(tag)
        .map(|entry| entry.alias.to_owned())
        .unwrap_or_else(|| format!("({:04X},{:04X})", tag.group(), tag.element()))
}

impl Criterion {
    /// Whether any of an attribute's values (as text; person names in alphabetic form)
    /// satisfies this condition.
    pub fn matches(&self, values: &[String]) -> bool {
        let case_insensitive = vr_of(self.tag) == VR::PN;
        values
            .iter()
            .any(|value| self.matches_one(value.trim(), case_insensitive))
    }

    fn matches_one(&self, value: &str, case_insensitive: bool) -> bool {
        let fold = |text: &str| {
            if case_insensitive {
                text.to_uppercase()
            } else {
                text.to_owned()
            }
        };
        match &self.matcher {
            Matcher::Exact(expected) => {
                if matches!(vr_of(self.tag), VR::DA | VR::TM | VR::DT) {
                    return normalize_temporal(value).starts_with(&normalize_temporal(expected));
                }
                fold(value) == fold(expected)
            }
            Matcher::Wildcard(pattern) => glob(&fold(pattern), &fold(value)),
            Matcher::UidList(uids) => uids.iter().any(|uid| uid == value),
            Matcher::Range { low, high } => {
                let value = normalize_temporal(value);
                if value.is_empty() {
                    return false;
                }
                let above = low
                    .as_ref()
                    .is_none_or(|low| value.as_str() >= normalize_temporal(low).as_str());
                let below = high.as_ref().is_none_or(|high| {
                    let high = normalize_temporal(high);
                    value.as_str() <= high.as_str() || value.starts_with(&high)
                });
                above && below
            }
        }
    }
}

/// Dates, times and date-times as comparable digit strings (`2024-01-02` → `20240102`,
/// `10:20:30.5` → `102030.5`).
fn normalize_temporal(text: &str) -> String {
    text.trim()
        .chars()
        .filter(|character| character.is_ascii_digit() || *character == '.')
        .collect()
}

/// `*` matches any run of characters, `?` exactly one.
pub fn glob(pattern: &str, text: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let text: Vec<char> = text.chars().collect();
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == '?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == '*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((star_p, star_t)) = star {
            p = star_p + 1;
            t = star_t + 1;
            star = Some((star_p, star_t + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|character| *character == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(query: &[(&str, &str)]) -> Vec<(String, String)> {
        query
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect()
    }

    #[test]
    fn parses_matches_of_every_kind() {
        let query = parse_query(
            Level::Study,
            &pairs(&[
                ("PatientName", "SMI*"),
                ("00100020", "MRN-1"),
                ("StudyDate", "20200101-20201231"),
                ("StudyInstanceUID", "1.2.3,1.2.4"),
                ("AccessionNumber", ""),
                ("limit", "10"),
                ("offset", "5"),
                ("includefield", "StudyDescription,00081030"),
            ]),
        )
        .unwrap();
        assert_eq!(query.criteria.len(), 4);
        assert_eq!(query.criteria[0].matcher, Matcher::Wildcard("SMI*".into()));
        assert_eq!(query.criteria[1].tag, tags::PATIENT_ID);
        assert_eq!(
            query.criteria[2].matcher,
            Matcher::Range {
                low: Some("20200101".into()),
                high: Some("20201231".into())
            }
        );
        assert_eq!(
            query.criteria[3].matcher,
            Matcher::UidList(vec!["1.2.3".into(), "1.2.4".into()])
        );
        assert_eq!(query.requested, vec![tags::ACCESSION_NUMBER]);
        assert_eq!((query.limit, query.offset), (10, 5));
        assert!(matches!(query.include, Include::Tags(ref tags) if tags.len() == 2));
        assert!(parse_query(Level::Study, &pairs(&[("NoSuchKeyword", "x")])).is_err());
        assert!(parse_query(Level::Study, &pairs(&[("limit", "-1")])).is_err());
    }

    #[test]
    fn matching_follows_the_standard() {
        let name = Criterion {
            tag: tags::PATIENT_NAME,
            matcher: Matcher::Wildcard("smi*".into()),
        };
        assert!(name.matches(&["Smith^John".into()]));
        assert!(!name.matches(&["Jones^Smith".into()]));
        let question = Criterion {
            tag: tags::PATIENT_ID,
            matcher: Matcher::Wildcard("MRN-?2".into()),
        };
        assert!(question.matches(&["MRN-12".into()]));
        assert!(!question.matches(&["MRN-123".into()]));
        let range = Criterion {
            tag: tags::STUDY_DATE,
            matcher: Matcher::Range {
                low: Some("20200101".into()),
                high: None,
            },
        };
        assert!(range.matches(&["20210505".into()]));
        assert!(!range.matches(&["20191231".into()]));
        let time = Criterion {
            tag: tags::STUDY_TIME,
            matcher: Matcher::Range {
                low: Some("0900".into()),
                high: Some("1700".into()),
            },
        };
        assert!(time.matches(&["101500.123".into()]));
        assert!(time.matches(&["170059".into()]));
        assert!(!time.matches(&["180000".into()]));
        let exact_id = Criterion {
            tag: tags::PATIENT_ID,
            matcher: Matcher::Exact("abc".into()),
        };
        assert!(!exact_id.matches(&["ABC".into()]), "only names ignore case");
    }

    #[test]
    fn glob_handles_runs_and_single_characters() {
        assert!(glob("*", ""));
        assert!(glob("A*C", "ABBBC"));
        assert!(glob("A?C", "ABC"));
        assert!(!glob("A?C", "AC"));
        assert!(glob("*B*", "ABC"));
        assert!(!glob("*D*", "ABC"));
    }
}
