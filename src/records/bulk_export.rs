//! FHIR Bulk Data export (`$export`, asynchronous pattern) on the record path: a job per kick-off
//! that writes each allowed resource type's current records as NDJSON files, each file encrypted
//! to the job's own key, served only to the client that asked, and destroyed (blobs deleted, key
//! shredded) when the job expires or is cancelled. Every patient whose data lands in a file gets
//! an Export leaf (DCM 110106) in the journal.

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use glastonbury_fhir::SearchParameters;
use sqlx::Row;

use super::{Record, RecordError, RecordKey, Records};
use crate::access::{self, Allowed, Principal};
use crate::journal::{AuditDraft, codes};
use crate::storage::now_micros;
use crate::storage::statement::Statement;
use crate::vault::NO_PATIENT;

/// How long a finished export's files stay available (the manifest's `Expires`).
pub const DEFAULT_EXPORT_EXPIRY_SECONDS: u64 = 3600;

/// Exports one client may have running at once; more are refused with "try later".
pub const MAX_RUNNING_EXPORTS_PER_CLIENT: i64 = 3;

/// A file is closed (encrypted and stored) once it holds this many resources or bytes.
const RESOURCES_PER_FILE: usize = 50_000;
const BYTES_PER_FILE: usize = 64 * 1024 * 1024;

/// Records read and decrypted per step; progress and cancellation are checked between steps.
const RECORDS_PER_STEP: usize = 500;

/// A running job that has not reported progress for this long died with its process.
const STALE_AFTER_MICROS: i64 = 120 * 1_000_000;

/// The most patients a Group export may name.
pub const MAX_GROUP_MEMBERS: usize = 10_000;

/// Which records an export covers (the three kick-off endpoints).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportScope {
    /// `[base]/$export`: every record of the exported types.
    System,
    /// `[base]/Patient/$export`: records that belong to a patient.
    Patients,
    /// `[base]/Group/{id}/$export`: records of the group's member patients.
    Group(String),
}

/// A kick-off request, as the surface parsed it.
#[derive(Debug, Clone)]
pub struct ExportRequest {
    pub scope: ExportScope,
    /// `_type`: the types to export; `None` means every type the caller may export.
    pub types: Option<Vec<String>>,
    /// `_since`: only records changed at or after this time (Unix microseconds).
    pub since: Option<i64>,
    /// `_typeFilter`: per type, searches of which a record must match at least one.
    pub type_filters: Vec<(String, glastonbury_fhir::query::SearchRequest)>,
    /// The kick-off URL, echoed in the manifest (sealed at rest).
    pub request_url: String,
}

/// Writes one record as one NDJSON line (the surface owns the format).
pub type ExportRenderer = Arc<dyn Fn(&Record) -> Vec<u8> + Send + Sync>;

/// One finished file of an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportFile {
    pub resource_type: String,
    pub file_name: String,
    pub count: i64,
}

/// Where an export stands, for the status endpoint.
#[derive(Debug, Clone)]
pub enum ExportStatus {
    InProgress {
        progress: String,
    },
    Completed {
        transaction_time: i64,
        expires_at: i64,
        request_url: String,
        files: Vec<ExportFile>,
    },
    Failed {
        reason: String,
    },
}

/// What one job does, decided at kick-off.
struct ExportPlan {
    job_id: String,
    key_ref: String,
    grants: Vec<Allowed<access::Export>>,
    type_filters: Vec<(String, glastonbury_fhir::query::SearchRequest)>,
    patients: PatientFilter,
    since: Option<i64>,
    render: ExportRenderer,
}

enum PatientFilter {
    Everyone,
    AnyPatient,
    Only(Vec<String>),
}

/// The vault key a job's request and files are encrypted to.
fn export_key_ref(job_id: &str) -> String {
    format!("bulk-export:{job_id}")
}

const IN_PROGRESS: &str = "in-progress";
const COMPLETED: &str = "completed";
const FAILED: &str = "failed";
const CANCELLED: &str = "cancelled";

impl Records {
    /// Authorizes and starts an export; returns the job id. Named types the caller may not
    /// export are refused (and journaled); without `_type`, the export covers what it may.
    pub async fn start_export(
        self: &Arc<Self>,
        caller: &Arc<Principal>,
        request: ExportRequest,
        render: ExportRenderer,
    ) -> Result<String, RecordError> {
        let grants = self.export_grants(caller, request.types.as_deref()).await?;
        let patients = match &request.scope {
            ExportScope::System => PatientFilter::Everyone,
            ExportScope::Patients => PatientFilter::AnyPatient,
            ExportScope::Group(group_id) => {
                PatientFilter::Only(self.group_member_refs(caller, group_id).await?)
            }
        };
        self.refuse_when_busy(&caller.id).await?;
        let job_id = uuid::Uuid::new_v4().to_string();
        let key_ref = export_key_ref(&job_id);
        let sealed_request = self
            .vault
            .encrypt_for_patient(&key_ref, request.request_url.as_bytes())
            .await?;
        let now = now_micros();
        sqlx::query(
            "INSERT INTO bulk_exports (job_id, client_id, state, sealed_request, transaction_time, updated_at, progress) \
             VALUES ($1, $2, $3, $4, $5, $5, $6)",
        )
        .bind(&job_id)
        .bind(&caller.id)
        .bind(IN_PROGRESS)
        .bind(sealed_request)
        .bind(now)
        .bind("accepted")
        .execute(self.database.pool())
        .await?;
        self.journal_export_request(&grants, &request).await?;
        let plan = ExportPlan {
            job_id: job_id.clone(),
            key_ref,
            grants,
            type_filters: request.type_filters.clone(),
            patients,
            since: request.since,
            render,
        };
        let records = Arc::clone(self);
        tokio::spawn(async move { records.run_export(plan).await });
        Ok(job_id)
    }

    async fn export_grants(
        &self,
        caller: &Arc<Principal>,
        types: Option<&[String]>,
    ) -> Result<Vec<Allowed<access::Export>>, RecordError> {
        let mut grants = Vec::new();
        match types {
            Some(types) => {
                for resource_type in types {
                    grants.push(
                        self.authorize::<access::Export>(caller, resource_type)
                            .await?,
                    );
                }
            }
            None => grants.extend(SearchParameters::r4().resource_types().filter_map(
                |resource_type| self.permitted::<access::Export>(caller, resource_type),
            )),
        }
        if grants.is_empty() {
            // Journal the refusal the way any denial is journaled.
            self.authorize::<access::Export>(caller, "Patient").await?;
        }
        Ok(grants)
    }

    /// The patients a Group names (`member.entity` references to Patient), read as the caller
    /// (in a de-identified view the group id is a pseudonym).
    async fn group_member_refs(
        &self,
        caller: &Arc<Principal>,
        group_id: &str,
    ) -> Result<Vec<String>, RecordError> {
        let allowed = self.authorize::<access::Read>(caller, "Group").await?;
        let group_id = self.id_in_view(allowed.view(), "Group", group_id).await?;
        let key = RecordKey::new("Group", &group_id);
        let head = self.head(&key).await?.ok_or(RecordError::NotFound)?;
        let group = self
            .read_version_audited(&allowed, &key, head.version, "read")
            .await?;
        let resource: serde_json::Value =
            serde_json::from_slice(&group.body).map_err(|_| RecordError::Damaged)?;
        let members: BTreeSet<String> = resource["member"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|member| member["entity"]["reference"].as_str())
            .map(glastonbury_fhir::extract::normalize_reference)
            .filter_map(|reference| reference.strip_prefix("Patient/").map(str::to_owned))
            .map(|patient_id| self.vault.patient_ref(Some(&patient_id)))
            .collect();
        if members.len() > MAX_GROUP_MEMBERS {
            return Err(RecordError::TooBroad);
        }
        Ok(members.into_iter().collect())
    }

    async fn refuse_when_busy(&self, client_id: &str) -> Result<(), RecordError> {
        let (running,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM bulk_exports WHERE client_id = $1 AND state = $2 AND updated_at > $3",
        )
        .bind(client_id)
        .bind(IN_PROGRESS)
        .bind(now_micros() - STALE_AFTER_MICROS)
        .fetch_one(self.database.pool())
        .await?;
        if running >= MAX_RUNNING_EXPORTS_PER_CLIENT {
            return Err(RecordError::Busy(format!(
                "this client already has {running} exports running; wait for one to finish"
            )));
        }
        Ok(())
    }

    async fn journal_export_request(
        &self,
        grants: &[Allowed<access::Export>],
        request: &ExportRequest,
    ) -> Result<(), RecordError> {
        let Some(first) = grants.first() else {
            return Ok(());
        };
        let sealed = crate::journal::sealing::seal(
            &self.vault,
            &self.vault.patient_ref(None),
            request.request_url.as_bytes(),
        )
        .await
        .map_err(|error| RecordError::Audit(error.to_string()))?;
        let draft = AuditDraft::by(first.principal(), codes::EXPORT, "bulk-export-request", 'E')
            .decided_by(first.decided_by())
            .with_detail(sealed);
        self.journal(draft).await
    }

    async fn run_export(self: Arc<Self>, plan: ExportPlan) {
        let finished = match self.write_export(&plan).await {
            Ok(true) => self.finish_export(&plan.job_id, COMPLETED, None).await,
            Ok(false) => self.discard_export(&plan.job_id).await,
            Err(error) => {
                tracing::error!(job = %plan.job_id, error = %error, "bulk export failed");
                self.finish_export(&plan.job_id, FAILED, Some(&error.to_string()))
                    .await
            }
        };
        if let Err(error) = finished {
            tracing::error!(job = %plan.job_id, error = %error, "bulk export state not saved");
        }
    }

    /// Marks a running job finished; its files (if any) expire after the configured time.
    async fn finish_export(
        &self,
        job_id: &str,
        state: &str,
        failure: Option<&str>,
    ) -> Result<(), RecordError> {
        let now = now_micros();
        sqlx::query(
            "UPDATE bulk_exports SET state = $1, updated_at = $2, expires_at = $3, progress = $1, failure = $4 \
             WHERE job_id = $5 AND state = $6",
        )
        .bind(state)
        .bind(now)
        .bind(now + self.export_expiry_micros())
        .bind(failure)
        .bind(job_id)
        .bind(IN_PROGRESS)
        .execute(self.database.pool())
        .await?;
        Ok(())
    }

    /// Writes every file of a job; `Ok(false)` when the job was cancelled meanwhile.
    async fn write_export(&self, plan: &ExportPlan) -> Result<bool, RecordError> {
        let type_count = plan.grants.len();
        for (position, allowed) in plan.grants.iter().enumerate() {
            let mut file = FileInProgress::default();
            let mut last_id = String::new();
            let mut file_number = 0;
            let filter = self.type_filter(allowed, plan).await?;
            loop {
                if !self.still_running(&plan.job_id).await? {
                    return Ok(false);
                }
                let ids = self
                    .export_batch(allowed.resource_type(), plan, &filter, &last_id)
                    .await?;
                let Some(last) = ids.last() else { break };
                last_id = last.clone();
                let (records, _, patient_refs) =
                    self.load_current(allowed.resource_type(), &ids).await?;
                for record in records {
                    let record = self.egress(allowed.view(), record)?;
                    file.lines.extend((plan.render)(&record));
                    file.count += 1;
                }
                file.patient_refs.extend(patient_refs);
                if file.count >= RESOURCES_PER_FILE || file.lines.len() >= BYTES_PER_FILE {
                    file_number += 1;
                    self.close_export_file(plan, allowed, file_number, std::mem::take(&mut file))
                        .await?;
                }
                self.report_progress(
                    &plan.job_id,
                    &format!(
                        "{} ({} of {type_count} types)",
                        allowed.resource_type(),
                        position + 1
                    ),
                )
                .await?;
            }
            if file.count > 0 {
                file_number += 1;
                self.close_export_file(plan, allowed, file_number, file)
                    .await?;
            }
        }
        self.still_running(&plan.job_id).await
    }

    /// The `_typeFilter` searches of one type as one condition (any of them), checked and
    /// translated for the caller's view; an empty statement when there are none.
    async fn type_filter(
        &self,
        allowed: &Allowed<access::Export>,
        plan: &ExportPlan,
    ) -> Result<Statement, RecordError> {
        let resource_type = allowed.resource_type();
        let mut alternatives = Vec::new();
        for (filtered_type, request) in &plan.type_filters {
            if filtered_type != resource_type {
                continue;
            }
            let request = self
                .search_in_view(allowed.view(), resource_type, request)
                .await?;
            let mut alternative = Statement::new("(1 = 1");
            alternative
                .append(&self.conditions(resource_type, &request.criteria).await?)
                .push(")");
            alternatives.push(alternative);
        }
        let mut filter = Statement::new("");
        for (position, alternative) in alternatives.iter().enumerate() {
            filter.push(if position == 0 { " AND (" } else { " OR " });
            filter.append(alternative);
        }
        if !alternatives.is_empty() {
            filter.push(")");
        }
        Ok(filter)
    }

    /// The next ids of one type in id order after `after`, within the job's patients, time and
    /// type filter.
    async fn export_batch(
        &self,
        resource_type: &str,
        plan: &ExportPlan,
        filter: &Statement,
        after: &str,
    ) -> Result<Vec<String>, RecordError> {
        let mut statement = Statement::new(
            "SELECT h.resource_id FROM record_heads h WHERE h.deleted = 0 AND h.resource_type = ",
        );
        statement
            .bind_text(resource_type)
            .push(" AND h.resource_id > ")
            .bind_text(after)
            .append(filter);
        if let Some(since) = plan.since {
            statement
                .push(" AND h.last_updated >= ")
                .bind_integer(since);
        }
        match &plan.patients {
            PatientFilter::Everyone => {}
            PatientFilter::AnyPatient => {
                statement
                    .push(" AND h.patient_ref <> ")
                    .bind_text(NO_PATIENT);
            }
            PatientFilter::Only(patient_refs) if patient_refs.is_empty() => {
                return Ok(Vec::new());
            }
            PatientFilter::Only(patient_refs) => {
                statement
                    .push(" AND h.patient_ref IN ")
                    .bind_text_list(patient_refs.iter().map(String::as_str));
            }
        }
        statement.push(&format!(" ORDER BY h.resource_id LIMIT {RECORDS_PER_STEP}"));
        let rows = statement.fetch_all(self.database.pool()).await?;
        rows.iter()
            .map(|row| row.try_get::<String, _>(0).map_err(RecordError::from))
            .collect()
    }

    /// Encrypts a file to the job's key, stores it, lists it, and journals an Export leaf per
    /// patient in it, all before the next file starts.
    async fn close_export_file(
        &self,
        plan: &ExportPlan,
        allowed: &Allowed<access::Export>,
        file_number: usize,
        file: FileInProgress,
    ) -> Result<(), RecordError> {
        let file_name = format!("{}-{file_number}.ndjson", allowed.resource_type());
        let blob_key = format!("exports/{}/{file_name}", plan.job_id);
        let ciphertext = self
            .vault
            .encrypt_for_patient(&plan.key_ref, &file.lines)
            .await?;
        self.blobs
            .put_new(&blob_key, Bytes::from(ciphertext))
            .await?;
        sqlx::query(
            "INSERT INTO bulk_export_files (job_id, file_name, resource_type, resource_count, blob_key) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&plan.job_id)
        .bind(&file_name)
        .bind(allowed.resource_type())
        .bind(i64::try_from(file.count).unwrap_or(i64::MAX))
        .bind(&blob_key)
        .execute(self.database.pool())
        .await?;
        let drafts: Vec<AuditDraft> = file
            .patient_refs
            .iter()
            .map(|patient_ref| {
                AuditDraft::by(allowed.principal(), codes::EXPORT, "bulk-export", 'E')
                    .on(allowed.resource_type(), None)
                    .for_patient(patient_ref)
                    .decided_by(allowed.decided_by())
            })
            .collect();
        for chunk in drafts.chunks(1000) {
            self.journal_many(chunk.to_vec()).await?;
        }
        Ok(())
    }

    async fn still_running(&self, job_id: &str) -> Result<bool, RecordError> {
        let state: Option<(String,)> =
            sqlx::query_as("SELECT state FROM bulk_exports WHERE job_id = $1")
                .bind(job_id)
                .fetch_optional(self.database.pool())
                .await?;
        Ok(state.is_some_and(|(state,)| state == IN_PROGRESS))
    }

    async fn report_progress(&self, job_id: &str, progress: &str) -> Result<(), RecordError> {
        sqlx::query(
            "UPDATE bulk_exports SET progress = $1, updated_at = $2 WHERE job_id = $3 AND state = $4",
        )
        .bind(progress)
        .bind(now_micros())
        .bind(job_id)
        .bind(IN_PROGRESS)
        .execute(self.database.pool())
        .await?;
        Ok(())
    }

    /// Where the caller's export stands. Another client's job is "not found".
    pub async fn export_status(
        &self,
        caller: &Principal,
        job_id: &str,
    ) -> Result<ExportStatus, RecordError> {
        let row = self.owned_export(caller, job_id).await?;
        let state: String = row.try_get("state")?;
        let updated_at: i64 = row.try_get("updated_at")?;
        match state.as_str() {
            IN_PROGRESS if updated_at < now_micros() - STALE_AFTER_MICROS => {
                Ok(ExportStatus::Failed {
                    reason: "the export stopped when its server stopped; start it again".to_owned(),
                })
            }
            IN_PROGRESS => Ok(ExportStatus::InProgress {
                progress: row.try_get("progress")?,
            }),
            COMPLETED => {
                let sealed: Vec<u8> = row.try_get("sealed_request")?;
                let request_url = self
                    .vault
                    .decrypt_for_patient(&export_key_ref(job_id), &sealed)
                    .await?;
                Ok(ExportStatus::Completed {
                    transaction_time: row.try_get("transaction_time")?,
                    expires_at: row.try_get::<Option<i64>, _>("expires_at")?.unwrap_or(0),
                    request_url: String::from_utf8_lossy(&request_url).into_owned(),
                    files: self.export_files(job_id).await?,
                })
            }
            _ => Ok(ExportStatus::Failed {
                reason: row
                    .try_get::<Option<String>, _>("failure")?
                    .unwrap_or_else(|| "the export failed".to_owned()),
            }),
        }
    }

    async fn owned_export(
        &self,
        caller: &Principal,
        job_id: &str,
    ) -> Result<sqlx::any::AnyRow, RecordError> {
        sqlx::query(
            "SELECT state, updated_at, progress, sealed_request, transaction_time, expires_at, failure \
             FROM bulk_exports WHERE job_id = $1 AND client_id = $2 AND state <> $3",
        )
        .bind(job_id)
        .bind(&caller.id)
        .bind(CANCELLED)
        .fetch_optional(self.database.pool())
        .await?
        .ok_or(RecordError::NotFound)
    }

    async fn export_files(&self, job_id: &str) -> Result<Vec<ExportFile>, RecordError> {
        let rows = sqlx::query(
            "SELECT resource_type, file_name, resource_count FROM bulk_export_files WHERE job_id = $1 ORDER BY resource_type, file_name",
        )
        .bind(job_id)
        .fetch_all(self.database.pool())
        .await?;
        rows.iter()
            .map(|row| {
                Ok(ExportFile {
                    resource_type: row.try_get(0)?,
                    file_name: row.try_get(1)?,
                    count: row.try_get(2)?,
                })
            })
            .collect()
    }

    /// One file of a finished export, decrypted, for the client that asked for it (journaled).
    pub async fn export_file(
        &self,
        caller: &Principal,
        job_id: &str,
        file_name: &str,
    ) -> Result<Bytes, RecordError> {
        let row = self.owned_export(caller, job_id).await?;
        let state: String = row.try_get("state")?;
        if state != COMPLETED {
            return Err(RecordError::NotFound);
        }
        let found: Option<(String, String)> = sqlx::query_as(
            "SELECT blob_key, resource_type FROM bulk_export_files WHERE job_id = $1 AND file_name = $2",
        )
        .bind(job_id)
        .bind(file_name)
        .fetch_optional(self.database.pool())
        .await?;
        let (blob_key, resource_type) = found.ok_or(RecordError::NotFound)?;
        let ciphertext = self.blobs.get(&blob_key).await?;
        let lines = self
            .vault
            .decrypt_for_patient(&export_key_ref(job_id), &ciphertext)
            .await?;
        let draft = AuditDraft::by(caller, codes::EXPORT, "bulk-export-download", 'E')
            .on(&resource_type, None);
        self.journal(draft).await?;
        Ok(Bytes::from(lines))
    }

    /// Cancels a running export or deletes a finished one (`DELETE` on its status URL): its
    /// files and key are destroyed at once.
    pub async fn cancel_export(&self, caller: &Principal, job_id: &str) -> Result<(), RecordError> {
        self.owned_export(caller, job_id).await?;
        sqlx::query("UPDATE bulk_exports SET state = $1, expires_at = $2 WHERE job_id = $3")
            .bind(CANCELLED)
            .bind(now_micros())
            .bind(job_id)
            .execute(self.database.pool())
            .await?;
        let draft = AuditDraft::by(caller, codes::EXPORT, "bulk-export-cancel", 'D');
        self.journal(draft).await?;
        self.discard_export(job_id).await
    }

    /// Destroys every export past its expiry (and every one abandoned by a stopped server):
    /// blobs deleted, rows removed, key shredded. Returns how many jobs went.
    pub async fn purge_expired_exports(&self) -> Result<usize, RecordError> {
        let now = now_micros();
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT job_id FROM bulk_exports WHERE (expires_at IS NOT NULL AND expires_at <= $1) \
             OR (state = $2 AND updated_at < $3)",
        )
        .bind(now)
        .bind(IN_PROGRESS)
        .bind(now - STALE_AFTER_MICROS - self.export_expiry_micros())
        .fetch_all(self.database.pool())
        .await?;
        for (job_id,) in &rows {
            self.discard_export(job_id).await?;
        }
        Ok(rows.len())
    }

    async fn discard_export(&self, job_id: &str) -> Result<(), RecordError> {
        let files: Vec<(String,)> =
            sqlx::query_as("SELECT blob_key FROM bulk_export_files WHERE job_id = $1")
                .bind(job_id)
                .fetch_all(self.database.pool())
                .await?;
        for (blob_key,) in &files {
            self.blobs.delete(blob_key).await?;
        }
        self.vault.shred_patient(&export_key_ref(job_id)).await?;
        sqlx::query("DELETE FROM bulk_export_files WHERE job_id = $1")
            .bind(job_id)
            .execute(self.database.pool())
            .await?;
        sqlx::query("DELETE FROM bulk_exports WHERE job_id = $1")
            .bind(job_id)
            .execute(self.database.pool())
            .await?;
        Ok(())
    }

    fn export_expiry_micros(&self) -> i64 {
        i64::try_from(self.export_expiry_seconds)
            .unwrap_or(i64::MAX / 2_000_000)
            .saturating_mul(1_000_000)
    }
}

/// The NDJSON file being filled.
#[derive(Default)]
struct FileInProgress {
    lines: Vec<u8>,
    count: usize,
    patient_refs: BTreeSet<String>,
}
