//! The FHIR ImagingStudy of each DICOM study, derived from the imaging index after instances of
//! the study are stored (the record-stored events are the trigger), so FHIR clients find the
//! studies the DICOM gateway holds: identifier, subject, start, modalities, series and instances.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use glastonbury_dicom::{Instance, json};
use serde_json::{Value, json as json_value};
use sqlx::Row;
use tokio::sync::{broadcast, mpsc};

use super::dicom::header_not_rendered;
use super::patient_owners::RememberedOwner;
use super::search_index::patient_identifier_token;
use super::writer::Precondition;
use super::{PreparedWrite, RecordBody, RecordError, RecordKey, RecordStored, Records};
use crate::access::{Principal, Role};
use crate::journal::{AuditDraft, codes};
use crate::vault::{PatientKeyring, VaultError};

/// The most instances listed in one ImagingStudy (larger studies list their series only).
const MAX_LISTED_INSTANCES: usize = 10_000;

/// Instances a rebuild reads per query.
const ROWS_PER_READ: usize = 1000;

/// How long stores of one study are gathered before its ImagingStudy is rebuilt.
/// A study is rebuilt once its instances have stopped arriving for this long…
const QUIET: Duration = Duration::from_millis(500);

/// …or after this long, when they keep arriving (a modality streaming a large study).
const MAX_GATHER: Duration = Duration::from_secs(10);

/// The appliance itself, as the author of derived records.
fn appliance_principal() -> Principal {
    Principal {
        id: "appliance".to_owned(),
        ..Principal::local_operator(Role::Admin, "HOPERAT")
    }
}

/// What the derivation keeps of one stored instance: the values an ImagingStudy lists. Its
/// header is parsed, read and dropped, so a large study is never held as parsed JSON (holding
/// 1000 headers made the allocator fault in and zero fresh pages, over half of the rebuild's CPU).
struct IndexedInstance {
    series_key: String,
    patient_ref: String,
    listed: ListedValues,
}

/// What a rebuild reads of a study: the instances it lists (at most [`MAX_LISTED_INSTANCES`]),
/// the first one's whole header, and how many the study has.
struct StudyInstances {
    listed: Vec<IndexedInstance>,
    first_header: Value,
    total: usize,
}

/// The instance and series values of one instance's header that an ImagingStudy lists.
#[derive(Debug, PartialEq)]
struct ListedValues {
    sop_instance_uid: Option<String>,
    sop_class_uid: Option<String>,
    instance_number: Option<u32>,
    modality: Option<String>,
    series_instance_uid: Option<String>,
    series_number: Option<u32>,
    series_description: Option<String>,
}

/// The attributes of an instance that its study's ImagingStudy lists, in [`ListedValues`]' order.
const LISTED_TAGS: [Tag; 7] = [
    tags::SOP_INSTANCE_UID,
    tags::SOP_CLASS_UID,
    tags::INSTANCE_NUMBER,
    tags::MODALITY,
    tags::SERIES_INSTANCE_UID,
    tags::SERIES_NUMBER,
    tags::SERIES_DESCRIPTION,
];

/// The DICOM JSON of the attributes an ImagingStudy lists of this instance, stored (sealed)
/// beside its header: a rebuild then opens a few hundred bytes per instance instead of the whole
/// header (about 14 KB for a CT slice).
pub(super) fn listed_values_json(instance: &Instance) -> Result<Vec<u8>, RecordError> {
    json::selected_json_bytes(&instance.header, &LISTED_TAGS).map_err(header_not_rendered)
}

impl ListedValues {
    /// The listed values of stored DICOM JSON bytes (an instance's listed values, or its whole
    /// header), read without parsing the rest.
    fn from_stored(header: &[u8]) -> Result<Self, RecordError> {
        let [
            sop_instance_uid,
            sop_class_uid,
            instance_number,
            modality,
            series_instance_uid,
            series_number,
            series_description,
        ] = json::first_texts_of(header, LISTED_TAGS).map_err(|_| RecordError::Damaged)?;
        Ok(Self {
            sop_instance_uid,
            sop_class_uid,
            instance_number: number(instance_number),
            modality,
            series_instance_uid,
            series_number: number(series_number),
            series_description,
        })
    }
}

/// Opens an index value sealed to the patient; `None` when the patient was crypto-shredded (the
/// study is then not rebuilt).
async fn open_unless_shredded(
    keyring: &mut PatientKeyring<'_>,
    patient_ref: &str,
    ciphertext: &[u8],
) -> Result<Option<Vec<u8>>, RecordError> {
    match keyring.open_index_value(patient_ref, ciphertext).await {
        Ok(plaintext) => Ok(Some(plaintext)),
        Err(VaultError::PatientShredded) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

/// A listed number (instance, series) from its text.
fn number(text: Option<String>) -> Option<u32> {
    text.and_then(|text| text.trim().parse::<u32>().ok())
}

impl Records {
    /// The stored instances of a study as a rebuild reads them, a page of rows at a time (a
    /// large study is never held as rows at once); `None` when the study has none or its
    /// patient was shredded.
    async fn read_study_instances(
        &self,
        study_key: &str,
    ) -> Result<Option<StudyInstances>, RecordError> {
        let mut keyring = self.vault.keyring();
        // The study-level values come from the first instance's header, read whole.
        let first: Option<(String, Vec<u8>)> = sqlx::query_as(
            "SELECT patient_ref, header FROM dicom_instances WHERE study_key = $1 \
             ORDER BY series_key, instance_number, instance_key LIMIT 1",
        )
        .bind(study_key)
        .fetch_optional(self.database.pool())
        .await?;
        let Some((first_patient_ref, first_ciphertext)) = first else {
            return Ok(None);
        };
        let Some(first_plaintext) =
            open_unless_shredded(&mut keyring, &first_patient_ref, &first_ciphertext).await?
        else {
            return Ok(None);
        };
        let first_header =
            serde_json::from_slice::<Value>(&first_plaintext).map_err(|_| RecordError::Damaged)?;
        let total: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM dicom_instances WHERE study_key = $1")
                .bind(study_key)
                .fetch_one(self.database.pool())
                .await?;
        // Each instance's listed values, read a page of rows at a time (a row streamed alone
        // costs two thread wake-ups, most of a rebuild's CPU once the values were small); its
        // whole header only for rows stored before the values were kept apart.
        let mut listed = Vec::new();
        while listed.len() < MAX_LISTED_INSTANCES {
            let page = ROWS_PER_READ.min(MAX_LISTED_INSTANCES - listed.len());
            let rows = sqlx::query(
                "SELECT series_key, patient_ref, \
                 COALESCE(listed_values, header) FROM dicom_instances WHERE study_key = $1 \
                 ORDER BY series_key, instance_number, instance_key LIMIT $2 OFFSET $3",
            )
            .bind(study_key)
            .bind(i64::try_from(page).unwrap_or(i64::MAX))
            .bind(i64::try_from(listed.len()).unwrap_or(i64::MAX))
            .fetch_all(self.database.pool())
            .await?;
            for row in &rows {
                let patient_ref: String = row.try_get(1)?;
                let ciphertext: Vec<u8> = row.try_get(2)?;
                let Some(plaintext) =
                    open_unless_shredded(&mut keyring, &patient_ref, &ciphertext).await?
                else {
                    return Ok(None);
                };
                listed.push(IndexedInstance {
                    series_key: row.try_get(0)?,
                    patient_ref,
                    listed: ListedValues::from_stored(&plaintext)?,
                });
            }
            if rows.len() < page {
                break;
            }
        }
        if listed.is_empty() {
            return Ok(None);
        }
        Ok(Some(StudyInstances {
            listed,
            first_header,
            total: usize::try_from(total).unwrap_or(usize::MAX),
        }))
    }

    /// Rebuilds the ImagingStudy of the study `study_key` from its stored instances; journaled
    /// as a derivation by the appliance.
    pub async fn derive_imaging_study(&self, study_key: &str) -> Result<(), RecordError> {
        let Some(study) = self.read_study_instances(study_key).await? else {
            return Ok(());
        };
        let Some(first) = study.listed.first() else {
            return Ok(());
        };
        let first_header = &study.first_header;
        let patient_id = json::first_text(first_header, tags::PATIENT_ID);
        let issuer = json::first_text(first_header, tags::ISSUER_OF_PATIENT_ID).unwrap_or_default();
        let fhir_patient = match &patient_id {
            Some(patient_id) => self.fhir_patient_with_identifier(patient_id).await?,
            None => None,
        };
        let resource = imaging_study(
            study_key,
            first_header,
            &study.listed,
            fhir_patient.as_deref(),
            study.total,
        );
        // The study's key: the FHIR Patient's when linked, else the DICOM-only patient's (the
        // same one its instances are encrypted to).
        let record_patient = fhir_patient
            .clone()
            .or_else(|| patient_id.as_ref().map(|id| format!("dicom:{issuer}|{id}")));
        let body = RecordBody::fhir(record_patient, "ImagingStudy", &resource);
        let patient_ref = self.vault.patient_ref(body.patient_id.as_deref());
        if patient_ref != first.patient_ref {
            tracing::warn!(
                "imaging study derivation skipped: its patient key differs from its instances'"
            );
            return Ok(());
        }
        let index = super::search_index::index_rows(
            self.vault.blind_index(),
            "ImagingStudy",
            &body.search_index,
        );
        let key = RecordKey::new("ImagingStudy", study_key);
        let row = self
            .encrypted_row(
                &key,
                &patient_ref,
                body.content_type,
                &body.body,
                Precondition::None,
                index,
            )
            .await?;
        let draft = AuditDraft::by(
            &appliance_principal(),
            codes::PATIENT_RECORD,
            "derive-imaging-study",
            'U',
        )
        .on("ImagingStudy", Some(study_key))
        .for_patient(&patient_ref);
        self.commit_one(PreparedWrite { key, row, draft }).await?;
        Ok(())
    }

    /// The FHIR Patient whose identifier (any system) is `value`, when exactly one has it.
    pub(super) async fn fhir_patient_with_identifier(
        &self,
        value: &str,
    ) -> Result<Option<String>, RecordError> {
        let token = patient_identifier_token(self.vault.blind_index(), value);
        let started = match self.patient_owners.recall(&token) {
            RememberedOwner::Known(owner) => return Ok(owner),
            RememberedOwner::Unknown(started) => started,
        };
        let owners: Vec<(String,)> = sqlx::query_as(
            "SELECT DISTINCT resource_id FROM search_tokens WHERE token = $1 AND resource_type = 'Patient' AND param = 'identifier' LIMIT 2",
        )
        .bind(&token)
        .fetch_all(self.database.pool())
        .await?;
        let owner = match owners.as_slice() {
            [(id,)] => Some(id.clone()),
            _ => None,
        };
        self.patient_owners.remember(&token, owner.clone(), started);
        Ok(owner)
    }

    /// Keeps every study's ImagingStudy current: gathers the studies of stored instances until
    /// they stop arriving for a moment (at most ten seconds), then rebuilds each once. Runs
    /// until the process ends. Gathering goes on while a rebuild runs, so a long rebuild does
    /// not make it miss the stores that arrive meanwhile.
    pub async fn derive_imaging_studies(self: Arc<Self>) {
        let (gathered, mut to_rebuild) = mpsc::unbounded_channel();
        tokio::spawn(gather_stored_studies(self.subscribe(), gathered));
        while let Some(mut study_keys) = to_rebuild.recv().await {
            // Studies gathered while the last ones were rebuilt: each is rebuilt once.
            while let Ok(more) = to_rebuild.try_recv() {
                study_keys.extend(more);
            }
            for study_key in study_keys {
                if let Err(error) = self.derive_imaging_study(&study_key).await {
                    tracing::error!(error = %error, "imaging study not derived");
                }
            }
        }
    }
}

/// Sends the studies of stored DICOM instances, one set per burst of stores: a burst ends when
/// stores stop arriving for [`QUIET`] or after [`MAX_GATHER`], so a burst of C-STOREs costs one
/// rebuild per study, not one per instance.
async fn gather_stored_studies(
    mut stored: broadcast::Receiver<RecordStored>,
    gathered: mpsc::UnboundedSender<BTreeSet<String>>,
) {
    loop {
        let Some(first) = next_stored_study(&mut stored).await else {
            return;
        };
        let mut study_keys = BTreeSet::from([first]);
        let last_chance = tokio::time::Instant::now() + MAX_GATHER;
        loop {
            let deadline = (tokio::time::Instant::now() + QUIET).min(last_chance);
            match tokio::time::timeout_at(deadline, stored.recv()).await {
                Ok(Ok(event)) => study_keys.extend(event.study_key),
                Ok(Err(broadcast::error::RecvError::Lagged(missed))) => {
                    warn_of_missed_stores(missed)
                }
                Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => break,
            }
            if tokio::time::Instant::now() >= last_chance {
                break;
            }
        }
        if gathered.send(study_keys).is_err() {
            return;
        }
    }
}

/// The study of the next stored DICOM instance; `None` once no more records can be stored.
async fn next_stored_study(stored: &mut broadcast::Receiver<RecordStored>) -> Option<String> {
    loop {
        match stored.recv().await {
            Ok(RecordStored {
                study_key: Some(study_key),
                ..
            }) => return Some(study_key),
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(missed)) => warn_of_missed_stores(missed),
            Err(broadcast::error::RecvError::Closed) => return None,
        }
    }
}

/// The gatherer fell so far behind that stored-record events were dropped: the studies they
/// named are rebuilt only when another of their instances is stored.
fn warn_of_missed_stores(missed: u64) {
    tracing::warn!(
        missed,
        "imaging study gatherer fell behind; studies stored meanwhile are rebuilt at their next store"
    );
}

/// The ImagingStudy resource of a study's instances (those listed; `total` counts them all),
/// with the study-level values of `first_header`.
fn imaging_study(
    study_key: &str,
    first_header: &Value,
    instances: &[IndexedInstance],
    fhir_patient: Option<&str>,
    total: usize,
) -> Value {
    let text = |tag| json::first_text(first_header, tag);
    let mut series: BTreeMap<&str, Vec<&ListedValues>> = BTreeMap::new();
    for instance in instances {
        series
            .entry(&instance.series_key)
            .or_default()
            .push(&instance.listed);
    }
    let mut modalities: Vec<String> = instances
        .iter()
        .filter_map(|instance| instance.listed.modality.clone())
        .collect();
    modalities.sort();
    modalities.dedup();
    let subject = match fhir_patient {
        Some(id) => json_value!({"reference": format!("Patient/{id}")}),
        None => {
            let mut identifier = json_value!({"value": text(tags::PATIENT_ID).unwrap_or_else(|| "unknown".to_owned())});
            if let Some(issuer) = text(tags::ISSUER_OF_PATIENT_ID) {
                identifier["system"] = Value::String(format!("urn:dicom:issuer:{issuer}"));
            }
            json_value!({"identifier": identifier})
        }
    };
    let series_entries: Vec<Value> = series
        .values()
        .map(|listed| {
            let head = listed[0];
            let mut entry = json_value!({
                "uid": head.series_instance_uid.clone().unwrap_or_default(),
                "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM",
                             "code": head.modality.clone().unwrap_or_else(|| "OT".to_owned())},
                "numberOfInstances": listed.len(),
                "instance": listed.iter().map(|values| {
                    let mut instance = json_value!({
                        "uid": values.sop_instance_uid.clone().unwrap_or_default(),
                        "sopClass": {"system": "urn:ietf:rfc:3986",
                                     "code": format!("urn:oid:{}", values.sop_class_uid.as_deref().unwrap_or_default())},
                    });
                    if let Some(number) = values.instance_number {
                        instance["number"] = Value::from(number);
                    }
                    instance
                }).collect::<Vec<_>>(),
            });
            if let Some(number) = head.series_number {
                entry["number"] = Value::from(number);
            }
            if let Some(description) = &head.series_description {
                entry["description"] = Value::String(description.clone());
            }
            entry
        })
        .collect();
    let mut resource = json_value!({
        "resourceType": "ImagingStudy",
        "id": study_key,
        "identifier": [{"system": "urn:dicom:uid",
                        "value": format!("urn:oid:{}", text(tags::STUDY_INSTANCE_UID).unwrap_or_default())}],
        "status": "available",
        "subject": subject,
        "modality": modalities.iter().map(|code| json_value!({"system": "http://dicom.nema.org/resources/ontology/DCM", "code": code})).collect::<Vec<_>>(),
        "numberOfSeries": series_entries.len(),
        "numberOfInstances": total,
        "series": series_entries,
    });
    if let (Some(accession), Some(identifiers)) = (
        text(tags::ACCESSION_NUMBER),
        resource["identifier"].as_array_mut(),
    ) {
        identifiers.push(json_value!({
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
            "value": accession,
        }));
    }
    if let Some(started) = text(tags::STUDY_DATE).and_then(|date| fhir_date(&date)) {
        resource["started"] = Value::String(started);
    }
    if let Some(description) = text(tags::STUDY_DESCRIPTION) {
        resource["description"] = Value::String(description);
    }
    resource
}

/// DICOM `YYYYMMDD` as a FHIR date. (Study Time has no zone, and a FHIR dateTime with a time
/// needs one, so the start is given to the day.)
fn fhir_date(date: &str) -> Option<String> {
    let digits: String = date.chars().filter(char::is_ascii_digit).collect();
    if digits.len() != 8 {
        return None;
    }
    Some(format!(
        "{}-{}-{}",
        &digits[..4],
        &digits[4..6],
        &digits[6..8]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_values_kept_apart_read_as_those_of_the_whole_header() {
        let stored = br#"{"00080016":{"vr":"UI","Value":["1.2.840.10008.5.1.4.1.1.2"]},"00080018":{"vr":"UI","Value":["1.2.3.4"]},"00080060":{"vr":"CS","Value":["CT"]},"0008103E":{"vr":"LO","Value":["AXIAL 5mm"]},"00100010":{"vr":"PN","Value":[{"Alphabetic":"Doe^Jane"}]},"0020000E":{"vr":"UI","Value":["1.2.3"]},"00200011":{"vr":"IS","Value":[7]},"00200013":{"vr":"IS","Value":[" 12 "]},"00281050":{"vr":"DS","Value":[40.5]}}"#;
        let header = json::header_from_json(&serde_json::from_slice(stored).unwrap()).unwrap();
        let kept_apart = json::selected_json_bytes(&header, &LISTED_TAGS).unwrap();
        let read = ListedValues::from_stored(stored).unwrap();
        assert_eq!(ListedValues::from_stored(&kept_apart).unwrap(), read);
        assert!(!String::from_utf8_lossy(&kept_apart).contains("Doe^Jane"));
        assert_eq!(read.sop_instance_uid.as_deref(), Some("1.2.3.4"));
        assert_eq!(read.series_number, Some(7));
        assert_eq!(read.instance_number, Some(12));
        assert_eq!(read.series_description.as_deref(), Some("AXIAL 5mm"));
    }

    fn stored(resource_type: &str, study_key: Option<&str>) -> RecordStored {
        RecordStored {
            meta: super::super::RecordVersion {
                key: RecordKey::new(resource_type, "some-id"),
                version: 1,
                last_updated: 0,
                deleted: false,
            },
            patient_ref: "Patient/p".to_owned(),
            study_key: study_key.map(str::to_owned),
        }
    }

    #[tokio::test]
    async fn a_burst_of_stores_is_gathered_into_one_set_of_studies_and_other_records_are_ignored() {
        let (events, receiver) = broadcast::channel(16);
        let (gathered, mut sets) = mpsc::unbounded_channel();
        let gatherer = tokio::spawn(gather_stored_studies(receiver, gathered));
        events.send(stored("Patient", None)).unwrap();
        events
            .send(stored("DicomInstance", Some("study-a")))
            .unwrap();
        events
            .send(stored("DicomInstance", Some("study-b")))
            .unwrap();
        events.send(stored("Observation", None)).unwrap();
        events
            .send(stored("DicomInstance", Some("study-a")))
            .unwrap();
        let burst = sets.recv().await.expect("the burst is gathered");
        assert_eq!(
            burst,
            BTreeSet::from(["study-a".to_owned(), "study-b".to_owned()])
        );
        events
            .send(stored("DicomInstance", Some("study-c")))
            .unwrap();
        let next = sets.recv().await.expect("the next burst is gathered");
        assert_eq!(next, BTreeSet::from(["study-c".to_owned()]));
        drop(events);
        gatherer
            .await
            .expect("the gatherer ends when no more records can be stored");
        assert!(sets.recv().await.is_none());
    }

    #[tokio::test]
    async fn a_gatherer_that_fell_behind_goes_on_with_the_stores_it_still_has() {
        let (events, receiver) = broadcast::channel(2);
        let (gathered, mut sets) = mpsc::unbounded_channel();
        for study in ["study-a", "study-b", "study-c", "study-d"] {
            events.send(stored("DicomInstance", Some(study))).unwrap();
        }
        tokio::spawn(gather_stored_studies(receiver, gathered));
        let burst = sets.recv().await.expect("the burst is gathered");
        assert_eq!(
            burst,
            BTreeSet::from(["study-c".to_owned(), "study-d".to_owned()])
        );
    }

    #[test]
    fn listed_values_of_a_header_without_them_are_empty_and_damage_is_an_error() {
        let read = ListedValues::from_stored(br#"{"00080060":{"vr":"CS"}}"#).unwrap();
        assert_eq!(read.modality, None);
        assert_eq!(read.sop_instance_uid, None);
        assert!(ListedValues::from_stored(b"{\"0008").is_err());
    }
}
