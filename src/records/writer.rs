//! Group commit: one task per process takes every pending write, runs a batch of them in one
//! transaction, appends their audit leaves in that same transaction, commits once, and only then
//! answers each caller. One unit's failure does not sink the others: a failed precondition is
//! found before anything runs, anything else is undone to the unit's savepoint (on SQLite,
//! where a batch runs as one query, by running the batch again unit by unit).

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, Connection, Row};
use tokio::sync::{mpsc, oneshot};

use super::RecordError;
use super::known_heads::{self, KnownHeads};
use super::patient_owners::PatientOwners;
use super::search_index::{DICOM_STUDY, IndexRows, TokenRow};
use super::wal_sync::{self, Answer, WalFile, WalSync};
use crate::journal::{self, AuditDraft, JournalIdentity, PendingLeaf};
use crate::storage::statement::{BindValue, Statement};
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
    /// The attributes its study's ImagingStudy lists of it, as DICOM JSON sealed like the
    /// header: what a rebuild of the ImagingStudy reads instead of the whole header.
    pub listed_values: Vec<u8>,
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
pub(super) type Reply = oneshot::Sender<Result<UnitReceipt, RecordError>>;

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
    let wal_sync = start_wal_sync(database.engine());
    // The writer keeps one connection for itself: on SQLite its page cache then stays valid
    // from one batch to the next (another connection's commit would discard it), and no batch
    // waits for the pool. A connection that failed a batch is replaced.
    // It closes the connection when the pool closes (which waits for every connection).
    let mut connection: Option<HeldConnection> = None;
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
        if wal_sync.as_ref().is_some_and(WalSync::has_failed) {
            refuse_after_failed_flush(batch);
            continue;
        }
        let held = match connection.take() {
            Some(held) if last_batch.elapsed() < TRUST_HELD_CONNECTION => Ok(held),
            Some(held) => checked_or_fresh(&database, held, wal_sync.is_some()).await,
            None => writer_connection(&database, wal_sync.is_some()).await,
        };
        last_batch = Instant::now();
        connection = match held {
            Ok(held) => {
                commit_on(
                    held,
                    &database,
                    &identity,
                    &patient_owners,
                    wal_sync.as_ref(),
                    batch,
                )
                .await
            }
            Err(error) => {
                fail_replies(batch.into_iter().map(|job| job.reply).collect(), &error);
                None
            }
        };
    }
}

/// Commits a batch on the held connection and sends (or, with `wal_sync`, has sent once
/// durable) its answers; the connection back, or `None` when the batch failed as a whole (it may
/// still be inside the failed batch's transaction, on SQLite one sqlx does not know of, so it is
/// closed, not handed back to the pool).
async fn commit_on(
    mut held: HeldConnection,
    database: &Database,
    identity: &JournalIdentity,
    patient_owners: &PatientOwners,
    wal_sync: Option<&WalSync>,
    batch: Vec<Job>,
) -> Option<HeldConnection> {
    let answers = commit_batch(&mut held.connection, identity, patient_owners, batch).await?;
    database.note_commit();
    match (wal_sync, &held.wal) {
        (Some(wal_sync), Some(wal)) => wal_sync.answer_when_durable(Arc::clone(wal), answers),
        _ => wal_sync::answer(answers),
    }
    Some(held)
}

/// On SQLite, the thread that makes the writer's commits durable (see [`wal_sync`]); without it
/// (the thread could not start) every commit is flushed inside `COMMIT`.
fn start_wal_sync(engine: Engine) -> Option<WalSync> {
    if engine != Engine::Sqlite {
        return None;
    }
    match WalSync::start() {
        Ok(wal_sync) => Some(wal_sync),
        Err(error) => {
            tracing::warn!(error = %error, "wal flushing thread did not start; sqlite commits flush inside the writer");
            None
        }
    }
}

/// Answers a batch that arrived after a failed WAL flush: nothing may be committed any more.
fn refuse_after_failed_flush(batch: Vec<Job>) {
    for job in batch {
        let _ = job.reply.send(Err(wal_sync::not_durable()));
    }
}

/// The writer's own connection and, when its commits leave the flush to [`WalSync`], the WAL
/// file they go to. Never handed back to the pool: its settings (no flush at commit, a small
/// page cache) are the writer's alone.
struct HeldConnection {
    connection: PoolConnection<Any>,
    wal: Option<Arc<WalFile>>,
}

impl Drop for HeldConnection {
    fn drop(&mut self) {
        self.connection.close_on_drop();
    }
}

/// The held connection, after a ping, or a fresh one when the ping fails (a PostgreSQL server
/// restarted while the writer was idle).
async fn checked_or_fresh(
    database: &Database,
    mut held: HeldConnection,
    flush_apart: bool,
) -> Result<HeldConnection, sqlx::Error> {
    if held.connection.ping().await.is_ok() {
        return Ok(held);
    }
    drop(held);
    writer_connection(database, flush_apart).await
}

/// A pool connection for the writer to hold. On SQLite its page cache is made small: profiles
/// of C-STORE showed every commit ending in a scan of the whole cache's hash table
/// (`pager_end_transaction` → `pcache1TruncateUnsafe`), about 4% of the server's CPU with the
/// pool's 32 MiB cache and under 0.2% with 2 MiB, which still holds what a commit walks.
/// With `flush_apart` and a WAL file to flush, its commits stop waiting for the disk: the
/// caller hands them to [`WalSync`].
async fn writer_connection(
    database: &Database,
    flush_apart: bool,
) -> Result<HeldConnection, sqlx::Error> {
    let mut connection = database.pool().acquire().await?;
    if database.engine() != Engine::Sqlite {
        return Ok(HeldConnection {
            connection,
            wal: None,
        });
    }
    sqlx::query(WRITER_SQLITE_CACHE)
        .execute(&mut *connection)
        .await?;
    let wal = if flush_apart {
        wal_of(&mut connection).await?
    } else {
        None
    };
    if wal.is_some() {
        sqlx::query(COMMIT_WITHOUT_FLUSH)
            .execute(&mut *connection)
            .await?;
    }
    Ok(HeldConnection {
        connection,
        wal: wal.map(Arc::new),
    })
}

/// The writer's SQLite page cache: 2 MiB.
const WRITER_SQLITE_CACHE: &str = "PRAGMA cache_size = -2048";

/// Commits that write the WAL without flushing it (SQLite still flushes it before every
/// checkpoint); [`WalSync`] flushes it before anyone hears of them.
const COMMIT_WITHOUT_FLUSH: &str = "PRAGMA synchronous = NORMAL";

/// The WAL file of the connection's main database; `None` when the database is not a file in
/// WAL mode.
async fn wal_of(connection: &mut AnyConnection) -> Result<Option<WalFile>, sqlx::Error> {
    let journal_mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut *connection)
        .await?;
    if !journal_mode.eq_ignore_ascii_case("wal") {
        return Ok(None);
    }
    let databases = sqlx::query("PRAGMA database_list")
        .fetch_all(&mut *connection)
        .await?;
    let main_file = databases.iter().find_map(|row| {
        let name: String = row.try_get(1).ok()?;
        let file: String = row.try_get(2).ok()?;
        (name == "main" && !file.is_empty()).then_some(file)
    });
    Ok(main_file.and_then(|file| WalFile::open(std::path::Path::new(&file))))
}

/// Answers every job of a batch that failed as a whole with the storage error.
fn fail_replies(replies: Vec<Reply>, error: &sqlx::Error) {
    tracing::error!(error = %error, units = replies.len(), "audit and record batch failed to commit");
    for reply in replies {
        let _ = reply.send(Err(RecordError::Storage(
            crate::storage::StorageError::Database(error.to_string()),
        )));
    }
}

/// Runs one batch and returns the answer to each of its jobs; `None` when the batch failed as a
/// whole (its jobs are then answered, and the connection is not trusted with the next batch).
async fn commit_batch(
    connection: &mut AnyConnection,
    identity: &JournalIdentity,
    patient_owners: &PatientOwners,
    batch: Vec<Job>,
) -> Option<Vec<Answer>> {
    let (units, replies): (Vec<WriteUnit>, Vec<_>) =
        batch.into_iter().map(|job| (job.unit, job.reply)).unzip();
    let outcome = run_batch_transaction(connection, identity, &units).await;
    // Before anyone hears of the commit (a failure may have committed too): owners remembered
    // before it, or looked up while it ran, must not be used after it.
    if units.iter().any(WriteUnit::writes_patients) {
        patient_owners.forget_all();
    }
    match outcome {
        Ok(outcomes) => Some(replies.into_iter().zip(outcomes).collect()),
        Err(error) => {
            fail_replies(replies, &error);
            None
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
/// the batch writes; everything the batch writes, the journal append and `COMMIT` go in a
/// second one: per batch two round trips to the connection's thread, whatever it carries.
/// sqlx does not know of this transaction, so a batch that fails leaves it to the caller, which
/// closes the connection (SQLite rolls back what a closed connection left uncommitted).
async fn run_batch_in_folded_transaction(
    connection: &mut AnyConnection,
    identity: &JournalIdentity,
    units: &[WriteUnit],
) -> Result<Vec<Result<UnitReceipt, RecordError>>, sqlx::Error> {
    let (tree, known) = begin_batch(connection, units).await?;
    if !known.knows_all(units.iter().flat_map(|unit| unit.rows.iter())) {
        // More records than the head query reads: the rest are read row by row.
        return run_units_one_by_one(connection, identity, units, tree, known).await;
    }
    if let Some(outcomes) =
        run_batch_as_one_script(connection, identity, units, &tree, known).await?
    {
        return Ok(outcomes);
    }
    // A statement failed that the preparation could not foresee (a constraint, say) and the
    // transaction was rolled back: again, unit by unit in savepoints, so only its unit fails.
    let (tree, known) = begin_batch(connection, units).await?;
    run_units_one_by_one(connection, identity, units, tree, known).await
}

/// Units whose statements go in one query on SQLite: a uniform workload's queries then come in
/// at most this many shapes, which the writer connection's statement cache keeps prepared.
const UNITS_PER_QUERY: usize = 16;

/// SQLite: prepares every unit from the known heads (a unit whose precondition fails is answered
/// and left out) and runs their statements in one query per [`UNITS_PER_QUERY`] units, the last
/// of which also appends the journal and commits. `None` when a query failed: the transaction
/// is then rolled back.
async fn run_batch_as_one_script(
    connection: &mut AnyConnection,
    identity: &JournalIdentity,
    units: &[WriteUnit],
    tree: &glastonbury_audit::CompactRange,
    mut known: KnownHeads,
) -> Result<Option<Vec<Result<UnitReceipt, RecordError>>>, sqlx::Error> {
    let mut queries = Vec::new();
    let mut query = Statement::default();
    let mut units_in_query = 0;
    let mut outcomes = Vec::with_capacity(units.len());
    let mut leaves: Vec<PendingLeaf> = Vec::new();
    for unit in units {
        let mut prepared = match prepare_unit(Engine::Sqlite, identity, unit, &mut known) {
            Ok(prepared) => prepared,
            Err(error) => {
                outcomes.push(Err(error));
                continue;
            }
        };
        if units_in_query == UNITS_PER_QUERY {
            queries.push(std::mem::take(&mut query));
            units_in_query = 0;
        }
        for statement in prepared.statements {
            query.push_statement(statement);
        }
        units_in_query += 1;
        prepared.receipt.first_leaf_index = tree.size() + leaves.len() as u64;
        leaves.extend(prepared.leaves);
        outcomes.push(Ok(prepared.receipt));
    }
    if leaves.is_empty() && query.is_empty() && queries.is_empty() {
        sqlx::query("ROLLBACK").execute(&mut *connection).await?;
        return Ok(Some(outcomes));
    }
    if !leaves.is_empty() {
        let (append, _) =
            journal::sqlite_append_statements_after(tree, &leaves).map_err(journal_to_sqlx)?;
        query.push_statement(append);
    }
    query.push_statement(Statement::new("COMMIT"));
    queries.push(query);
    for query in &queries {
        if let Err(error) = query.execute(&mut *connection).await {
            tracing::warn!(error = %error, units = units.len(), "write batch query failed; retrying unit by unit");
            sqlx::query("ROLLBACK").execute(&mut *connection).await?;
            return Ok(None);
        }
    }
    Ok(Some(outcomes))
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

/// SQLite: the batch's units one by one (each in a savepoint when there are several), then the
/// journal append and `COMMIT` in one query.
async fn run_units_one_by_one(
    connection: &mut AnyConnection,
    identity: &JournalIdentity,
    units: &[WriteUnit],
    mut tree: glastonbury_audit::CompactRange,
    mut known: KnownHeads,
) -> Result<Vec<Result<UnitReceipt, RecordError>>, sqlx::Error> {
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

/// Writes a unit's rows statement by statement and encodes its leaves (appended by the caller
/// once the batch is known). Heads not known yet are read first.
async fn apply_unit(
    connection: &mut AnyConnection,
    identity: &JournalIdentity,
    unit: &WriteUnit,
    known: &mut KnownHeads,
) -> Result<(UnitReceipt, Vec<PendingLeaf>), RecordError> {
    for row in &unit.rows {
        if known.get(row).is_none() {
            let head = known_heads::read_head(connection, row).await?;
            known.learn(row, head);
        }
    }
    let engine = Engine::of_connection(connection);
    let prepared = prepare_unit(engine, identity, unit, known)?;
    for statement in &prepared.statements {
        statement.execute(&mut *connection).await?;
    }
    Ok((prepared.receipt, prepared.leaves))
}

/// A unit decided before it runs: the version and time of each row, the statements that write
/// them (one statement each on either engine), and the unit's encoded leaves.
struct PreparedUnit {
    receipt: UnitReceipt,
    statements: Vec<Statement>,
    leaves: Vec<PendingLeaf>,
}

/// Decides a unit from the heads of its records, which must all be known, and notes what it will
/// write in `known`. A failed precondition fails the unit and leaves `known` as it was.
fn prepare_unit(
    engine: Engine,
    identity: &JournalIdentity,
    unit: &WriteUnit,
    known: &mut KnownHeads,
) -> Result<PreparedUnit, RecordError> {
    let saved = known.save(&unit.rows);
    match prepare_unit_rows(engine, identity, unit, known) {
        Ok(prepared) => Ok(prepared),
        Err(error) => {
            known.restore(saved);
            Err(error)
        }
    }
}

fn prepare_unit_rows(
    engine: Engine,
    identity: &JournalIdentity,
    unit: &WriteUnit,
    known: &mut KnownHeads,
) -> Result<PreparedUnit, RecordError> {
    let mut rows = Vec::with_capacity(unit.rows.len());
    let mut statements = Vec::new();
    let mut audit = unit.audit.clone();
    let mut index = PendingIndex::default();
    for (position, row) in unit.rows.iter().enumerate() {
        let current = known.get(row).ok_or_else(|| {
            RecordError::Storage(crate::storage::StorageError::Database(
                "a record head was not read before its write".to_owned(),
            ))
        })?;
        check_precondition(row.precondition, current)?;
        let written = WrittenRow {
            version: current.map_or(1, |(version, _)| version + 1),
            last_updated: next_timestamp(),
        };
        statements.push(version_row_statement(engine, row, &written));
        if current.is_some() {
            statements.extend(remove_index_statements(row));
        }
        if let Some(dicom) = &row.dicom {
            statements.extend(study_tokens_statement(dicom));
        }
        known.wrote(row, written.version);
        if let Some(draft) = audit.get_mut(position) {
            draft.resource_version = Some(written.version);
        }
        index.add(row);
        rows.push(written);
    }
    statements.extend(index.statements());
    let recorded_at = crate::storage::now_micros();
    let leaves = audit
        .iter()
        .map(|draft| PendingLeaf::encode(identity, draft, recorded_at))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| RecordError::Audit(error.to_string()))?;
    Ok(PreparedUnit {
        receipt: UnitReceipt {
            rows,
            first_leaf_index: 0,
        },
        statements,
        leaves,
    })
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
/// [`INSERT_RECORD`] (its patient `$4` and, as the time stored, `$5`). Parameters `$10`–`$23`:
/// instance, series and study keys, SOP class, transfer syntax, modality, study date, series
/// number, instance number, sealed header, the de-identified study, series and instance keys, and
/// the sealed listed values.
const UPSERT_DICOM_INSTANCE: &str = "INSERT INTO dicom_instances (instance_key, series_key, study_key, patient_ref, sop_class_uid, transfer_syntax_uid, \
     modality, study_date, series_number, instance_number, header, stored_at, deid_study_key, deid_series_key, deid_instance_key, \
     listed_values) \
     VALUES ($10, $11, $12, $4, $13, $14, $15, $16, $17, $18, $19, $5, $20, $21, $22, $23) \
     ON CONFLICT (instance_key) DO UPDATE SET series_key = excluded.series_key, study_key = excluded.study_key, \
     patient_ref = excluded.patient_ref, sop_class_uid = excluded.sop_class_uid, \
     transfer_syntax_uid = excluded.transfer_syntax_uid, modality = excluded.modality, \
     study_date = excluded.study_date, series_number = excluded.series_number, \
     instance_number = excluded.instance_number, header = excluded.header, stored_at = excluded.stored_at, \
     deid_study_key = excluded.deid_study_key, deid_series_key = excluded.deid_series_key, \
     deid_instance_key = excluded.deid_instance_key, listed_values = excluded.listed_values";

/// Statements whose placeholders number into one shared parameter list, as the one statement
/// each engine runs them as: SQLite binds `$N` by number across the statements of a
/// multi-statement query; PostgreSQL takes one statement per query, so there all but the last
/// become data-modifying `WITH` steps of the last.
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

/// The version row, its head and, for an instance, its imaging index row.
fn version_row_statement(engine: Engine, row: &RowWrite, written: &WrittenRow) -> Statement {
    let statements = match row.dicom {
        Some(_) => &*DICOM_VERSION_ROW,
        None => &*VERSION_ROW,
    };
    Statement::with_values(
        statements.for_engine(engine),
        version_row_values(row, written),
    )
}

/// The parameters of [`INSERT_RECORD`], [`UPSERT_RECORD_HEAD`] and, for an instance,
/// [`UPSERT_DICOM_INSTANCE`].
fn version_row_values(row: &RowWrite, written: &WrittenRow) -> Vec<BindValue> {
    let mut values = vec![
        BindValue::Text(row.resource_type.clone()),
        BindValue::Text(row.resource_id.clone()),
        BindValue::Integer(written.version),
        BindValue::Text(row.patient_ref.clone()),
        BindValue::Integer(written.last_updated),
        BindValue::Integer(i64::from(row.deleted)),
        BindValue::Text(row.content_type.clone()),
        BindValue::optional_blob(row.inline_body.as_deref()),
        BindValue::optional_text(row.blob_key.as_deref()),
    ];
    let Some(dicom) = &row.dicom else {
        return values;
    };
    values.extend([
        BindValue::Text(dicom.instance_key.clone()),
        BindValue::Text(dicom.series_key.clone()),
        BindValue::Text(dicom.study_key.clone()),
        BindValue::Text(dicom.sop_class_uid.clone()),
        BindValue::Text(dicom.transfer_syntax_uid.clone()),
        BindValue::optional_text(dicom.modality.as_deref()),
        BindValue::optional_integer(dicom.study_date),
        BindValue::optional_integer(dicom.series_number),
        BindValue::optional_integer(dicom.instance_number),
        BindValue::Blob(dicom.header.clone()),
        BindValue::Text(dicom.deidentified_keys.study_key.clone()),
        BindValue::Text(dicom.deidentified_keys.series_key.clone()),
        BindValue::Text(dicom.deidentified_keys.instance_key.clone()),
        BindValue::Blob(dicom.listed_values.clone()),
    ]);
    values
}

/// Adds the tokens the study does not have yet, in one statement. Most instances of a study
/// carry the same patient and study attributes, so this usually reads a few index rows and
/// writes none.
fn study_tokens_statement(dicom: &DicomInstanceRow) -> Option<Statement> {
    if dicom.study_tokens.is_empty() {
        return None;
    }
    let mut values = vec![
        BindValue::Text(DICOM_STUDY.to_owned()),
        BindValue::Text(dicom.study_key.clone()),
    ];
    for row in &dicom.study_tokens {
        values.push(BindValue::Text(row.param.clone()));
        values.push(BindValue::Text(row.token.clone()));
    }
    let sql = missing_study_tokens_insert(dicom.study_tokens.len());
    Some(Statement::with_values(&sql, values))
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
/// split greedily into these sizes. At most 64: SQLite looks up each `$N` among the statement's
/// earlier parameters while preparing it and again while binding it, so a statement's cost grows
/// with the square of its parameters (a rebuilt ImagingStudy of 1000 instances, whose script is
/// prepared anew, spent a third of its CPU there with 256-row statements).
const INDEX_INSERT_SIZES: [usize; 4] = [64, 16, 4, 1];

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
                BindValue::optional_text(number.unit.as_deref()),
            ]);
            self.numbers.push(values);
        }
    }

    /// The multi-row inserts of every pending index row.
    fn statements(self) -> Vec<Statement> {
        let mut statements = insert_many(
            "search_tokens (resource_type, resource_id, param, token)",
            self.tokens,
        );
        statements.extend(insert_many(
            "search_dates (resource_type, resource_id, param, low, high)",
            self.dates,
        ));
        statements.extend(insert_many(
            "search_numbers (resource_type, resource_id, param, value, unit)",
            self.numbers,
        ));
        statements
    }
}

/// Removes the index rows of a record's previous version.
fn remove_index_statements(row: &RowWrite) -> [Statement; 3] {
    ["search_tokens", "search_dates", "search_numbers"].map(|table| {
        Statement::with_values(
            &format!("DELETE FROM {table} WHERE resource_type = $1 AND resource_id = $2"),
            vec![
                BindValue::Text(row.resource_type.clone()),
                BindValue::Text(row.resource_id.clone()),
            ],
        )
    })
}

/// Inserts of `rows` (each a list of column values) in multi-row statements of the fixed sizes.
fn insert_many(table_and_columns: &str, rows: Vec<Vec<BindValue>>) -> Vec<Statement> {
    let mut statements = Vec::new();
    let mut remaining = rows.into_iter().peekable();
    while remaining.peek().is_some() {
        let left = remaining.len();
        let size = INDEX_INSERT_SIZES
            .into_iter()
            .find(|size| *size <= left)
            .unwrap_or(1);
        let mut insert = Statement::new(&format!("INSERT INTO {table_and_columns} VALUES "));
        for (position, values) in remaining.by_ref().take(size).enumerate() {
            insert.push(if position == 0 { "(" } else { ", (" });
            for (column, value) in values.into_iter().enumerate() {
                if column > 0 {
                    insert.push(", ");
                }
                insert.bind(value);
            }
            insert.push(")");
        }
        statements.push(insert);
    }
    statements
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
