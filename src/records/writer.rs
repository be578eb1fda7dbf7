//! Group commit: one task per process takes every pending write, runs a batch of them in one
//! transaction (each in its own savepoint, so one failure does not sink the others), appends their
//! audit leaves in that same transaction, commits once, and only then answers each caller.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, Connection, Row};
use tokio::sync::{mpsc, oneshot};

use super::RecordError;
use super::known_heads::{self, KnownHeads};
use super::patient_owners::PatientOwners;
use super::search_index::{DICOM_STUDY, IndexRows, TokenRow};
use crate::journal::{self, AuditDraft, JournalIdentity, PendingLeaf};
use crate::storage::statement::{AnyQuery, BindValue, Statement};
use crate::storage::{Database, Engine};

/// The most writes one transaction carries.
const MAX_BATCH: usize = 512;

/// How long the writer's own connection may sit idle before it is pinged before use (the pool
/// pings the connections it hands out; this one is never handed back).
const TRUST_HELD_CONNECTION: Duration = Duration::from_secs(5);

/// What a write requires of the record's current version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// Any state (create or overwrite).
    None,
    /// The record must not exist (or be deleted).
    MustNotExist,
    /// The current version must be exactly this one.
    VersionIs(i64),
    /// The record must exist and not be deleted.
    MustExist,
}

/// One row to write into `records` (the body already encrypted by the vault).
#[derive(Debug, Clone)]
pub struct RowWrite {
    pub resource_type: String,
    pub resource_id: String,
    pub patient_ref: String,
    pub content_type: String,
    pub deleted: bool,
    pub inline_body: Option<Vec<u8>>,
    pub blob_key: Option<String>,
    pub precondition: Precondition,
    /// The search index of this version (replaces the previous version's); none for a deletion.
    pub index: IndexRows,
    /// The imaging index row of a DICOM instance (replaces the previous version's).
    pub dicom: Option<DicomInstanceRow>,
}

/// The `dicom_instances` row that comes with a DICOM instance's record row: the QIDO-RS and
/// C-FIND index (keyed hashes of UIDs, clear values that are not PHI, the encrypted header).
#[derive(Debug, Clone)]
pub struct DicomInstanceRow {
    pub instance_key: String,
    pub series_key: String,
    pub study_key: String,
    pub sop_class_uid: String,
    pub transfer_syntax_uid: String,
    pub modality: Option<String>,
    pub study_date: Option<i64>,
    pub series_number: Option<i64>,
    pub instance_number: Option<i64>,
    /// The header as DICOM JSON, encrypted to the patient's key.
    pub header: Vec<u8>,
    /// The tokens of the identifying (patient and study level) attributes, owned by the study:
    /// any the study does not have yet are added.
    pub study_tokens: Vec<TokenRow>,
    /// Keyed hashes of the remapped UIDs the de-identified view names this instance by.
    pub deidentified_keys: DeidentifiedKeys,
}

/// Keyed hashes of an instance's remapped (de-identified view) study, series and instance UIDs.
#[derive(Debug, Clone)]
pub struct DeidentifiedKeys {
    pub study_key: String,
    pub series_key: String,
    pub instance_key: String,
}

/// An atomic unit of work: rows (all or none) plus the audit leaves that record them.
#[derive(Debug, Default)]
pub struct WriteUnit {
    pub rows: Vec<RowWrite>,
    pub audit: Vec<AuditDraft>,
}

impl WriteUnit {
    /// Whether the unit writes a Patient (whose identifiers link DICOM patients to it).
    fn writes_patients(&self) -> bool {
        self.rows.iter().any(|row| row.resource_type == PATIENT)
    }
}

/// The resource type whose identifier tokens [`PatientOwners`] remembers owners of.
const PATIENT: &str = "Patient";

/// The version and time each row of a unit got.
#[derive(Debug, Clone)]
pub struct WrittenRow {
    pub version: i64,
    pub last_updated: i64,
}

/// The outcome of one unit: its rows and the journal index of its first leaf.
#[derive(Debug, Clone)]
pub struct UnitReceipt {
    pub rows: Vec<WrittenRow>,
    pub first_leaf_index: u64,
}

/// Where a unit's outcome goes.
type Reply = oneshot::Sender<Result<UnitReceipt, RecordError>>;

struct Job {
    unit: WriteUnit,
    reply: Reply,
}

/// The handle every writer of the process shares.
#[derive(Debug, Clone)]
pub struct Writer {
    sender: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Job")
    }
}

impl Writer {
    /// Starts the group-commit task; it makes `patient_owners` forget after writing a Patient.
    pub fn start(
        database: Database,
        identity: JournalIdentity,
        patient_owners: Arc<PatientOwners>,
    ) -> Self {
        let (sender, receiver) = mpsc::channel(4096);
        tokio::spawn(run(database, Arc::new(identity), patient_owners, receiver));
        Self { sender }
    }

    /// Submits a unit and waits until it is durable (or failed).
    pub async fn write(&self, unit: WriteUnit) -> Result<UnitReceipt, RecordError> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(Job { unit, reply })
            .await
            .map_err(|_| RecordError::Unavailable)?;
        answer.await.map_err(|_| RecordError::Unavailable)?
    }
}

async fn run(
    database: Database,
    identity: Arc<JournalIdentity>,
    patient_owners: Arc<PatientOwners>,
    mut receiver: mpsc::Receiver<Job>,
) {
    // The writer keeps one connection for itself: on SQLite its page cache then stays valid
    // from one batch to the next (another connection's commit would discard it), and no batch
    // waits for the pool. A connection that failed a batch is replaced.
    // It gives the connection back when the pool closes (which waits for every connection).
    let mut connection: Option<PoolConnection<Any>> = None;
    let mut pool_closed = std::pin::pin!(database.pool().close_event());
    let mut last_batch = Instant::now();
    loop {
        let first = tokio::select! {
            job = receiver.recv() => match job {
                Some(job) => job,
                None => return,
            },
            () = &mut pool_closed, if connection.is_some() => {
                connection = None;
                continue;
            }
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let held = match connection.take() {
            Some(held) if last_batch.elapsed() < TRUST_HELD_CONNECTION => Ok(held),
            Some(held) => checked_or_fresh(&database, held).await,
            None => writer_connection(&database).await,
        };
        last_batch = Instant::now();
        connection = match held {
            Ok(mut held) => {
                let committed = commit_batch(&mut held, &identity, &patient_owners, batch).await;
                if committed {
                    database.note_commit();
                    Some(held)
                } else {
                    // It may still be inside the failed batch's transaction (on SQLite one sqlx
                    // does not know of): closed, not handed back to the pool.
                    held.close_on_drop();
                    None
                }
            }
            Err(error) => {
                fail_replies(batch.into_iter().map(|job| job.reply).collect(), &error);
                None
            }
        };
    }
}

/// The held connection, after a ping, or a fresh one when the ping fails (a PostgreSQL server
/// restarted while the writer was idle).
async fn checked_or_fresh(
    database: &Database,
    mut held: PoolConnection<Any>,
) -> Result<PoolConnection<Any>, sqlx::Error> {
    if held.ping().await.is_ok() {
        return Ok(held);
    }
    held.close_on_drop();
    drop(held);
    writer_connection(database).await
}

/// A pool connection for the writer to hold. On SQLite its page cache is made small: profiles
/// of C-STORE showed every commit ending in a scan of the whole cache's hash table
/// (`pager_end_transaction` → `pcache1TruncateUnsafe`), about 4% of the server's CPU with the
/// pool's 32 MiB cache and under 0.2% with 2 MiB, which still holds what a commit walks.
async fn writer_connection(database: &Database) -> Result<PoolConnection<Any>, sqlx::Error> {
    let mut connection = database.pool().acquire().await?;
    if database.engine() == Engine::Sqlite {
        sqlx::query(WRITER_SQLITE_CACHE)
            .execute(&mut *connection)
            .await?;
    }
    Ok(connection)
}

/// The writer's SQLite page cache: 2 MiB.
const WRITER_SQLITE_CACHE: &str = "PRAGMA cache_size = -2048";

/// Answers every job of a batch that failed as a whole with the storage error.
fn fail_replies(replies: Vec<Reply>, error: &sqlx::Error) {
    tracing::error!(error = %error, units = replies.len(), "audit and record batch failed to commit");
    for reply in replies {
        let _ = reply.send(Err(RecordError::Storage(
            crate::storage::StorageError::Database(error.to_string()),
        )));
    }
}

/// Runs one batch and answers its jobs; `false` when the batch failed as a whole (the
/// connection is then not trusted with the next one).
async fn commit_batch(
    connection: &mut AnyConnection,
    identity: &JournalIdentity,
    patient_owners: &PatientOwners,
    batch: Vec<Job>,
) -> bool {
    let (units, replies): (Vec<WriteUnit>, Vec<_>) =
        batch.into_iter().map(|job| (job.unit, job.reply)).unzip();
    let outcome = run_batch_transaction(connection, identity, &units).await;
    // Before anyone hears of the commit (a failure may have committed too): owners remembered
    // before it, or looked up while it ran, must not be used after it.
    if units.iter().any(WriteUnit::writes_patients) {
        patient_owners.forget_all();
    }
    match outcome {
        Ok(outcomes) => {
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(outcome);
            }
            true
        }
        Err(error) => {
            fail_replies(replies, &error);
            false
        }
    }
}

async fn run_batch_transaction(
    connection: &mut AnyConnection,
    identity: &JournalIdentity,
    units: &[WriteUnit],
) -> Result<Vec<Result<UnitReceipt, RecordError>>, sqlx::Error> {
    match Engine::of_connection(connection) {
        Engine::Sqlite => run_batch_in_folded_transaction(connection, identity, units).await,
        Engine::Postgres => run_batch_in_sqlx_transaction(connection, identity, units).await,
    }
}

/// SQLite: `BEGIN` goes in one query with the journal head lock and the heads of the records
/// the batch writes, and `COMMIT` in one with the journal append: per batch two round trips to
/// the connection's thread, and one per row, fewer than with sqlx's `Transaction`.
/// sqlx does not know of this transaction, so a batch that fails leaves it to the caller, which
/// closes the connection (SQLite rolls back what a closed connection left uncommitted).
async fn run_batch_in_folded_transaction(
    connection: &mut AnyConnection,
    identity: &JournalIdentity,
    units: &[WriteUnit],
) -> Result<Vec<Result<UnitReceipt, RecordError>>, sqlx::Error> {
    let (mut tree, mut known) = begin_batch(connection, units).await?;
    match apply_units(connection, identity, units, tree.size(), &mut known).await? {
        Applied::Units { outcomes, leaves } => {
            journal::append_leaves(connection, &mut tree, &leaves, journal::Finish::Commit)
                .await
                .map_err(journal_to_sqlx)?;
            Ok(outcomes)
        }
        Applied::LoneUnitFailed(error) => {
            sqlx::query("ROLLBACK").execute(&mut *connection).await?;
            Ok(vec![Err(error)])
        }
    }
}

/// SQLite: begins the batch's transaction, takes the journal head row and reads the heads of the
/// records the batch writes, in one multi-statement query.
async fn begin_batch(
    connection: &mut AnyConnection,
    units: &[WriteUnit],
) -> Result<(glastonbury_audit::CompactRange, KnownHeads), sqlx::Error> {
    let records = KnownHeads::records_of(units.iter().flat_map(|unit| unit.rows.iter()));
    let mut sql = format!("BEGIN IMMEDIATE;\n{}", journal::LOCK_HEAD);
    let mut parameters = Vec::new();
    if !records.is_empty() {
        let (heads_sql, heads_parameters) = KnownHeads::query_for(&records, 1);
        sql.push_str(";\n");
        sql.push_str(&heads_sql);
        parameters = heads_parameters;
    }
    let mut query = sqlx::query(&sql);
    for parameter in &parameters {
        query = query.bind(parameter);
    }
    // `fetch_all`, not `fetch_one`: a query stopped at its first row would not run on.
    let rows = query.fetch_all(&mut *connection).await?;
    // The journal head's row (two columns) comes first, then the record heads (four).
    let (head_row, record_rows) = match rows.split_first() {
        Some((head_row, record_rows)) if head_row.len() == 2 => (head_row, record_rows),
        _ => {
            return Err(sqlx::Error::Protocol(
                "the journal head row is missing".to_owned(),
            ));
        }
    };
    let tree = journal::store::head_of_row(connection, head_row)
        .await
        .map_err(journal_to_sqlx)?;
    Ok((tree, KnownHeads::from_rows(records, record_rows)?))
}

/// PostgreSQL: one statement per query, so the transaction is sqlx's.
async fn run_batch_in_sqlx_transaction(
    connection: &mut AnyConnection,
    identity: &JournalIdentity,
    units: &[WriteUnit],
) -> Result<Vec<Result<UnitReceipt, RecordError>>, sqlx::Error> {
    let mut transaction = connection.begin().await?;
    // Taking the journal head row first serializes the batch against other replicas' batches
    // before anything is read.
    let mut tree = journal::lock_head(&mut transaction)
        .await
        .map_err(journal_to_sqlx)?;
    let mut known = KnownHeads::default();
    match apply_units(&mut transaction, identity, units, tree.size(), &mut known).await? {
        Applied::Units { outcomes, leaves } => {
            journal::append_leaves(
                &mut transaction,
                &mut tree,
                &leaves,
                journal::Finish::LeaveOpen,
            )
            .await
            .map_err(journal_to_sqlx)?;
            transaction.commit().await?;
            Ok(outcomes)
        }
        Applied::LoneUnitFailed(error) => {
            transaction.rollback().await?;
            Ok(vec![Err(error)])
        }
    }
}

/// What a batch's units did inside its transaction.
enum Applied {
    /// Each unit's outcome (a failed one undone to its savepoint) and the leaves to append.
    Units {
        outcomes: Vec<Result<UnitReceipt, RecordError>>,
        leaves: Vec<PendingLeaf>,
    },
    /// The batch's only unit failed: the transaction is to be rolled back.
    LoneUnitFailed(RecordError),
}

/// Applies each unit in the open transaction, after the journal's `tree_size` leaves.
async fn apply_units(
    connection: &mut AnyConnection,
    identity: &JournalIdentity,
    units: &[WriteUnit],
    tree_size: u64,
    known: &mut KnownHeads,
) -> Result<Applied, sqlx::Error> {
    let mut outcomes = Vec::with_capacity(units.len());
    let mut leaves: Vec<PendingLeaf> = Vec::new();
    let alone = units.len() == 1;
    for unit in units {
        if unit.rows.is_empty() || alone {
            // Audit-only units write nothing that could fail halfway, and a unit alone in its
            // batch is undone with the transaction: neither needs a savepoint.
            match apply_unit(connection, identity, unit, known).await {
                Ok((mut receipt, unit_leaves)) => {
                    receipt.first_leaf_index = tree_size + leaves.len() as u64;
                    leaves.extend(unit_leaves);
                    outcomes.push(Ok(receipt));
                }
                Err(error) if alone => return Ok(Applied::LoneUnitFailed(error)),
                Err(error) => outcomes.push(Err(error)),
            }
            continue;
        }
        sqlx::query("SAVEPOINT unit")
            .execute(&mut *connection)
            .await?;
        match apply_unit(connection, identity, unit, known).await {
            Ok((mut receipt, unit_leaves)) => {
                sqlx::query("RELEASE SAVEPOINT unit")
                    .execute(&mut *connection)
                    .await?;
                receipt.first_leaf_index = tree_size + leaves.len() as u64;
                leaves.extend(unit_leaves);
                outcomes.push(Ok(receipt));
            }
            Err(error) => {
                sqlx::query("ROLLBACK TO SAVEPOINT unit")
                    .execute(&mut *connection)
                    .await?;
                sqlx::query("RELEASE SAVEPOINT unit")
                    .execute(&mut *connection)
                    .await?;
                known.forget(&unit.rows);
                outcomes.push(Err(error));
            }
        }
    }
    Ok(Applied::Units { outcomes, leaves })
}

fn journal_to_sqlx(error: journal::JournalError) -> sqlx::Error {
    sqlx::Error::Protocol(error.to_string())
}

/// Writes a unit's rows and encodes its leaves (appended by the caller once the batch is known).
async fn apply_unit(
    connection: &mut AnyConnection,
    identity: &JournalIdentity,
    unit: &WriteUnit,
    known: &mut KnownHeads,
) -> Result<(UnitReceipt, Vec<PendingLeaf>), RecordError> {
    let mut rows = Vec::with_capacity(unit.rows.len());
    let mut audit = unit.audit.clone();
    let mut index = PendingIndex::default();
    for (position, row) in unit.rows.iter().enumerate() {
        let written = write_row(connection, row, known).await?;
        if let Some(draft) = audit.get_mut(position) {
            draft.resource_version = Some(written.version);
        }
        index.add(row);
        rows.push(written);
    }
    index.insert(connection).await?;
    let recorded_at = crate::storage::now_micros();
    let leaves = audit
        .iter()
        .map(|draft| PendingLeaf::encode(identity, draft, recorded_at))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| RecordError::Audit(error.to_string()))?;
    Ok((
        UnitReceipt {
            rows,
            first_leaf_index: 0,
        },
        leaves,
    ))
}

/// A record version row. Parameters `$1`–`$9`: resource type, resource id, version, patient,
/// last updated, deleted, content type, inline body, blob key.
const INSERT_RECORD: &str = "INSERT INTO records (resource_type, resource_id, version, patient_ref, last_updated, deleted, content_type, body, blob_key) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";

/// The record's head row, from the parameters of [`INSERT_RECORD`].
const UPSERT_RECORD_HEAD: &str = "INSERT INTO record_heads (resource_type, resource_id, version, deleted, patient_ref, last_updated) \
     VALUES ($1, $2, $3, $6, $4, $5) \
     ON CONFLICT (resource_type, resource_id) DO UPDATE SET version = excluded.version, \
     deleted = excluded.deleted, patient_ref = excluded.patient_ref, last_updated = excluded.last_updated";

/// An instance's imaging index row (replacing the previous version's), after the parameters of
/// [`INSERT_RECORD`] (its patient `$4` and, as the time stored, `$5`). Parameters `$10`–`$22`:
/// instance, series and study keys, SOP class, transfer syntax, modality, study date, series
/// number, instance number, sealed header, and the de-identified study, series and instance keys.
const UPSERT_DICOM_INSTANCE: &str = "INSERT INTO dicom_instances (instance_key, series_key, study_key, patient_ref, sop_class_uid, transfer_syntax_uid, \
     modality, study_date, series_number, instance_number, header, stored_at, deid_study_key, deid_series_key, deid_instance_key) \
     VALUES ($10, $11, $12, $4, $13, $14, $15, $16, $17, $18, $19, $5, $20, $21, $22) \
     ON CONFLICT (instance_key) DO UPDATE SET series_key = excluded.series_key, study_key = excluded.study_key, \
     patient_ref = excluded.patient_ref, sop_class_uid = excluded.sop_class_uid, \
     transfer_syntax_uid = excluded.transfer_syntax_uid, modality = excluded.modality, \
     study_date = excluded.study_date, series_number = excluded.series_number, \
     instance_number = excluded.instance_number, header = excluded.header, stored_at = excluded.stored_at, \
     deid_study_key = excluded.deid_study_key, deid_series_key = excluded.deid_series_key, \
     deid_instance_key = excluded.deid_instance_key";

async fn write_row(
    connection: &mut AnyConnection,
    row: &RowWrite,
    known: &mut KnownHeads,
) -> Result<WrittenRow, RecordError> {
    let current = match known.get(row) {
        Some(head) => head,
        None => known_heads::read_head(connection, row).await?,
    };
    check_precondition(row.precondition, current)?;
    let written = WrittenRow {
        version: current.map_or(1, |(version, _)| version + 1),
        last_updated: next_timestamp(),
    };
    let statements = match row.dicom {
        Some(_) => &*DICOM_VERSION_ROW,
        None => &*VERSION_ROW,
    };
    // One round trip for all of them (on SQLite, to the connection's thread).
    let sql = statements.for_engine(Engine::of_connection(connection));
    bind_version_row(sqlx::query(sql), row, &written)
        .execute(&mut *connection)
        .await?;
    known.wrote(row, written.version);
    if current.is_some() {
        remove_index(connection, row).await?;
    }
    if let Some(dicom) = &row.dicom {
        add_study_tokens(connection, dicom).await?;
    }
    Ok(written)
}

/// Statements whose placeholders number into one shared parameter list, as the one query each
/// engine runs them as: SQLite binds `$N` by number across the statements of a multi-statement
/// query; PostgreSQL takes one statement per query, so there all but the last become
/// data-modifying `WITH` steps of the last.
struct SharedParameterStatements {
    sqlite: String,
    postgres: String,
}

impl SharedParameterStatements {
    /// `steps` run first, `last` last (the order SQLite runs them in; PostgreSQL runs all
    /// against one snapshot, which these statements on different tables do not notice).
    fn new(steps: &[&str], last: &str) -> Self {
        let with: Vec<String> = steps
            .iter()
            .enumerate()
            .map(|(position, step)| format!("step{position} AS ({step})"))
            .collect();
        let mut sqlite = steps.join(";\n");
        sqlite.push_str(";\n");
        sqlite.push_str(last);
        Self {
            sqlite,
            postgres: format!("WITH {} {last}", with.join(", ")),
        }
    }

    fn for_engine(&self, engine: Engine) -> &str {
        match engine {
            Engine::Sqlite => &self.sqlite,
            Engine::Postgres => &self.postgres,
        }
    }
}

/// A version row and its head.
static VERSION_ROW: LazyLock<SharedParameterStatements> =
    LazyLock::new(|| SharedParameterStatements::new(&[INSERT_RECORD], UPSERT_RECORD_HEAD));

/// A DICOM instance's version row, its head and its imaging index row.
static DICOM_VERSION_ROW: LazyLock<SharedParameterStatements> = LazyLock::new(|| {
    SharedParameterStatements::new(&[INSERT_RECORD, UPSERT_RECORD_HEAD], UPSERT_DICOM_INSTANCE)
});

/// Binds the parameters of [`INSERT_RECORD`], [`UPSERT_RECORD_HEAD`] and, for an instance,
/// [`UPSERT_DICOM_INSTANCE`].
fn bind_version_row<'q>(
    query: AnyQuery<'q>,
    row: &'q RowWrite,
    written: &WrittenRow,
) -> AnyQuery<'q> {
    let query = query
        .bind(&row.resource_type)
        .bind(&row.resource_id)
        .bind(written.version)
        .bind(&row.patient_ref)
        .bind(written.last_updated)
        .bind(i64::from(row.deleted))
        .bind(&row.content_type)
        .bind(row.inline_body.as_deref())
        .bind(row.blob_key.as_deref());
    let Some(dicom) = &row.dicom else {
        return query;
    };
    query
        .bind(&dicom.instance_key)
        .bind(&dicom.series_key)
        .bind(&dicom.study_key)
        .bind(&dicom.sop_class_uid)
        .bind(&dicom.transfer_syntax_uid)
        .bind(dicom.modality.as_deref())
        .bind(dicom.study_date)
        .bind(dicom.series_number)
        .bind(dicom.instance_number)
        .bind(dicom.header.as_slice())
        .bind(&dicom.deidentified_keys.study_key)
        .bind(&dicom.deidentified_keys.series_key)
        .bind(&dicom.deidentified_keys.instance_key)
}

/// Adds the tokens the study does not have yet, in one statement. Most instances of a study
/// carry the same patient and study attributes, so this usually reads a few index rows and
/// writes none.
async fn add_study_tokens(
    connection: &mut AnyConnection,
    dicom: &DicomInstanceRow,
) -> Result<(), RecordError> {
    if dicom.study_tokens.is_empty() {
        return Ok(());
    }
    let sql = missing_study_tokens_insert(dicom.study_tokens.len());
    let mut query = sqlx::query(&sql).bind(DICOM_STUDY).bind(&dicom.study_key);
    for row in &dicom.study_tokens {
        query = query.bind(&row.param).bind(&row.token);
    }
    query.execute(&mut *connection).await?;
    Ok(())
}

/// `INSERT … SELECT` of the candidate `(param, token)` pairs `$3, $4, …` of the study `$1, $2`
/// that the study does not have. Tokens are keyed per attribute (the keyword is part of the HMAC
/// domain), so the token alone identifies a row.
fn missing_study_tokens_insert(count: usize) -> String {
    let candidates: Vec<String> = (0..count)
        .map(|position| format!("(${}, ${})", 3 + 2 * position, 4 + 2 * position))
        .collect();
    format!(
        "INSERT INTO search_tokens (resource_type, resource_id, param, token) \
         SELECT $1, $2, candidate.column1, candidate.column2 FROM (VALUES {}) AS candidate \
         WHERE NOT EXISTS (SELECT 1 FROM search_tokens AS present WHERE present.token = candidate.column2 \
         AND present.resource_type = $1 AND present.resource_id = $2)",
        candidates.join(", ")
    )
}

/// Rows per multi-row INSERT of index entries. A fixed set of sizes keeps the number of distinct
/// statements small, so the engines' prepared-statement caches hold all of them; the rows are
/// split greedily into these sizes.
const INDEX_INSERT_SIZES: [usize; 5] = [256, 64, 16, 4, 1];

/// The index rows of every record a unit writes, inserted together after the records.
#[derive(Default)]
struct PendingIndex {
    tokens: Vec<Vec<BindValue>>,
    dates: Vec<Vec<BindValue>>,
    numbers: Vec<Vec<BindValue>>,
}

impl PendingIndex {
    fn add(&mut self, row: &RowWrite) {
        if row.deleted {
            return;
        }
        let owner = || {
            vec![
                BindValue::Text(row.resource_type.clone()),
                BindValue::Text(row.resource_id.clone()),
            ]
        };
        for token in &row.index.tokens {
            let mut values = owner();
            values.extend([
                BindValue::Text(token.param.clone()),
                BindValue::Text(token.token.clone()),
            ]);
            self.tokens.push(values);
        }
        for date in &row.index.dates {
            let mut values = owner();
            values.extend([
                BindValue::Text(date.param.clone()),
                BindValue::Integer(date.low),
                BindValue::Integer(date.high),
            ]);
            self.dates.push(values);
        }
        for number in &row.index.numbers {
            let mut values = owner();
            values.extend([
                BindValue::Text(number.param.clone()),
                BindValue::Real(number.value),
                number
                    .unit
                    .clone()
                    .map_or(BindValue::NullText, BindValue::Text),
            ]);
            self.numbers.push(values);
        }
    }

    async fn insert(&self, connection: &mut AnyConnection) -> Result<(), RecordError> {
        insert_many(
            connection,
            "search_tokens (resource_type, resource_id, param, token)",
            &self.tokens,
        )
        .await?;
        insert_many(
            connection,
            "search_dates (resource_type, resource_id, param, low, high)",
            &self.dates,
        )
        .await?;
        insert_many(
            connection,
            "search_numbers (resource_type, resource_id, param, value, unit)",
            &self.numbers,
        )
        .await
    }
}

/// Removes the index rows of a record's previous version.
async fn remove_index(connection: &mut AnyConnection, row: &RowWrite) -> Result<(), RecordError> {
    for table in ["search_tokens", "search_dates", "search_numbers"] {
        let mut delete = Statement::new(&format!("DELETE FROM {table} WHERE resource_type = "));
        delete
            .bind_text(&row.resource_type)
            .push(" AND resource_id = ")
            .bind_text(&row.resource_id);
        delete.execute(&mut *connection).await?;
    }
    Ok(())
}

async fn insert_many(
    connection: &mut AnyConnection,
    table_and_columns: &str,
    rows: &[Vec<BindValue>],
) -> Result<(), RecordError> {
    let mut remaining = rows;
    while !remaining.is_empty() {
        let size = INDEX_INSERT_SIZES
            .into_iter()
            .find(|size| *size <= remaining.len())
            .unwrap_or(1);
        let (chunk, rest) = remaining.split_at(size);
        remaining = rest;
        let mut insert = Statement::new(&format!("INSERT INTO {table_and_columns} VALUES "));
        for (position, values) in chunk.iter().enumerate() {
            insert.push(if position == 0 { "(" } else { ", (" });
            for (column, value) in values.iter().enumerate() {
                if column > 0 {
                    insert.push(", ");
                }
                insert.bind(value.clone());
            }
            insert.push(")");
        }
        insert.execute(&mut *connection).await?;
    }
    Ok(())
}

fn check_precondition(
    precondition: Precondition,
    current: Option<(i64, bool)>,
) -> Result<(), RecordError> {
    let live_version = current
        .filter(|(_, deleted)| !deleted)
        .map(|(version, _)| version);
    match precondition {
        Precondition::None => Ok(()),
        Precondition::MustNotExist if live_version.is_some() => Err(RecordError::AlreadyExists),
        Precondition::MustNotExist => Ok(()),
        Precondition::MustExist if live_version.is_none() => Err(RecordError::NotFound),
        Precondition::MustExist => Ok(()),
        Precondition::VersionIs(expected)
            if current.map(|(version, _)| version) == Some(expected) =>
        {
            Ok(())
        }
        Precondition::VersionIs(_) => Err(RecordError::VersionConflict {
            current: current.map(|(version, _)| version),
        }),
    }
}

/// Microsecond timestamps that never go backwards within this process.
fn next_timestamp() -> i64 {
    use std::sync::atomic::{AtomicI64, Ordering};
    static LAST: AtomicI64 = AtomicI64::new(0);
    let now = crate::storage::now_micros();
    let previous = LAST.fetch_max(now, Ordering::SeqCst);
    if previous >= now {
        return LAST.fetch_add(1, Ordering::SeqCst) + 1;
    }
    now
}
