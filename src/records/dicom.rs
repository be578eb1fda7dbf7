//! DICOM on the record path: storing a checked instance (its Part 10 file encrypted to the
//! patient's key, its index row, its identifying attributes as blind-index tokens and an audit
//! leaf, in one unit), answering QIDO-RS / C-FIND queries from that index, and handing out
//! instances and headers for WADO-RS, as stored or, for callers Cedar grants only the
//! de-identified view, de-identified under their role's PS3.15 profile with remapped UIDs.
//! Policies and scopes name DICOM data `ImagingStudy`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use dicom_core::Tag;
use dicom_dictionary_std::tags;
use glastonbury_dicom::attributes::{
    IndexedAttributes, TOKEN_ATTRIBUTES, TokenKind, indexed_attributes, name_words,
};
use glastonbury_dicom::deidentify::{self, DeidentificationKey, Profile};
use glastonbury_dicom::qido::{Criterion, Include, Level, Matcher, QidoQuery};
use glastonbury_dicom::{Instance, json};
use serde_json::{Map, Value};
use sqlx::Row;

use super::search_index::{
    DICOM_INSTANCE, DICOM_STUDY, IndexRows, TokenRow, dicom_exact_token, dicom_prefix_token,
    dicom_token_rows,
};
use super::stored_study_tokens::TokenFingerprint;
use super::writer::{DeidentifiedKeys, DicomInstanceRow, Precondition};
use super::{PreparedWrite, RecordError, RecordKey, RecordVersion, Records, version_row};
use crate::access::{self, Allowed, Principal};
use crate::journal::{AuditDraft, codes};
use crate::storage::statement::Statement;
use crate::vault::{PatientKeyring, PatientOpener, VaultError};

/// The resource type DICOM data has in policies, scopes and audit leaves.
pub const IMAGING_RESOURCE_TYPE: &str = "ImagingStudy";

/// The media type of stored instances.
pub const DICOM_MEDIA_TYPE: &str = "application/dicom";

/// The most candidate results a query that needs matching on decrypted headers may look at.
pub const MAX_QUERY_CANDIDATES: usize = 10_000;

/// Where a query or retrieval is confined by its URL (`/studies/{study}/series…`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DicomScope {
    pub study_uid: Option<String>,
    pub series_uid: Option<String>,
    pub instance_uid: Option<String>,
}

impl DicomScope {
    /// The scope a DICOMweb path names: a study, a series in it, or an instance in that.
    pub fn of(study: Option<String>, series: Option<String>, instance: Option<String>) -> Self {
        Self {
            study_uid: study,
            series_uid: series,
            instance_uid: instance,
        }
    }
}

/// One query result: the UIDs that name it (for retrieve URLs) and its DICOM JSON attributes.
#[derive(Debug, Clone, PartialEq)]
pub struct DicomMatch {
    pub study_uid: String,
    pub series_uid: String,
    pub instance_uid: String,
    pub attributes: Map<String, Value>,
}

/// A stored instance the caller was allowed to retrieve (only [`Records::dicom_instances`]
/// makes these, after authorizing and journaling the retrieval). Its UIDs are the ones the
/// caller's view names it by.
#[derive(Debug, Clone)]
pub struct RetrievableInstance {
    key: RecordKey,
    /// The patient's key, looked up (and checked not shredded) when the retrieval was listed.
    opener: PatientOpener,
    egress: DicomEgress,
    pub study_uid: String,
    pub series_uid: String,
    pub instance_uid: String,
    pub transfer_syntax_uid: String,
}

/// A stored instance's keyed hashes (what the index holds instead of UIDs).
fn dicom_key(blind: &crate::vault::BlindIndex, level: &str, uid: &str) -> String {
    blind.pseudonym(&format!("dicom-{level}"), uid)
}

/// What [`Records::keyed_instance_index`] computes for an instance before its patient is known.
struct KeyedInstanceIndex {
    /// The header as DICOM JSON, still to be sealed with the patient's index key.
    header: Vec<u8>,
    /// What the study's ImagingStudy lists of the instance, as DICOM JSON, still to be sealed.
    listed_values: Vec<u8>,
    instance_key: String,
    series_key: String,
    study_key: String,
    study_tokens: Vec<TokenRow>,
    token_fingerprint: TokenFingerprint,
    deidentified_keys: DeidentifiedKeys,
}

/// Keyed hashes of the UIDs the de-identified view names an instance by.
fn deidentified_keys(
    blind: &crate::vault::BlindIndex,
    key: &DeidentificationKey,
    study_uid: &str,
    series_uid: &str,
    instance_uid: &str,
) -> DeidentifiedKeys {
    DeidentifiedKeys {
        study_key: dicom_key(blind, "study", &key.uid(study_uid)),
        series_key: dicom_key(blind, "series", &key.uid(series_uid)),
        instance_key: dicom_key(blind, "instance", &key.uid(instance_uid)),
    }
}

/// The attributes a de-identified view may match on: none of them can re-identify a patient.
const DEIDENTIFIED_MATCHING: &[Tag] = &[
    tags::STUDY_INSTANCE_UID,
    tags::SERIES_INSTANCE_UID,
    tags::SOP_INSTANCE_UID,
    tags::SOP_CLASS_UID,
    tags::MODALITY,
    tags::MODALITIES_IN_STUDY,
    tags::SERIES_NUMBER,
    tags::INSTANCE_NUMBER,
];

/// How DICOM data leaves for a caller: as stored, or de-identified under a profile.
#[derive(Debug, Clone)]
pub(crate) enum DicomEgress {
    AsStored,
    Deidentified(Arc<DeidentifiedEgress>),
}

/// The profile and key a de-identified view applies.
#[derive(Debug)]
pub(crate) struct DeidentifiedEgress {
    profile: Profile,
    key: DeidentificationKey,
}

impl DicomEgress {
    /// The index column holding a level's keyed UIDs, as this view names instances.
    fn key_column(&self, column: &str) -> String {
        match self {
            Self::Deidentified(egress) if !egress.profile.options.retain_uids => {
                format!("deid_{column}")
            }
            _ => column.to_owned(),
        }
    }

    /// A UID as this view shows it.
    fn uid(&self, stored: &str) -> String {
        match self {
            Self::Deidentified(egress) if !egress.profile.options.retain_uids => {
                egress.key.uid(stored)
            }
            _ => stored.to_owned(),
        }
    }

    /// A stored header as this view shows it; `None` when the instance is withheld (burned-in
    /// annotation, or a header the profile cannot be applied to).
    fn header(&self, stored: Value) -> Option<Value> {
        let Self::Deidentified(egress) = self else {
            return Some(stored);
        };
        let mut object = json::header_from_json(&stored).ok()?;
        if deidentify::has_burned_in_annotation(&object) {
            return None;
        }
        deidentify::deidentify_data_set(&mut object, &egress.profile, &egress.key).ok()?;
        json::header_json(&object).ok()
    }

    /// A stored header's DICOM JSON bytes as this view shows them: as stored, or de-identified
    /// (see [`Self::header`]); `None` when the instance is withheld.
    fn header_bytes(&self, stored: Vec<u8>) -> Result<Option<Vec<u8>>, RecordError> {
        let Self::Deidentified(_) = self else {
            return Ok(Some(stored));
        };
        let parsed: Value = serde_json::from_slice(&stored).map_err(|_| RecordError::Damaged)?;
        let Some(header) = self.header(parsed) else {
            return Ok(None);
        };
        serde_json::to_vec(&header)
            .map(Some)
            .map_err(|_| RecordError::Damaged)
    }

    /// Refuses matching that could re-identify a patient in a de-identified view.
    fn check_criteria(&self, query: &QidoQuery) -> Result<(), RecordError> {
        if let Self::AsStored = self {
            return Ok(());
        }
        match query
            .criteria
            .iter()
            .find(|criterion| !DEIDENTIFIED_MATCHING.contains(&criterion.tag))
        {
            Some(criterion) => Err(RecordError::Invalid(format!(
                "matching on {} is not available in the de-identified view (it could re-identify); match on UIDs, modality, SOP class, series or instance number",
                keyword(criterion.tag)
            ))),
            None => Ok(()),
        }
    }
}

/// Why a DICOM instance was not stored, as both DICOM surfaces (C-STORE and STOW-RS) answer it:
/// the DICOM status and a comment for the sender that names no PHI.
#[derive(Debug)]
pub struct DicomStoreRefusal {
    pub status: u16,
    pub comment: String,
}

impl DicomStoreRefusal {
    /// The refusal for an error of [`Records::store_dicom_instance`], logged once here.
    pub fn of(error: RecordError) -> Self {
        use glastonbury_dicom::dimse::status;
        match error {
            RecordError::Invalid(reason) => {
                tracing::info!(reason = %reason, "dicom instance refused");
                Self {
                    status: status::UNABLE_TO_PROCESS,
                    comment: reason,
                }
            }
            RecordError::Shredded => {
                tracing::info!("dicom instance refused: the patient was crypto-shredded");
                Self {
                    status: status::REFUSED_NOT_AUTHORIZED,
                    comment: "this patient's data was crypto-shredded; nothing was stored"
                        .to_owned(),
                }
            }
            error => {
                tracing::error!(error = %error, "dicom instance not stored");
                Self {
                    status: status::OUT_OF_RESOURCES,
                    comment: "storage is unavailable; nothing was stored".to_owned(),
                }
            }
        }
    }
}

/// Instance headers read in one query by [`Records::dicom_headers`].
const HEADERS_PER_QUERY: usize = 500;

impl Records {
    /// Stores a checked instance as one unit: record row (file encrypted, in the blob store when
    /// large), index row, identifying attributes as tokens, and a DICOM Instances Transferred
    /// leaf. A second store of the same SOP Instance UID becomes a new version.
    pub async fn store_dicom_instance(
        &self,
        allowed: &Allowed<access::Create>,
        instance: Instance,
        source_ae_title: Option<&str>,
    ) -> Result<RecordVersion, RecordError> {
        let (instance, subtype) = match self.ingest_profile(source_ae_title) {
            Some(profile) => (
                self.deidentify_on_ingest(&instance, &profile).await?,
                "store-deidentified",
            ),
            None => (instance, "store"),
        };
        let attributes = indexed_attributes(&instance.header);
        // The patient lookup is a database round trip: what needs no patient key is computed
        // while it runs.
        let (patient_ref, keyed) = tokio::join!(self.dicom_patient_ref(&attributes), async {
            self.keyed_instance_index(&instance, &attributes)
        });
        let patient_ref = patient_ref?;
        let keyed = keyed?;
        let recipient = self.vault.patient_recipient(&patient_ref).await?;
        let header_ciphertext = recipient.seal_for_index(&keyed.header)?;
        let listed_values_ciphertext = recipient.seal_for_index(&keyed.listed_values)?;
        let payload = self
            .encrypted_payload(&recipient, &patient_ref, &instance.part10)
            .await?;
        let key = RecordKey::new(DICOM_INSTANCE, &keyed.instance_key);
        let mut row = version_row(
            &key,
            &patient_ref,
            DICOM_MEDIA_TYPE.to_owned(),
            payload,
            Precondition::None,
            IndexRows::default(),
        );
        let study_key = keyed.study_key.clone();
        row.dicom = Some(DicomInstanceRow {
            instance_key: keyed.instance_key,
            series_key: keyed.series_key,
            study_key: keyed.study_key,
            sop_class_uid: instance.sop_class_uid.clone(),
            transfer_syntax_uid: instance.transfer_syntax_uid.clone(),
            modality: attributes.modality.clone(),
            study_date: attributes.study_date,
            series_number: attributes.series_number,
            instance_number: attributes.instance_number,
            header: header_ciphertext,
            study_tokens: keyed.study_tokens,
            deidentified_keys: keyed.deidentified_keys,
            listed_values: listed_values_ciphertext,
        });
        let draft = AuditDraft::by(
            allowed.principal(),
            codes::INSTANCES_TRANSFERRED,
            subtype,
            'C',
        )
        .on(IMAGING_RESOURCE_TYPE, Some(&study_key))
        .for_patient(&patient_ref)
        .decided_by(allowed.decided_by());
        let stored = self.commit_one(PreparedWrite { key, row, draft }).await?;
        self.stored_study_tokens
            .remember(&study_key, keyed.token_fingerprint);
        Ok(stored)
    }

    /// The index entries of an instance that need the blind index but not the patient's key:
    /// UID keys, the study's tokens (none when this process already committed them for the
    /// same attributes) and the header to seal.
    fn keyed_instance_index(
        &self,
        instance: &Instance,
        attributes: &IndexedAttributes,
    ) -> Result<KeyedInstanceIndex, RecordError> {
        let header = json::header_json_bytes(&instance.header).map_err(header_not_rendered)?;
        let blind = self.vault.blind_index();
        let study_key = dicom_key(blind, "study", &instance.study_instance_uid);
        let token_fingerprint = TokenFingerprint::of(blind, attributes);
        let study_tokens = if self.stored_study_tokens.has(&study_key, &token_fingerprint) {
            Vec::new()
        } else {
            study_token_rows(blind, attributes)
        };
        Ok(KeyedInstanceIndex {
            header,
            listed_values: super::imaging_study::listed_values_json(instance)?,
            instance_key: dicom_key(blind, "instance", &instance.sop_instance_uid),
            series_key: dicom_key(blind, "series", &instance.series_instance_uid),
            study_key,
            study_tokens,
            token_fingerprint,
            deidentified_keys: deidentified_keys(
                blind,
                self.vault.deidentification_key(),
                &instance.study_instance_uid,
                &instance.series_instance_uid,
                &instance.sop_instance_uid,
            ),
        })
    }

    /// The profile the policy applies to instances from this source before storing, if any.
    fn ingest_profile(
        &self,
        source_ae_title: Option<&str>,
    ) -> Option<glastonbury_dicom::deidentify::Profile> {
        let policy = self.deidentification.current();
        source_ae_title
            .and_then(|title| policy.ingest_profile(title))
            .cloned()
    }

    /// The instance as the profile de-identifies it (UIDs remapped under the appliance's key).
    async fn deidentify_on_ingest(
        &self,
        instance: &Instance,
        profile: &glastonbury_dicom::deidentify::Profile,
    ) -> Result<Instance, RecordError> {
        let key = self.vault.deidentification_key().clone();
        let deidentified =
            glastonbury_dicom::deidentify::deidentify(&instance.part10, profile, &key)
                .map_err(|error| RecordError::Invalid(error.to_string()))?;
        if deidentified.quarantined {
            return Err(RecordError::Invalid(
                "burned-in annotation: the instance was not stored (quarantine is not available on ingest)".to_owned(),
            ));
        }
        glastonbury_dicom::instance::from_part10(deidentified.part10)
            .map_err(|error| RecordError::Invalid(error.to_string()))
    }

    /// The patient an instance belongs to: the FHIR Patient whose identifier is its PatientID
    /// (so one key, and one shred, covers both), else a DICOM-only patient of that PatientID.
    async fn dicom_patient_ref(
        &self,
        attributes: &IndexedAttributes,
    ) -> Result<String, RecordError> {
        let Some(patient_id) = attributes.patient_id.as_deref() else {
            return Ok(self.vault.patient_ref(None));
        };
        if let Some(fhir_patient) = self.fhir_patient_with_identifier(patient_id).await? {
            return Ok(self.vault.patient_ref(Some(&fhir_patient)));
        }
        let issuer = attributes
            .issuer_of_patient_id
            .as_deref()
            .unwrap_or_default();
        Ok(self
            .vault
            .patient_ref(Some(&format!("dicom:{issuer}|{patient_id}"))))
    }

    /// Answers a QIDO-RS (or C-FIND) query within `scope`; journaled as a Query with the query
    /// text sealed, plus one leaf per patient whose data was returned.
    pub async fn query_dicom(
        &self,
        allowed: &Allowed<access::Search>,
        query: &QidoQuery,
        scope: &DicomScope,
        query_text: &str,
    ) -> Result<Vec<DicomMatch>, RecordError> {
        let egress = self
            .dicom_egress(allowed.view(), allowed.principal())
            .await?;
        egress.check_criteria(query)?;
        let plan = self.query_plan(query, scope, &egress);
        let groups = self.candidate_groups(&plan, query).await?;
        let mut matches = Vec::new();
        let mut patient_refs = BTreeSet::new();
        let mut skipped = 0;
        let mut keyring = self.vault.keyring();
        for group in groups {
            // A shredded patient's studies are gone: they match nothing, and fail no query.
            let stored_header =
                match open_header(&mut keyring, &group.patient_ref, &group.header).await {
                    Ok(header) => header,
                    Err(RecordError::Shredded) => continue,
                    Err(error) => return Err(error),
                };
            let Some(header) = egress.header(stored_header) else {
                continue;
            };
            if !plan
                .post_filters
                .iter()
                .all(|criterion| criterion.matches(&json::all_text(&header, criterion.tag)))
            {
                continue;
            }
            if plan.page_in_memory && skipped < query.offset {
                skipped += 1;
                continue;
            }
            patient_refs.insert(group.patient_ref.clone());
            matches.push(self.render_match(query, &group, &header).await?);
            if plan.page_in_memory && matches.len() >= query.limit {
                break;
            }
        }
        self.journal_search(
            allowed.principal(),
            allowed.decided_by(),
            allowed.break_glass(),
            IMAGING_RESOURCE_TYPE,
            query_text,
            &patient_refs,
        )
        .await?;
        Ok(matches)
    }

    /// How DICOM data leaves for this caller: as stored, or (when Cedar grants only the
    /// de-identified view) under the profile `deidentification.toml` names for the role.
    async fn dicom_egress(
        &self,
        view: access::View,
        principal: &Principal,
    ) -> Result<DicomEgress, RecordError> {
        if !view.is_deidentified() {
            return Ok(DicomEgress::AsStored);
        }
        let policy = self.deidentification.current();
        let Some(profile) = policy.egress_profile(principal.role.as_str()).cloned() else {
            return Err(RecordError::NotInView(
                "DICOM data has no de-identification profile for this role ([egress] in deidentification.toml)".to_owned(),
            ));
        };
        let key = self.vault.deidentification_key().clone();
        Ok(DicomEgress::Deidentified(Arc::new(DeidentifiedEgress {
            profile,
            key,
        })))
    }

    /// Splits a query into SQL conditions on the index and matches done on decrypted headers.
    fn query_plan(&self, query: &QidoQuery, scope: &DicomScope, egress: &DicomEgress) -> QueryPlan {
        let blind = self.vault.blind_index();
        let mut conditions = Statement::new("");
        let mut post_filters = Vec::new();
        let mut needs_headers = false;
        let scoped = |statement: &mut Statement, column: &str, level: &str, uid: &str| {
            statement
                .push(&format!(" AND d.{} = ", egress.key_column(column)))
                .bind_text(&dicom_key(blind, level, uid));
        };
        if let Some(study) = &scope.study_uid {
            scoped(&mut conditions, "study_key", "study", study);
        }
        if let Some(series) = &scope.series_uid {
            scoped(&mut conditions, "series_key", "series", series);
        }
        if let Some(instance) = &scope.instance_uid {
            scoped(&mut conditions, "instance_key", "instance", instance);
        }
        for criterion in &query.criteria {
            let exact_in_sql = self.add_condition(&mut conditions, criterion, query.level, egress);
            if !exact_in_sql {
                needs_headers = true;
                post_filters.push(criterion.clone());
            }
        }
        QueryPlan {
            conditions,
            post_filters,
            page_in_memory: needs_headers,
        }
    }

    /// Adds what SQL can check of one criterion; `true` when SQL checks it exactly.
    fn add_condition(
        &self,
        conditions: &mut Statement,
        criterion: &Criterion,
        level: Level,
        egress: &DicomEgress,
    ) -> bool {
        let blind = self.vault.blind_index();
        let key_column = match criterion.tag {
            tags::STUDY_INSTANCE_UID => Some(("study_key", "study")),
            tags::SERIES_INSTANCE_UID => Some(("series_key", "series")),
            tags::SOP_INSTANCE_UID => Some(("instance_key", "instance")),
            _ => None,
        };
        if let Some((column, key_level)) = key_column {
            let uids = uids_of(&criterion.matcher);
            if uids.is_empty() {
                return false;
            }
            conditions
                .push(&format!(" AND d.{} IN ", egress.key_column(column)))
                .bind_text_list(
                    uids.iter()
                        .map(|uid| dicom_key(blind, key_level, uid))
                        .collect::<Vec<_>>()
                        .iter()
                        .map(String::as_str),
                );
            return true;
        }
        match criterion.tag {
            tags::STUDY_DATE => date_condition(conditions, &criterion.matcher),
            tags::SOP_CLASS_UID => {
                let uids = uids_of(&criterion.matcher);
                if uids.is_empty() {
                    return false;
                }
                conditions
                    .push(" AND d.sop_class_uid IN ")
                    .bind_text_list(uids.iter().map(String::as_str));
                true
            }
            tags::MODALITY | tags::MODALITIES_IN_STUDY => {
                let Some(modalities) = plain_values(&criterion.matcher) else {
                    return false;
                };
                if level == Level::Study {
                    conditions
                        .push(" AND d.study_key IN (SELECT study_key FROM dicom_instances WHERE modality IN ")
                        .bind_text_list(modalities.iter().map(String::as_str))
                        .push(")");
                } else {
                    conditions
                        .push(" AND d.modality IN ")
                        .bind_text_list(modalities.iter().map(String::as_str));
                }
                true
            }
            tags::SERIES_NUMBER | tags::INSTANCE_NUMBER => {
                let Matcher::Exact(text) = &criterion.matcher else {
                    return false;
                };
                let Ok(number) = text.trim().parse::<i64>() else {
                    return false;
                };
                let column = if criterion.tag == tags::SERIES_NUMBER {
                    "series_number"
                } else {
                    "instance_number"
                };
                conditions
                    .push(&format!(" AND d.{column} = "))
                    .bind_integer(number);
                true
            }
            tag => {
                self.narrow_by_study_tokens(conditions, tag, &criterion.matcher);
                false
            }
        }
    }

    /// Identifying attributes narrow to candidate studies through their tokens; the decrypted
    /// headers always decide (the caller answers `false`). A study's tokens are the union of
    /// every value its instances ever carried: an instance re-sent with a corrected PatientID
    /// leaves the old value's token behind, and a study may hold instances of two patients when
    /// one was misfiled, so the tokens alone would match the wrong patient's images.
    fn narrow_by_study_tokens(&self, conditions: &mut Statement, tag: Tag, matcher: &Matcher) {
        let Some((_, kind)) = TOKEN_ATTRIBUTES.iter().find(|(known, _)| *known == tag) else {
            return;
        };
        let blind = self.vault.blind_index();
        let keyword = keyword(tag);
        let tokens = match (kind, matcher) {
            (TokenKind::Exact, Matcher::Exact(value)) => {
                vec![dicom_exact_token(blind, &keyword, value)]
            }
            (TokenKind::Name, Matcher::Exact(value)) => name_words(value)
                .iter()
                .map(|word| dicom_prefix_token(blind, &keyword, word))
                .collect(),
            (TokenKind::Name, Matcher::Wildcard(pattern)) => {
                let literal: String = pattern
                    .chars()
                    .take_while(|c| *c != '*' && *c != '?')
                    .collect();
                let first_word = name_words(&literal).into_iter().next();
                match first_word {
                    Some(word) if !literal.ends_with(['^', ' ']) || !word.is_empty() => {
                        vec![dicom_prefix_token(blind, &keyword, &word)]
                    }
                    _ => return,
                }
            }
            _ => return,
        };
        for token in tokens {
            conditions
                .push(" AND d.study_key IN (SELECT resource_id FROM search_tokens WHERE resource_type = ")
                .bind_text(DICOM_STUDY)
                .push(" AND param = ")
                .bind_text(&keyword)
                .push(" AND token = ")
                .bind_text(&token)
                .push(")");
        }
    }

    /// The result groups (one row per study, series or instance) in a stable order: a page of
    /// them when SQL decides everything, else every candidate (bounded).
    async fn candidate_groups(
        &self,
        plan: &QueryPlan,
        query: &QidoQuery,
    ) -> Result<Vec<Group>, RecordError> {
        let group_column = match query.level {
            Level::Study => "d.study_key",
            Level::Series => "d.series_key",
            Level::Instance => "d.instance_key",
        };
        // The representative instance of a group: the first by key (stable).
        let mut statement = Statement::new(&format!(
            "SELECT {group_column}, MIN(d.instance_key) FROM dicom_instances d WHERE 1 = 1"
        ));
        statement.append(&plan.conditions);
        statement.push(&format!(" GROUP BY {group_column} ORDER BY {group_column}"));
        if plan.page_in_memory {
            statement.push(&format!(" LIMIT {}", MAX_QUERY_CANDIDATES + 1));
        } else {
            statement.push(&format!(" LIMIT {} OFFSET {}", query.limit, query.offset));
        }
        let rows = statement.fetch_all(self.database.pool()).await?;
        if plan.page_in_memory && rows.len() > MAX_QUERY_CANDIDATES {
            return Err(RecordError::TooBroad);
        }
        let representatives: Vec<String> = rows
            .iter()
            .map(|row| row.try_get::<String, _>(1))
            .collect::<Result<_, _>>()?;
        let mut by_key = BTreeMap::new();
        for chunk in representatives.chunks(500) {
            let mut select = Statement::new(
                "SELECT instance_key, series_key, study_key, patient_ref, header FROM dicom_instances WHERE instance_key IN ",
            );
            select.bind_text_list(chunk.iter().map(String::as_str));
            for row in select.fetch_all(self.database.pool()).await? {
                let instance_key: String = row.try_get(0)?;
                by_key.insert(
                    instance_key.clone(),
                    Group {
                        instance_key,
                        series_key: row.try_get(1)?,
                        study_key: row.try_get(2)?,
                        patient_ref: row.try_get(3)?,
                        header: row.try_get(4)?,
                    },
                );
            }
        }
        Ok(representatives
            .iter()
            .filter_map(|key| by_key.remove(key))
            .collect())
    }

    /// A result's attributes: the level's defaults (or what `includefield` names), the
    /// attributes the query matched or asked for, and the computed counts and modalities.
    async fn render_match(
        &self,
        query: &QidoQuery,
        group: &Group,
        header: &Value,
    ) -> Result<DicomMatch, RecordError> {
        let defaults = query.level.default_attributes();
        let asked: BTreeSet<Tag> = query
            .criteria
            .iter()
            .map(|criterion| criterion.tag)
            .chain(query.requested.iter().copied())
            .collect();
        let mut attributes = json::select(header, |tag| match &query.include {
            Include::All => !is_bulk(tag),
            Include::Default => defaults.contains(&tag) || asked.contains(&tag),
            Include::Tags(extra) => {
                defaults.contains(&tag) || asked.contains(&tag) || extra.contains(&tag)
            }
        });
        let study_uid = json::first_text(header, tags::STUDY_INSTANCE_UID).unwrap_or_default();
        let series_uid = json::first_text(header, tags::SERIES_INSTANCE_UID).unwrap_or_default();
        let instance_uid = json::first_text(header, tags::SOP_INSTANCE_UID).unwrap_or_default();
        match query.level {
            Level::Study => {
                attributes.retain(|key, _| json::tag_of_key(key).is_none_or(is_study_level));
                let (series, instances, modalities) = self.study_counts(&group.study_key).await?;
                json::put(
                    &mut attributes,
                    tags::MODALITIES_IN_STUDY,
                    "CS",
                    modalities.into_iter().map(Value::String).collect(),
                );
                json::put(
                    &mut attributes,
                    tags::NUMBER_OF_STUDY_RELATED_SERIES,
                    "IS",
                    vec![Value::from(series)],
                );
                json::put(
                    &mut attributes,
                    tags::NUMBER_OF_STUDY_RELATED_INSTANCES,
                    "IS",
                    vec![Value::from(instances)],
                );
            }
            Level::Series => {
                let instances = self.series_count(&group.series_key).await?;
                json::put(
                    &mut attributes,
                    tags::NUMBER_OF_SERIES_RELATED_INSTANCES,
                    "IS",
                    vec![Value::from(instances)],
                );
            }
            Level::Instance => {}
        }
        // Every result names its place in the hierarchy (a series its study, an instance its
        // series and study), whatever the include list.
        let uid_value = |uid: &str| vec![Value::String(uid.to_owned())];
        json::put(
            &mut attributes,
            tags::STUDY_INSTANCE_UID,
            "UI",
            uid_value(&study_uid),
        );
        if query.level != Level::Study {
            json::put(
                &mut attributes,
                tags::SERIES_INSTANCE_UID,
                "UI",
                uid_value(&series_uid),
            );
        }
        json::put(
            &mut attributes,
            tags::INSTANCE_AVAILABILITY,
            "CS",
            vec![Value::from("ONLINE")],
        );
        let _ = &group.instance_key;
        Ok(DicomMatch {
            study_uid,
            series_uid,
            instance_uid,
            attributes,
        })
    }

    async fn study_counts(&self, study_key: &str) -> Result<(i64, i64, Vec<String>), RecordError> {
        let row = sqlx::query(
            "SELECT COUNT(DISTINCT series_key), COUNT(*) FROM dicom_instances WHERE study_key = $1",
        )
        .bind(study_key)
        .fetch_one(self.database.pool())
        .await?;
        let modalities: Vec<(String,)> = sqlx::query_as(
            "SELECT DISTINCT modality FROM dicom_instances WHERE study_key = $1 AND modality IS NOT NULL ORDER BY modality",
        )
        .bind(study_key)
        .fetch_all(self.database.pool())
        .await?;
        Ok((
            row.try_get(0)?,
            row.try_get(1)?,
            modalities.into_iter().map(|(modality,)| modality).collect(),
        ))
    }

    async fn series_count(&self, series_key: &str) -> Result<i64, RecordError> {
        let (count,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM dicom_instances WHERE series_key = $1")
                .bind(series_key)
                .fetch_one(self.database.pool())
                .await?;
        Ok(count)
    }

    /// The instances a WADO-RS retrieval names (a study, a series or one instance), in series
    /// and instance-number order; journaled once per patient as a transfer that begins.
    pub async fn dicom_instances(
        &self,
        allowed: &Allowed<access::Read>,
        scope: &DicomScope,
    ) -> Result<Vec<RetrievableInstance>, RecordError> {
        let egress = self
            .dicom_egress(allowed.view(), allowed.principal())
            .await?;
        let blind = self.vault.blind_index();
        let mut statement = Statement::new(
            "SELECT instance_key, patient_ref, header, transfer_syntax_uid FROM dicom_instances d WHERE 1 = 1",
        );
        for (uid, column, level) in [
            (&scope.study_uid, "study_key", "study"),
            (&scope.series_uid, "series_key", "series"),
            (&scope.instance_uid, "instance_key", "instance"),
        ] {
            if let Some(uid) = uid {
                statement
                    .push(&format!(" AND d.{} = ", egress.key_column(column)))
                    .bind_text(&dicom_key(blind, level, uid));
            }
        }
        statement.push(" ORDER BY d.series_key, d.instance_number, d.instance_key");
        let rows = statement.fetch_all(self.database.pool()).await?;
        if rows.is_empty() {
            return Err(RecordError::NotFound);
        }
        let mut instances = Vec::with_capacity(rows.len());
        let mut patient_refs = BTreeSet::new();
        let mut withheld = false;
        let mut keyring = self.vault.keyring();
        for row in rows {
            let instance_key: String = row.try_get(0)?;
            let patient_ref: String = row.try_get(1)?;
            let header_ciphertext: Vec<u8> = row.try_get(2)?;
            let opener = match keyring.opener(&patient_ref).await {
                Ok(opener) => opener,
                Err(VaultError::PatientShredded) => continue,
                Err(error) => return Err(error.into()),
            };
            let header = opener.open_index_value(&header_ciphertext)?;
            let [burned_in, study_uid, series_uid, instance_uid] = json::first_texts_of(
                &header,
                [
                    tags::BURNED_IN_ANNOTATION,
                    tags::STUDY_INSTANCE_UID,
                    tags::SERIES_INSTANCE_UID,
                    tags::SOP_INSTANCE_UID,
                ],
            )
            .map_err(|_| RecordError::Damaged)?;
            let burned_in = burned_in.is_some_and(|flag| flag.eq_ignore_ascii_case("YES"));
            if burned_in && matches!(egress, DicomEgress::Deidentified(_)) {
                withheld = true;
                continue;
            }
            let in_view = |uid: Option<String>| egress.uid(&uid.unwrap_or_default());
            patient_refs.insert(patient_ref);
            instances.push(RetrievableInstance {
                key: RecordKey::new(DICOM_INSTANCE, &instance_key),
                opener,
                egress: egress.clone(),
                study_uid: in_view(study_uid),
                series_uid: in_view(series_uid),
                instance_uid: in_view(instance_uid),
                transfer_syntax_uid: row.try_get(3)?,
            });
        }
        if instances.is_empty() && withheld {
            return Err(RecordError::NotInView(
                "burned-in annotation: these instances are not served de-identified".to_owned(),
            ));
        }
        if instances.is_empty() {
            return Err(RecordError::Shredded);
        }
        let subtype = match egress {
            DicomEgress::AsStored => "retrieve",
            DicomEgress::Deidentified(_) => "retrieve-deidentified",
        };
        let drafts: Vec<AuditDraft> = patient_refs
            .iter()
            .map(|patient_ref| {
                AuditDraft::by(
                    allowed.principal(),
                    codes::INSTANCES_TRANSFERRED,
                    subtype,
                    'R',
                )
                .on(IMAGING_RESOURCE_TYPE, None)
                .for_patient(patient_ref)
                .decided_by(allowed.decided_by())
                .emergency(allowed.break_glass())
            })
            .collect();
        self.journal_many(drafts).await?;
        Ok(instances)
    }

    /// The Part 10 file of an instance the caller may retrieve, byte for byte as stored.
    pub async fn dicom_file(&self, instance: &RetrievableInstance) -> Result<Bytes, RecordError> {
        let stored = self.fetch_current(&instance.key).await?;
        let ciphertext = self.ciphertext_of(&stored).await?;
        let part10 = Bytes::from(instance.opener.decrypt(&ciphertext)?);
        let DicomEgress::Deidentified(egress) = &instance.egress else {
            return Ok(part10);
        };
        let egress = Arc::clone(egress);
        let deidentified = tokio::task::spawn_blocking(move || {
            deidentify::deidentify(&part10, &egress.profile, &egress.key)
        })
        .await
        .map_err(|_| RecordError::Damaged)?;
        match deidentified {
            Ok(deidentified) if !deidentified.quarantined => Ok(Bytes::from(deidentified.part10)),
            _ => Err(RecordError::NotInView(
                "this instance cannot be served de-identified".to_owned(),
            )),
        }
    }

    /// The headers of instances the caller may retrieve, in their order, each as the bytes of
    /// its DICOM JSON object (as stored, or de-identified for the caller's view): read
    /// [`HEADERS_PER_QUERY`] to a query and opened with the keys their listing looked up, and never parsed when served
    /// as stored, so a study's metadata costs a few queries and a copy whatever its size.
    pub async fn dicom_headers(
        &self,
        instances: &[RetrievableInstance],
    ) -> Result<Vec<Vec<u8>>, RecordError> {
        let mut headers = Vec::with_capacity(instances.len());
        for chunk in instances.chunks(HEADERS_PER_QUERY) {
            let mut select = Statement::new(
                "SELECT instance_key, header FROM dicom_instances WHERE instance_key IN ",
            );
            select.bind_text_list(
                chunk
                    .iter()
                    .map(|instance| instance.key.resource_id.as_str()),
            );
            let mut ciphertexts = BTreeMap::new();
            for row in select.fetch_all(self.database.pool()).await? {
                let ciphertext: Vec<u8> = row.try_get(1)?;
                ciphertexts.insert(row.try_get::<String, _>(0)?, ciphertext);
            }
            for instance in chunk {
                let ciphertext = ciphertexts
                    .remove(&instance.key.resource_id)
                    .ok_or(RecordError::NotFound)?;
                let stored = instance.opener.open_index_value(&ciphertext)?;
                let header = instance.egress.header_bytes(stored)?.ok_or_else(|| {
                    RecordError::NotInView(
                        "this instance cannot be served de-identified".to_owned(),
                    )
                })?;
                headers.push(header);
            }
        }
        Ok(headers)
    }

    /// Fills the de-identified view's keys of instances stored before they existed (run at
    /// start; instances of shredded patients get empty keys: nothing can name them again).
    pub async fn fill_deidentified_keys(&self) -> Result<u64, RecordError> {
        let key = self.vault.deidentification_key().clone();
        let mut filled = 0;
        loop {
            let rows = sqlx::query(
                "SELECT instance_key, patient_ref, header FROM dicom_instances WHERE deid_instance_key IS NULL LIMIT 200",
            )
            .fetch_all(self.database.pool())
            .await?;
            if rows.is_empty() {
                return Ok(filled);
            }
            let mut keyring = self.vault.keyring();
            for row in rows {
                let instance_key: String = row.try_get(0)?;
                let patient_ref: String = row.try_get(1)?;
                let ciphertext: Vec<u8> = row.try_get(2)?;
                let keys = match open_header(&mut keyring, &patient_ref, &ciphertext).await {
                    Ok(header) => {
                        let uid = |tag| json::first_text(&header, tag).unwrap_or_default();
                        deidentified_keys(
                            self.vault.blind_index(),
                            &key,
                            &uid(tags::STUDY_INSTANCE_UID),
                            &uid(tags::SERIES_INSTANCE_UID),
                            &uid(tags::SOP_INSTANCE_UID),
                        )
                    }
                    Err(RecordError::Shredded) => DeidentifiedKeys {
                        study_key: String::new(),
                        series_key: String::new(),
                        instance_key: String::new(),
                    },
                    Err(error) => return Err(error),
                };
                sqlx::query(
                    "UPDATE dicom_instances SET deid_study_key = $1, deid_series_key = $2, deid_instance_key = $3 WHERE instance_key = $4",
                )
                .bind(&keys.study_key)
                .bind(&keys.series_key)
                .bind(&keys.instance_key)
                .bind(&instance_key)
                .execute(self.database.pool())
                .await?;
                filled += 1;
            }
        }
    }

    /// Records that a principal was refused a DICOM association or request (no PHI).
    pub async fn journal_dicom_refusal(
        &self,
        principal: &Principal,
        reason: &str,
    ) -> Result<(), RecordError> {
        let draft = AuditDraft::by(principal, codes::SECURITY_ALERT, "dicom-association", 'E')
            .failed(crate::journal::Outcome::MinorFailure)
            .because(reason);
        self.journal(draft).await
    }
}

/// How a query runs.
struct QueryPlan {
    conditions: Statement,
    /// Criteria checked on decrypted headers.
    post_filters: Vec<Criterion>,
    /// Whether paging happens after the header checks (some criterion is not decided by SQL).
    page_in_memory: bool,
}

struct Group {
    instance_key: String,
    series_key: String,
    study_key: String,
    patient_ref: String,
    header: Vec<u8>,
}

/// An instance's stored header (DICOM JSON), opened with the read's keyring.
async fn open_header(
    keyring: &mut PatientKeyring<'_>,
    patient_ref: &str,
    ciphertext: &[u8],
) -> Result<Value, RecordError> {
    let plaintext = keyring.open_index_value(patient_ref, ciphertext).await?;
    serde_json::from_slice(&plaintext).map_err(|_| RecordError::Damaged)
}

/// The tokens of an instance's identifying attributes (all patient or study level), which the
/// index keeps once per study.
fn study_token_rows(
    blind: &crate::vault::BlindIndex,
    attributes: &IndexedAttributes,
) -> Vec<TokenRow> {
    let mut rows = Vec::new();
    for (tag, value) in &attributes.tokens {
        let Some((_, kind)) = TOKEN_ATTRIBUTES.iter().find(|(known, _)| known == tag) else {
            continue;
        };
        rows.extend(dicom_token_rows(blind, &keyword(*tag), *kind, value));
    }
    rows.sort();
    rows.dedup();
    rows
}

fn keyword(tag: Tag) -> String {
    use dicom_core::dictionary::DataDictionary;
    dicom_dictionary_std::StandardDataDictionary
        .by_tag(tag)
        .map(|entry| entry.alias.to_owned())
        .unwrap_or_else(|| format!("{:04X}{:04X}", tag.group(), tag.element()))
}

fn uids_of(matcher: &Matcher) -> Vec<String> {
    match matcher {
        Matcher::Exact(uid) => vec![uid.clone()],
        Matcher::UidList(uids) => uids.clone(),
        _ => Vec::new(),
    }
}

/// Exact values a matcher names (a single value, or a backslash-separated list).
fn plain_values(matcher: &Matcher) -> Option<Vec<String>> {
    match matcher {
        Matcher::Exact(value) => Some(
            value
                .split('\\')
                .map(|part| part.trim().to_owned())
                .collect(),
        ),
        Matcher::UidList(values) => Some(values.clone()),
        _ => None,
    }
}

fn date_condition(conditions: &mut Statement, matcher: &Matcher) -> bool {
    use glastonbury_dicom::attributes::date_number;
    match matcher {
        Matcher::Exact(value) => match date_number(value) {
            Some(date) => {
                conditions.push(" AND d.study_date = ").bind_integer(date);
                true
            }
            None => false,
        },
        Matcher::Range { low, high } => {
            let low = low.as_deref().map(date_number);
            let high = high.as_deref().map(date_number);
            if matches!(low, Some(None)) || matches!(high, Some(None)) {
                return false;
            }
            if let Some(Some(low)) = low {
                conditions.push(" AND d.study_date >= ").bind_integer(low);
            }
            if let Some(Some(high)) = high {
                conditions.push(" AND d.study_date <= ").bind_integer(high);
            }
            true
        }
        _ => false,
    }
}

/// Attributes of the patient and study modules (what a study-level result carries).
fn is_study_level(tag: Tag) -> bool {
    glastonbury_dicom::qido::STUDY_ATTRIBUTES.contains(&tag)
        || tag.group() == 0x0010
        || matches!(
            tag,
            tags::STUDY_DATE
                | tags::STUDY_TIME
                | tags::ACCESSION_NUMBER
                | tags::REFERRING_PHYSICIAN_NAME
                | tags::STUDY_DESCRIPTION
                | tags::STUDY_ID
                | tags::ISSUER_OF_PATIENT_ID
        )
}

/// Values never inlined in query results.
fn is_bulk(tag: Tag) -> bool {
    matches!(tag, tags::PIXEL_DATA) || tag.group() & 0xFF00 == 0x6000 && tag.element() == 0x3000
}

/// The error of a header (or part of one) that cannot be written as DICOM JSON.
pub(super) fn header_not_rendered<E>(_: E) -> RecordError {
    RecordError::Invalid("the header cannot be rendered as DICOM JSON".to_owned())
}
