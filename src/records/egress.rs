//! Egress of records in the caller's view: what leaves the record path for a caller whose policy
//! grants only the HIPAA Safe Harbor de-identified view, and how that caller's pseudonyms (of
//! resource ids) lead back to records.
//!
//! A resource id's pseudonym is its `_id` blind-index token (see `search_index::id_pseudonym`),
//! so a pseudonym names exactly one record without any extra table, and a de-identified caller
//! can read, search by `_id` and by reference, and ask `$everything` by pseudonym alone.

use glastonbury_dicom::deidentify::DeidentificationKey;
use glastonbury_fhir::query::{Criterion, Match, SearchRequest, Test};
use glastonbury_fhir::safe_harbor::{Pseudonyms, SafeHarbor};
use serde_json::Value;

use super::search_index::id_pseudonym;
use super::{Record, RecordError, Records};
use crate::access::View;
use crate::vault::BlindIndex;

/// The media type of FHIR records, the one kind with a de-identified view so far.
const FHIR_JSON: &str = "application/fhir+json";

/// An id no record can have (ids are letters, digits, `-` and `.`): what an unknown pseudonym
/// is searched as, so that it matches nothing.
const NO_SUCH_ID: &str = "!unknown-pseudonym";

/// The appliance's pseudonyms: keyed by the blind-index key, stable across restarts.
#[derive(Debug, Clone, Copy)]
pub struct VaultPseudonyms<'a> {
    pub blind_index: &'a BlindIndex,
    /// The key the de-identified view of DICOM data remaps UIDs under (so an ImagingStudy's
    /// series and instance UIDs are the ones DICOMweb answers to in that view).
    pub uid_key: &'a DeidentificationKey,
}

impl Pseudonyms for VaultPseudonyms<'_> {
    fn resource_id(&self, resource_type: &str, id: &str) -> String {
        id_pseudonym(self.blind_index, resource_type, id)
    }

    fn identifier(&self, system: &str, value: &str) -> String {
        self.blind_index
            .pseudonym("safe-harbor-identifier", &format!("{system}|{value}"))
    }

    fn uid(&self, uid: &str) -> String {
        self.uid_key.uid(uid)
    }
}

/// The calendar year that decides who is "90 or older".
fn current_year() -> i32 {
    time::OffsetDateTime::now_utc().year()
}

impl Records {
    /// The record as `view` may see it. Records of a kind without a de-identified form are
    /// refused rather than passed on.
    pub(crate) fn egress(&self, view: View, mut record: Record) -> Result<Record, RecordError> {
        if view == View::Identified || record.meta.deleted {
            return Ok(record);
        }
        if record.content_type != FHIR_JSON {
            return Err(RecordError::NotInView(
                "no de-identified view exists for this kind of record".to_owned(),
            ));
        }
        let resource: Value =
            serde_json::from_slice(&record.body).map_err(|_| RecordError::Damaged)?;
        let pseudonyms = VaultPseudonyms {
            blind_index: self.vault.blind_index(),
            uid_key: self.vault.deidentification_key(),
        };
        let deidentified = SafeHarbor::new(&pseudonyms, current_year()).deidentify(&resource);
        record.meta.key.resource_id =
            pseudonyms.resource_id(&record.meta.key.resource_type, &record.meta.key.resource_id);
        record.body = bytes::Bytes::from(deidentified.to_string());
        record.view = View::SafeHarbor;
        Ok(record)
    }

    /// Every record of `records` in `view` (shredded or damaged ones are refused as in reads).
    pub(crate) fn egress_all(
        &self,
        view: View,
        records: Vec<Record>,
    ) -> Result<Vec<Record>, RecordError> {
        records
            .into_iter()
            .map(|record| self.egress(view, record))
            .collect()
    }

    /// The real id of the record of `resource_type` whose pseudonym is `pseudonym`.
    pub(crate) async fn resolve_pseudonym(
        &self,
        resource_type: &str,
        pseudonym: &str,
    ) -> Result<Option<String>, RecordError> {
        let found: Option<(String,)> = sqlx::query_as(
            "SELECT resource_id FROM search_tokens WHERE resource_type = $1 AND param = '_id' AND token = $2 LIMIT 1",
        )
        .bind(resource_type)
        .bind(pseudonym)
        .fetch_optional(self.database.pool())
        .await?;
        Ok(found.map(|(id,)| id))
    }

    /// The id a caller in `view` names: itself when identified, else the record its pseudonym
    /// stands for (a real id is not accepted as a pseudonym: it is not found).
    pub(crate) async fn id_in_view(
        &self,
        view: View,
        resource_type: &str,
        id: &str,
    ) -> Result<String, RecordError> {
        if view == View::Identified {
            return Ok(id.to_owned());
        }
        self.resolve_pseudonym(resource_type, id)
            .await?
            .ok_or(RecordError::NotFound)
    }

    /// Checks a de-identified search and turns the pseudonyms it names (`_id`, references)
    /// into the ids they stand for.
    pub(crate) async fn search_in_view(
        &self,
        view: View,
        resource_type: &str,
        request: &SearchRequest,
    ) -> Result<SearchRequest, RecordError> {
        if view == View::Identified {
            return Ok(request.clone());
        }
        glastonbury_fhir::safe_harbor::check_deidentified_search(resource_type, request)
            .map_err(|restriction| RecordError::NotInView(restriction.0))?;
        let mut translated = request.clone();
        for criterion in &mut translated.criteria {
            match criterion {
                Criterion::Id(ids) => {
                    for id in ids.iter_mut() {
                        *id = self
                            .resolve_pseudonym(resource_type, id)
                            .await?
                            .unwrap_or_else(|| NO_SUCH_ID.to_owned());
                    }
                }
                Criterion::Indexed(indexed) => {
                    let Test::AnyOf(matches) = &mut indexed.test else {
                        continue;
                    };
                    for found in matches.iter_mut() {
                        if let Match::Reference(reference) = found {
                            *reference = self.reference_in_view(reference).await?;
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(translated)
    }

    /// `Type/pseudonym` (or a bare pseudonym) as the reference it stands for.
    async fn reference_in_view(&self, reference: &str) -> Result<String, RecordError> {
        let (resource_type, pseudonym) = match reference.rsplit_once('/') {
            Some((path, pseudonym)) => (path.rsplit('/').next(), pseudonym),
            None => (None, reference),
        };
        let found: Option<(String, String)> = match resource_type {
            Some(resource_type) => self
                .resolve_pseudonym(resource_type, pseudonym)
                .await?
                .map(|id| (resource_type.to_owned(), id)),
            None => sqlx::query_as(
                "SELECT resource_type, resource_id FROM search_tokens WHERE param = '_id' AND token = $1 LIMIT 1",
            )
            .bind(pseudonym)
            .fetch_optional(self.database.pool())
            .await?,
        };
        Ok(match found {
            Some((resource_type, id)) => format!("{resource_type}/{id}"),
            None => NO_SUCH_ID.to_owned(),
        })
    }
}
