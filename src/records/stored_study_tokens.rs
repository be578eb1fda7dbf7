//! Which studies this process has already committed identifying-attribute tokens for, so that
//! the instances of a study after its first skip computing (dozens of keyed hashes for the
//! name prefixes) and inserting tokens the study already has.
//!
//! A study's tokens are only ever added (shredding leaves the keyed hashes, which open nothing),
//! so a remembered study keeps its tokens; an instance whose identifying attributes differ from
//! the remembered ones has a different fingerprint and gets its tokens computed and added.

use std::collections::HashMap;
use std::sync::Mutex;

use glastonbury_dicom::attributes::IndexedAttributes;

use crate::vault::BlindIndex;

/// The most studies remembered; past it the memory starts over (a miss only costs the work the
/// memory saves).
const MAX_REMEMBERED_STUDIES: usize = 4096;

/// Keyed hash of the identifying attribute values an instance gives its study's tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenFingerprint(String);

impl TokenFingerprint {
    /// One keyed hash over every `(tag, value)` the study tokens are made from, each value
    /// length-prefixed so that no two different attribute sets encode alike.
    pub fn of(blind: &BlindIndex, attributes: &IndexedAttributes) -> Self {
        let mut encoded = String::new();
        for (tag, value) in &attributes.tokens {
            encoded.push_str(&format!(
                "{:04X}{:04X}:{}:{value};",
                tag.group(),
                tag.element(),
                value.len()
            ));
        }
        Self(blind.verbatim("DicomStudy.tokens#fingerprint", &encoded))
    }
}

/// Studies whose tokens, for a given fingerprint, are committed.
#[derive(Debug, Default)]
pub struct StoredStudyTokens {
    studies: Mutex<HashMap<String, TokenFingerprint>>,
}

impl StoredStudyTokens {
    /// Whether the study's tokens for these attributes are already committed.
    pub fn has(&self, study_key: &str, fingerprint: &TokenFingerprint) -> bool {
        let studies = self
            .studies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        studies.get(study_key) == Some(fingerprint)
    }

    /// Notes that the study's tokens for these attributes were committed.
    pub fn remember(&self, study_key: &str, fingerprint: TokenFingerprint) {
        let mut studies = self
            .studies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if studies.len() >= MAX_REMEMBERED_STUDIES && !studies.contains_key(study_key) {
            studies.clear();
        }
        studies.insert(study_key.to_owned(), fingerprint);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vault::BlindIndexKey;
    use dicom_dictionary_std::tags;

    fn attributes(name: &str) -> IndexedAttributes {
        IndexedAttributes {
            tokens: vec![
                (tags::PATIENT_NAME, name.to_owned()),
                (tags::PATIENT_ID, "MRN-1".to_owned()),
            ],
            modality: None,
            study_date: None,
            series_number: None,
            instance_number: None,
            patient_id: Some("MRN-1".to_owned()),
            issuer_of_patient_id: None,
        }
    }

    #[test]
    fn a_study_is_known_only_with_the_attributes_it_was_remembered_with() {
        let blind = BlindIndex::new(BlindIndexKey([5u8; 32]));
        let memory = StoredStudyTokens::default();
        let first = TokenFingerprint::of(&blind, &attributes("Doe^Jane"));
        assert!(!memory.has("study-a", &first));
        memory.remember("study-a", first.clone());
        assert!(memory.has("study-a", &first));
        assert!(!memory.has("study-b", &first));
        let renamed = TokenFingerprint::of(&blind, &attributes("Doe^Janet"));
        assert!(!memory.has("study-a", &renamed));
    }

    #[test]
    fn values_that_only_differ_in_where_they_split_have_different_fingerprints() {
        let blind = BlindIndex::new(BlindIndexKey([5u8; 32]));
        let joined = TokenFingerprint::of(&blind, &attributes("A;B"));
        let mut split = attributes("A");
        split.tokens[1].1 = "B;MRN-1".to_owned();
        assert_ne!(joined, TokenFingerprint::of(&blind, &split));
    }

    #[test]
    fn the_memory_stays_bounded() {
        let blind = BlindIndex::new(BlindIndexKey([5u8; 32]));
        let memory = StoredStudyTokens::default();
        let fingerprint = TokenFingerprint::of(&blind, &attributes("Doe^Jane"));
        for study in 0..=MAX_REMEMBERED_STUDIES {
            memory.remember(&format!("study-{study}"), fingerprint.clone());
        }
        assert!(memory.studies.lock().unwrap().len() <= MAX_REMEMBERED_STUDIES);
        assert!(memory.has(&format!("study-{MAX_REMEMBERED_STUDIES}"), &fingerprint));
    }
}
