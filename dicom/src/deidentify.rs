//! PS3.15 Annex E de-identification: the Basic Application Level Confidentiality Profile and its
//! options, applied attribute by attribute (at every nesting level) from Table E.1-1 held as
//! data (`data/confidentiality-profile.json`, generated from the standard by
//! `scripts/generate-deidentification-profile.py`). UIDs are remapped consistently under a key
//! (a keyed hash into a `2.25` UID), so series and studies stay linked; dates can be shifted by a
//! consistent per-patient offset; private attributes go unless a safe-private list keeps them;
//! images flagged with burned-in annotation are refused, never passed as de-identified.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use dicom_core::value::{DataSetSequence, Value};
use dicom_core::{DataElement, Length, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileDicomObject, InMemDicomObject};
use hmac::{Hmac, Mac};
use sha2::Sha256;

const TABLE: &str = include_str!("../data/confidentiality-profile.json");

/// The Basic Profile's options (PS3.15 E.3).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    pub retain_safe_private: bool,
    pub retain_uids: bool,
    pub retain_device_identity: bool,
    pub retain_institution_identity: bool,
    pub retain_patient_characteristics: bool,
    pub retain_longitudinal_full_dates: bool,
    pub retain_longitudinal_modified_dates: bool,
    pub clean_descriptors: bool,
    pub clean_structured_content: bool,
    pub clean_graphics: bool,
}

impl Options {
    /// The option columns in the order they are consulted (the first selected one with a cell
    /// for an attribute decides), with their Table CID 7050 codes.
    fn selected(&self) -> Vec<(&'static str, &'static str, &'static str)> {
        [
            (
                self.retain_safe_private,
                "retain_safe_private",
                "113111",
                "Retain Safe Private Option",
            ),
            (
                self.retain_uids,
                "retain_uids",
                "113110",
                "Retain UIDs Option",
            ),
            (
                self.retain_device_identity,
                "retain_device_identity",
                "113109",
                "Retain Device Identity Option",
            ),
            (
                self.retain_institution_identity,
                "retain_institution_identity",
                "113112",
                "Retain Institution Identity Option",
            ),
            (
                self.retain_patient_characteristics,
                "retain_patient_characteristics",
                "113108",
                "Retain Patient Characteristics Option",
            ),
            (
                self.retain_longitudinal_full_dates,
                "retain_longitudinal_full_dates",
                "113106",
                "Retain Longitudinal Temporal Information Full Dates Option",
            ),
            (
                self.retain_longitudinal_modified_dates,
                "retain_longitudinal_modified_dates",
                "113107",
                "Retain Longitudinal Temporal Information Modified Dates Option",
            ),
            (
                self.clean_descriptors,
                "clean_descriptors",
                "113105",
                "Clean Descriptors Option",
            ),
            (
                self.clean_structured_content,
                "clean_structured_content",
                "113104",
                "Clean Structured Content Option",
            ),
            (
                self.clean_graphics,
                "clean_graphics",
                "113103",
                "Clean Graphics Option",
            ),
        ]
        .into_iter()
        .filter(|(selected, ..)| *selected)
        .map(|(_, column, code, meaning)| (column, code, meaning))
        .collect()
    }
}

/// What to do with images whose pixels carry burned-in text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BurnedInAnnotation {
    /// Refuse them (the default).
    #[default]
    Reject,
    /// Hand them back to the caller to quarantine, flagged.
    Quarantine,
}

/// A named de-identification profile: the Basic Profile, its options, and private attributes
/// known to be safe (by private creator and element, e.g. `"SIEMENS CSA HEADER", 0x10`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Profile {
    pub options: Options,
    pub burned_in_annotation: BurnedInAnnotation,
    pub safe_private: Vec<SafePrivate>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SafePrivate {
    pub creator: String,
    /// The element's low byte (`0x10` for `(gggg,xx10)`).
    pub element: u8,
}

/// The key UIDs are remapped and dates shifted under; the same key gives the same mapping.
#[derive(Clone)]
pub struct DeidentificationKey([u8; 32]);

impl std::fmt::Debug for DeidentificationKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("DeidentificationKey(…)")
    }
}

impl DeidentificationKey {
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    fn mac(&self, domain: &str, value: &str) -> [u8; 32] {
        let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(&self.0) {
            Ok(mac) => mac,
            Err(_) => return [0; 32],
        };
        mac.update(domain.as_bytes());
        mac.update(&[0]);
        mac.update(value.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// A consistent replacement UID: `2.25.` and 128 bits of a keyed hash of the original.
    pub fn uid(&self, original: &str) -> String {
        let digest = self.mac("uid", original.trim_end_matches(['\0', ' ']));
        let mut number = [0u8; 16];
        number.copy_from_slice(&digest[..16]);
        format!("2.25.{}", u128::from_be_bytes(number))
    }

    /// A consistent per-patient date shift, between 1 and 3650 days into the past.
    pub fn date_shift_days(&self, patient_id: &str) -> i64 {
        let digest = self.mac("date-shift", patient_id);
        let value = u16::from_be_bytes([digest[0], digest[1]]);
        -(1 + i64::from(value) % 3650)
    }
}

/// Why an instance was not de-identified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeidentificationError {
    #[error("the file is not a readable DICOM Part 10 file")]
    Unreadable,
    #[error(
        "the image has burned-in annotation; it cannot be de-identified without cleaning its pixels"
    )]
    BurnedInAnnotation,
    #[error("the de-identified file could not be written")]
    Unwritable,
}

/// A de-identified instance.
#[derive(Debug, Clone)]
pub struct Deidentified {
    pub part10: Vec<u8>,
    pub sop_instance_uid: String,
    /// Set when the profile quarantines burned-in annotation instead of refusing it.
    pub quarantined: bool,
}

/// One row of Table E.1-1.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct TableRow {
    pub tag: String,
    pub keyword: String,
    pub name: String,
    pub action: String,
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, serde::Deserialize)]
struct TableDocument {
    rows: Vec<TableRow>,
}

/// Table E.1-1 as loaded: exact tags, and the masked rows (`50xxxxxx`, `60xx3000`).
#[derive(Debug)]
pub struct Table {
    exact: BTreeMap<Tag, TableRow>,
    masked: Vec<(u32, u32, TableRow)>,
}

impl Table {
    /// The table that ships with the crate.
    pub fn standard() -> &'static Self {
        static TABLE_CELL: OnceLock<Table> = OnceLock::new();
        TABLE_CELL.get_or_init(|| {
            let document: TableDocument =
                serde_json::from_str(TABLE).unwrap_or(TableDocument { rows: Vec::new() });
            let mut exact = BTreeMap::new();
            let mut masked = Vec::new();
            for row in document.rows {
                let (value, mask) = parse_masked_tag(&row.tag);
                if mask == u32::MAX {
                    exact.insert(Tag((value >> 16) as u16, value as u16), row);
                } else {
                    masked.push((value, mask, row));
                }
            }
            Table { exact, masked }
        })
    }

    /// Every row, for checks and reports.
    pub fn rows(&self) -> impl Iterator<Item = &TableRow> {
        self.exact
            .values()
            .chain(self.masked.iter().map(|(_, _, row)| row))
    }

    fn row(&self, tag: Tag) -> Option<&TableRow> {
        if let Some(row) = self.exact.get(&tag) {
            return Some(row);
        }
        let value = (u32::from(tag.group()) << 16) | u32::from(tag.element());
        self.masked
            .iter()
            .find(|(pattern, mask, _)| value & mask == *pattern)
            .map(|(_, _, row)| row)
    }
}

/// `0010,0010` from `00100010`; `x` nibbles become mask zeros.
fn parse_masked_tag(text: &str) -> (u32, u32) {
    let mut value = 0u32;
    let mut mask = 0u32;
    for character in text.chars() {
        value <<= 4;
        mask <<= 4;
        if let Some(digit) = character.to_digit(16) {
            value |= digit;
            mask |= 0xF;
        }
    }
    (value, mask)
}

/// The action Table E.1-1 (and the selected options) give an attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Remove,
    Empty,
    Dummy,
    ReplaceUid,
    Keep,
    Clean,
    ShiftDate,
}

impl Action {
    /// One table cell as an action. Combined codes take the choice that keeps the object
    /// conformant without carrying the value: X/Z → Z, X/D and Z/D and X/Z/D → D, X/Z/U* → U
    /// for UIDs (else Z).
    fn from_code(code: &str, vr: VR) -> Self {
        match code {
            "X" => Self::Remove,
            "Z" | "X/Z" => Self::Empty,
            "D" | "Z/D" | "X/D" | "X/Z/D" => Self::Dummy,
            "U" => Self::ReplaceUid,
            "X/Z/U*" if vr == VR::UI => Self::ReplaceUid,
            "X/Z/U*" => Self::Empty,
            "K" => Self::Keep,
            "C" => Self::Clean,
            _ => Self::Remove,
        }
    }
}

/// The action for `tag` (of `vr`) under `options`: the first selected option with a cell for
/// it decides; otherwise the Basic Profile does. A `C` under the modified-dates option means a
/// date shift.
pub fn action_for(table: &Table, tag: Tag, vr: VR, options: &Options) -> Option<Action> {
    let row = table.row(tag)?;
    for (column, ..) in options.selected() {
        if let Some(cell) = row.options.get(column) {
            if column == "retain_longitudinal_modified_dates" && cell == "C" {
                return Some(Action::ShiftDate);
            }
            return Some(Action::from_code(cell, vr));
        }
    }
    Some(Action::from_code(&row.action, vr))
}

/// De-identifies a Part 10 file under `profile`; the input is not changed.
pub fn deidentify(
    part10: &[u8],
    profile: &Profile,
    key: &DeidentificationKey,
) -> Result<Deidentified, DeidentificationError> {
    // The structural guard first: a lying length must not become a huge allocation.
    let mut file: FileDicomObject<InMemDicomObject> =
        crate::instance::read_whole(part10).map_err(|_| DeidentificationError::Unreadable)?;
    let burned_in = deidentify_data_set(&mut file, profile, key)?;
    let sop_instance_uid =
        crate::instance::text_of(&file, tags::SOP_INSTANCE_UID).unwrap_or_default();
    let sop_class_uid = crate::instance::text_of(&file, tags::SOP_CLASS_UID).unwrap_or_default();
    let meta = file.meta_mut();
    meta.media_storage_sop_instance_uid = sop_instance_uid.clone();
    meta.media_storage_sop_class_uid = sop_class_uid;
    // The meta group names the systems the file passed through: that goes too.
    meta.implementation_class_uid = crate::instance::IMPLEMENTATION_CLASS_UID.to_owned();
    meta.implementation_version_name =
        Some(crate::instance::IMPLEMENTATION_VERSION_NAME.to_owned());
    meta.source_application_entity_title = None;
    meta.sending_application_entity_title = None;
    meta.receiving_application_entity_title = None;
    meta.private_information_creator_uid = None;
    meta.private_information = None;
    meta.update_information_group_length();
    let mut written = Vec::with_capacity(part10.len());
    file.write_all(&mut written)
        .map_err(|_| DeidentificationError::Unwritable)?;
    Ok(Deidentified {
        part10: written,
        sop_instance_uid,
        quarantined: burned_in,
    })
}

/// De-identifies a data set in place (a header, for query results); `true` when it was
/// quarantined for burned-in annotation rather than refused.
pub fn deidentify_data_set(
    object: &mut InMemDicomObject,
    profile: &Profile,
    key: &DeidentificationKey,
) -> Result<bool, DeidentificationError> {
    let burned_in = has_burned_in_annotation(object);
    if burned_in && profile.burned_in_annotation == BurnedInAnnotation::Reject {
        return Err(DeidentificationError::BurnedInAnnotation);
    }
    let context = Context::of(object, profile, key);
    apply(object, &context, 0);
    mark(object, &profile.options);
    Ok(burned_in)
}

/// Whether the instance says its pixels carry burned-in annotation.
pub fn has_burned_in_annotation(object: &InMemDicomObject) -> bool {
    crate::instance::text_of(object, tags::BURNED_IN_ANNOTATION)
        .is_some_and(|flag| flag.eq_ignore_ascii_case("YES"))
}

/// What the actions of one instance need to know.
struct Context<'a> {
    table: &'static Table,
    profile: &'a Profile,
    key: &'a DeidentificationKey,
    shift_days: i64,
    /// Identifying words of this instance (name parts, ids, dates) that cleaning removes.
    identifying: BTreeSet<String>,
}

impl<'a> Context<'a> {
    fn of(object: &InMemDicomObject, profile: &'a Profile, key: &'a DeidentificationKey) -> Self {
        let patient_id = crate::instance::text_of(object, tags::PATIENT_ID).unwrap_or_default();
        let mut identifying = BTreeSet::new();
        for tag in [
            tags::PATIENT_NAME,
            tags::PATIENT_ID,
            // Other Patient IDs (retired, still sent by many modalities).
            Tag(0x0010, 0x1000),
            tags::ACCESSION_NUMBER,
            tags::REFERRING_PHYSICIAN_NAME,
            tags::PATIENT_BIRTH_DATE,
            tags::INSTITUTION_NAME,
            tags::PATIENT_ADDRESS,
            tags::PATIENT_MOTHER_BIRTH_NAME,
        ] {
            if let Some(text) = crate::instance::text_of(object, tag) {
                identifying.extend(
                    text.split(['^', ' ', '\\', '=', ','])
                        .map(str::trim)
                        .filter(|word| word.chars().count() >= 2)
                        .map(str::to_uppercase),
                );
            }
        }
        Self {
            table: Table::standard(),
            profile,
            key,
            shift_days: key.date_shift_days(&patient_id),
            identifying,
        }
    }
}

/// The deepest nesting de-identified (deeper items are removed whole).
const MAX_DEPTH: usize = 32;

fn apply(object: &mut InMemDicomObject, context: &Context<'_>, depth: usize) {
    let tags: Vec<Tag> = object.tags().collect();
    let mut private_creators: BTreeMap<(u16, u8), String> = BTreeMap::new();
    for tag in &tags {
        if tag.group() % 2 == 1
            && (0x0010..=0x00FF).contains(&tag.element())
            && let Some(creator) = crate::instance::text_of(object, *tag)
        {
            private_creators.insert((tag.group(), tag.element() as u8), creator);
        }
    }
    for tag in tags {
        if tag.group() == 0x0002 {
            continue;
        }
        if tag.group() % 2 == 1 {
            if !keeps_private(tag, &private_creators, context.profile) {
                object.remove_element(tag);
            }
            continue;
        }
        let Some(element) = object.get(tag) else {
            continue;
        };
        let vr = element.vr();
        let action = action_for(context.table, tag, vr, &context.profile.options);
        match action {
            None | Some(Action::Keep) => {
                if vr == VR::SQ {
                    recurse(object, tag, context, depth);
                }
            }
            Some(Action::Remove) => {
                object.remove_element(tag);
            }
            Some(Action::Empty) => {
                object.put(DataElement::new(tag, vr, PrimitiveValue::Empty));
            }
            Some(Action::Dummy) => dummy(object, tag, vr, context, depth),
            Some(Action::ReplaceUid) => replace_uids(object, tag, vr, context, depth),
            Some(Action::Clean) => clean(object, tag, vr, context, depth),
            Some(Action::ShiftDate) => shift_date(object, tag, vr, context),
        }
    }
}

/// A private attribute stays only when the profile keeps safe private attributes and lists
/// its creator and element.
fn keeps_private(tag: Tag, creators: &BTreeMap<(u16, u8), String>, profile: &Profile) -> bool {
    if !profile.options.retain_safe_private || profile.safe_private.is_empty() {
        return false;
    }
    let element = tag.element();
    if (0x0010..=0x00FF).contains(&element) {
        // A private creator stays when any of its elements is safe.
        let Some(creator) = creators.get(&(tag.group(), element as u8)) else {
            return false;
        };
        return profile
            .safe_private
            .iter()
            .any(|safe| &safe.creator == creator);
    }
    let block = (element >> 8) as u8;
    let Some(creator) = creators.get(&(tag.group(), block)) else {
        return false;
    };
    profile
        .safe_private
        .iter()
        .any(|safe| &safe.creator == creator && safe.element == element as u8)
}

fn recurse(object: &mut InMemDicomObject, tag: Tag, context: &Context<'_>, depth: usize) {
    if depth >= MAX_DEPTH {
        object.remove_element(tag);
        return;
    }
    object.update_value(tag, |value| {
        if let Some(items) = value.items_mut() {
            for item in items.iter_mut() {
                apply(item, context, depth + 1);
            }
        }
    });
}

/// A non-empty value consistent with the VR that carries nothing of the original. Sequences
/// keep their items, de-identified.
fn dummy(object: &mut InMemDicomObject, tag: Tag, vr: VR, context: &Context<'_>, depth: usize) {
    let replacement = match vr {
        VR::SQ => return recurse(object, tag, context, depth),
        VR::UI => return replace_uids(object, tag, vr, context, depth),
        VR::PN => PrimitiveValue::from("ANONYMIZED"),
        VR::DA => PrimitiveValue::from("19000101"),
        VR::TM => PrimitiveValue::from("000000"),
        VR::DT => PrimitiveValue::from("19000101000000"),
        VR::AS => PrimitiveValue::from("000Y"),
        VR::IS | VR::DS => PrimitiveValue::from("0"),
        VR::US => PrimitiveValue::from(0_u16),
        VR::SS => PrimitiveValue::from(0_i16),
        VR::UL => PrimitiveValue::from(0_u32),
        VR::SL => PrimitiveValue::from(0_i32),
        VR::FL => PrimitiveValue::from(0_f32),
        VR::FD => PrimitiveValue::from(0_f64),
        VR::OB | VR::OW | VR::UN | VR::OD | VR::OF | VR::OL | VR::OV => {
            PrimitiveValue::from(vec![0_u8, 0_u8])
        }
        VR::CS => PrimitiveValue::from("ANONYMIZED"),
        _ => PrimitiveValue::from("ANONYMIZED"),
    };
    object.put(DataElement::new(tag, vr, replacement));
}

/// Every UID of the attribute (and, for sequences, of its items) remapped under the key.
fn replace_uids(
    object: &mut InMemDicomObject,
    tag: Tag,
    vr: VR,
    context: &Context<'_>,
    depth: usize,
) {
    if vr == VR::SQ {
        return recurse(object, tag, context, depth);
    }
    let Some(element) = object.get(tag) else {
        return;
    };
    let Ok(originals) = element.to_multi_str() else {
        object.put(DataElement::new(tag, vr, PrimitiveValue::Empty));
        return;
    };
    let replaced: Vec<String> = originals
        .iter()
        .map(|uid| uid.trim_end_matches(['\0', ' ']))
        .filter(|uid| !uid.is_empty())
        .map(|uid| context.key.uid(uid))
        .collect();
    object.put(DataElement::new(
        tag,
        VR::UI,
        PrimitiveValue::Strs(replaced.into()),
    ));
}

/// Free text with the instance's own identifying words (names, ids, dates) removed; codes and
/// structure kept.
fn clean(object: &mut InMemDicomObject, tag: Tag, vr: VR, context: &Context<'_>, depth: usize) {
    match vr {
        VR::SQ => recurse(object, tag, context, depth),
        VR::UI => replace_uids(object, tag, vr, context, depth),
        VR::DA | VR::DT | VR::TM => dummy(object, tag, vr, context, depth),
        VR::LO | VR::LT | VR::SH | VR::ST | VR::UT | VR::UC | VR::PN | VR::CS => {
            let Some(text) = crate::instance::text_of(object, tag) else {
                return;
            };
            let cleaned = remove_words(&text, &context.identifying);
            object.put(DataElement::new(tag, vr, PrimitiveValue::from(cleaned)));
        }
        _ => {
            object.remove_element(tag);
        }
    }
}

fn remove_words(text: &str, identifying: &BTreeSet<String>) -> String {
    let mut cleaned = text.to_owned();
    for word in identifying {
        cleaned = replace_case_insensitive(&cleaned, word, "***");
    }
    cleaned
}

fn replace_case_insensitive(text: &str, word: &str, with: &str) -> String {
    let upper = text.to_uppercase();
    if upper.len() != text.len() {
        // Case folding changed byte offsets (non-ASCII): replace exact occurrences only.
        return text.replace(word, with);
    }
    let mut result = String::with_capacity(text.len());
    let mut rest = 0;
    let mut search = 0;
    while let Some(found) = upper[search..].find(word) {
        let start = search + found;
        result.push_str(&text[rest..start]);
        result.push_str(with);
        rest = start + word.len();
        search = rest;
    }
    result.push_str(&text[rest..]);
    result
}

/// Dates shifted by the patient's offset (times are kept; date-times shift their date part).
fn shift_date(object: &mut InMemDicomObject, tag: Tag, vr: VR, context: &Context<'_>) {
    let Some(text) = crate::instance::text_of(object, tag) else {
        return;
    };
    let shifted = match vr {
        VR::DA => shift_yyyymmdd(&text, context.shift_days),
        VR::DT => text
            .get(..8)
            .and_then(|date| shift_yyyymmdd(date, context.shift_days))
            .map(|date| format!("{date}{}", &text[8..])),
        _ => Some(text.clone()),
    };
    match shifted {
        Some(value) => {
            object.put(DataElement::new(tag, vr, PrimitiveValue::from(value)));
        }
        None => {
            object.put(DataElement::new(tag, vr, PrimitiveValue::Empty));
        }
    }
}

fn shift_yyyymmdd(text: &str, days: i64) -> Option<String> {
    let format = time::macros::format_description!("[year][month][day]");
    let date = time::Date::parse(text.get(..8)?, &format).ok()?;
    let shifted = date.checked_add(time::Duration::days(days))?;
    shifted.format(&format).ok()
}

/// Patient Identity Removed, the De-identification Method and its code sequence, and whether
/// longitudinal temporal information was modified.
fn mark(object: &mut InMemDicomObject, options: &Options) {
    object.put(DataElement::new(
        tags::PATIENT_IDENTITY_REMOVED,
        VR::CS,
        PrimitiveValue::from("YES"),
    ));
    let selected = options.selected();
    let mut method = String::from("PS3.15 Basic Application Level Confidentiality Profile");
    for (_, _, meaning) in &selected {
        method.push_str(", ");
        method.push_str(meaning.trim_end_matches(" Option"));
    }
    let method: String = method.chars().take(64).collect();
    object.put(DataElement::new(
        tags::DEIDENTIFICATION_METHOD,
        VR::LO,
        PrimitiveValue::from(method),
    ));
    let mut codes = vec![code_item(
        "113100",
        "Basic Application Confidentiality Profile",
    )];
    codes.extend(
        selected
            .iter()
            .map(|(_, code, meaning)| code_item(code, meaning)),
    );
    object.put(DataElement::new(
        tags::DEIDENTIFICATION_METHOD_CODE_SEQUENCE,
        VR::SQ,
        Value::Sequence(DataSetSequence::new(codes, Length::UNDEFINED)),
    ));
    let temporal = if options.retain_longitudinal_modified_dates {
        "MODIFIED"
    } else if options.retain_longitudinal_full_dates {
        "UNMODIFIED"
    } else {
        "REMOVED"
    };
    object.put(DataElement::new(
        tags::LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED,
        VR::CS,
        PrimitiveValue::from(temporal),
    ));
}

fn code_item(code: &str, meaning: &str) -> InMemDicomObject {
    let meaning: String = meaning.chars().take(64).collect();
    InMemDicomObject::from_element_iter([
        DataElement::new(tags::CODE_VALUE, VR::SH, PrimitiveValue::from(code)),
        DataElement::new(
            tags::CODING_SCHEME_DESIGNATOR,
            VR::SH,
            PrimitiveValue::from("DCM"),
        ),
        DataElement::new(tags::CODE_MEANING, VR::LO, PrimitiveValue::from(meaning)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> DeidentificationKey {
        DeidentificationKey::new([7; 32])
    }

    #[test]
    fn the_table_is_the_standard_one() {
        let table = Table::standard();
        assert!(
            table.rows().count() >= 600,
            "Table E.1-1 has hundreds of rows"
        );
        assert_eq!(
            action_for(table, tags::PATIENT_NAME, VR::PN, &Options::default()),
            Some(Action::Empty)
        );
        assert_eq!(
            action_for(table, tags::STUDY_INSTANCE_UID, VR::UI, &Options::default()),
            Some(Action::ReplaceUid)
        );
        assert_eq!(
            action_for(table, tags::MODALITY, VR::CS, &Options::default()),
            None,
            "attributes outside the table are kept"
        );
        let characteristics = Options {
            retain_patient_characteristics: true,
            ..Options::default()
        };
        assert_eq!(
            action_for(table, tags::PATIENT_SEX, VR::CS, &characteristics),
            Some(Action::Keep)
        );
        assert_eq!(
            action_for(table, Tag(0x6002, 0x3000), VR::OW, &Options::default()),
            Some(Action::Remove),
            "overlay data of any overlay group"
        );
        let modified_dates = Options {
            retain_longitudinal_modified_dates: true,
            ..Options::default()
        };
        assert_eq!(
            action_for(table, tags::STUDY_DATE, VR::DA, &modified_dates),
            Some(Action::ShiftDate)
        );
    }

    #[test]
    fn uids_map_consistently_into_2_25() {
        let key = key();
        let uid = key.uid("1.2.840.113619.2.55.3.1");
        assert!(uid.starts_with("2.25."));
        assert!(uid.len() <= 64);
        assert!(crate::instance::is_valid_uid(&uid));
        assert_eq!(uid, key.uid("1.2.840.113619.2.55.3.1\0"));
        assert_ne!(uid, key.uid("1.2.840.113619.2.55.3.2"));
        assert_ne!(
            uid,
            DeidentificationKey::new([8; 32]).uid("1.2.840.113619.2.55.3.1")
        );
    }

    #[test]
    fn dates_shift_by_the_same_offset_for_a_patient() {
        let key = key();
        let shift = key.date_shift_days("PID-1");
        assert!((-3650..=-1).contains(&shift));
        assert_eq!(shift, key.date_shift_days("PID-1"));
        assert_eq!(shift_yyyymmdd("20240301", -1).as_deref(), Some("20240229"));
    }

    #[test]
    fn cleaning_removes_the_patients_own_words() {
        let words = BTreeSet::from(["DOE".to_owned(), "12345".to_owned()]);
        assert_eq!(
            remove_words("CT chest for doe, MRN 12345", &words),
            "CT chest for ***, MRN ***"
        );
    }
}
