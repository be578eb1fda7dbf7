//! Storage: one interface over two engines (SQLite, the embedded default, and PostgreSQL for
//! several replicas) through sqlx's `Any` driver, embedded migrations, and the blob store.

pub mod blobs;
pub mod statement;

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, ConnectOptions, Executor, Row};

pub use blobs::{BlobError, BlobStore};

/// Errors of the database layer. Messages carry no values from rows, so no PHI.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("unsupported database url scheme {0:?}: use sqlite:// or postgres://")]
    UnsupportedScheme(String),
    #[error("cannot create the database directory {path}: {source}")]
    CreateDirectory {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot connect to the database: {0}")]
    Connect(String),
    #[error("database migration failed: {0}")]
    Migrate(String),
    #[error("database error: {0}")]
    Database(String),
    #[error(
        "the database's write-ahead log could not be flushed to disk, so whether this write was kept is unknown; the appliance is stopping"
    )]
    NotDurable,
}

impl From<sqlx::Error> for StorageError {
    fn from(error: sqlx::Error) -> Self {
        Self::Database(describe_sqlx_error(&error))
    }
}

/// A description of a sqlx error that never includes bound values.
fn describe_sqlx_error(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Database(database_error) => {
            format!(
                "{} (code {})",
                database_error.message(),
                database_error.code().unwrap_or_default()
            )
        }
        other => other.to_string(),
    }
}

/// Which engine a database runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

impl Engine {
    /// The engine behind a connection of sqlx's `Any` driver.
    pub fn of_connection(connection: &sqlx::AnyConnection) -> Self {
        match connection.backend_name() {
            "SQLite" => Self::Sqlite,
            _ => Self::Postgres,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

/// The appliance's database: a connection pool and the engine behind it.
#[derive(Debug, Clone)]
pub struct Database {
    pool: AnyPool,
    engine: Engine,
    /// Held while SQLite's WAL is checkpointed: SQLite refuses a second checkpointer outright
    /// (no busy wait), so the periodic, the reclaiming and the closing checkpoint take turns.
    wal_checkpoint: Arc<tokio::sync::Mutex<()>>,
    /// Record writer commits since the last periodic checkpoint.
    commits_since_checkpoint: Arc<AtomicU64>,
}

/// How often a serving process looks whether SQLite's WAL is due for a checkpoint (see
/// [`Database::checkpoint_wal_periodically`]).
const WAL_CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);

/// Writer commits after which the WAL is checkpointed at the next look. A commit of four
/// C-STOREs adds about 160 pages, so 16 commits stay well under [`WAL_AUTOCHECKPOINT_PAGES`]
/// (at 64, a busy writer reached it and checkpointed inside a commit again).
const WAL_CHECKPOINT_COMMITS: u64 = 16;

/// The longest a committed WAL waits for its checkpoint when fewer commits arrive. Each full
/// checkpoint makes the next commit restart the WAL (one more fsync), so a quiet appliance
/// checkpoints about once a second, not after every commit.
const WAL_CHECKPOINT_AT_MOST_EVERY: Duration = Duration::from_secs(1);

/// The WAL size, in pages, at which a committing connection checkpoints by itself: the fallback
/// for processes without the periodic checkpointer (commands) or when it falls behind.
const WAL_AUTOCHECKPOINT_PAGES: u32 = 8192;

/// Microseconds since the Unix epoch, the timestamp unit of every table.
pub fn now_micros() -> i64 {
    let elapsed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(elapsed.as_micros()).unwrap_or(i64::MAX)
}

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

impl Database {
    /// Connects to the database named by `url`; for SQLite, creates the file (and its folder)
    /// and sets WAL with `synchronous=FULL`, so every commit is on disk before it returns.
    pub async fn connect(url: &SecretString) -> Result<Self, StorageError> {
        sqlx::any::install_default_drivers();
        let text = url.expose_secret();
        let engine = engine_of(text)?;
        let pool = match engine {
            Engine::Sqlite => connect_sqlite(text).await?,
            Engine::Postgres => connect_postgres(text).await?,
        };
        Ok(Self {
            pool,
            engine,
            wal_checkpoint: Arc::default(),
            commits_since_checkpoint: Arc::default(),
        })
    }

    /// Applies the embedded migrations. On PostgreSQL sqlx holds an advisory lock while it
    /// migrates, so several replicas starting at once are safe.
    pub async fn migrate(&self) -> Result<(), StorageError> {
        let migrator = match self.engine {
            Engine::Sqlite => &SQLITE_MIGRATIONS,
            Engine::Postgres => &POSTGRES_MIGRATIONS,
        };
        migrator
            .run(&self.pool)
            .await
            .map_err(|error| StorageError::Migrate(error.to_string()))
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// Answers whether the database takes a trivial query, for `/readyz`.
    pub async fn ping(&self) -> Result<(), StorageError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Makes deleted rows (shredded keys) unrecoverable from the files: SQLite overwrites freed
    /// pages (`secure_delete`) and checkpoints its WAL; PostgreSQL vacuums the key table.
    pub async fn reclaim_deleted_space(&self) -> Result<(), StorageError> {
        match self.engine {
            Engine::Sqlite => {
                let _turn = self.wal_checkpoint.lock().await;
                if !self.checkpoint_wal("TRUNCATE").await? {
                    return Err(StorageError::Database(
                        "the write-ahead log still holds deleted pages: a reader kept it busy; retry"
                            .to_owned(),
                    ));
                }
            }
            Engine::Postgres => {
                self.pool.execute("VACUUM patient_keys").await?;
            }
        }
        Ok(())
    }

    /// Closes every connection. SQLite's WAL is checkpointed into the database file first:
    /// SQLite checkpoints when its last connection closes, but two connections closing at once
    /// can each see the other still open and both skip it, leaving the WAL for whichever
    /// process opens the file next (even a command that then fails on a wrong master key).
    pub async fn close(&self) {
        let _turn = self.wal_checkpoint.lock().await;
        if self.engine == Engine::Sqlite {
            match self.checkpoint_wal("TRUNCATE").await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!("sqlite wal not checkpointed at close: a reader kept it busy")
                }
                Err(error) => {
                    tracing::warn!(error = %describe_sqlx_error(&error), "sqlite wal not checkpointed at close")
                }
            }
        }
        self.pool.close().await;
    }

    /// Counts a record writer commit toward the next periodic WAL checkpoint.
    pub fn note_commit(&self) {
        self.commits_since_checkpoint
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Runs `PRAGMA wal_checkpoint(mode)`; `false` when SQLite could not finish it (it reports
    /// that in its result row, not as an error).
    async fn checkpoint_wal(&self, mode: &str) -> Result<bool, sqlx::Error> {
        let row = sqlx::query(&format!("PRAGMA wal_checkpoint({mode})"))
            .fetch_one(&self.pool)
            .await?;
        let busy: i64 = row.try_get(0)?;
        Ok(busy == 0)
    }

    /// Moves SQLite's WAL into the database file, on a pool connection (its own thread), after
    /// [`WAL_CHECKPOINT_COMMITS`] writer commits or [`WAL_CHECKPOINT_AT_MOST_EVERY`], whichever
    /// comes first, until the pool closes; nothing on PostgreSQL.
    ///
    /// Without it the commit that fills the WAL checkpoints it: that commit's caller waits for
    /// thousands of page copies and an fsync of the database file. Passive checkpoints here take
    /// that work off the writer's path and onto the other core.
    pub async fn checkpoint_wal_periodically(self) {
        if self.engine != Engine::Sqlite {
            return;
        }
        let mut ticker = tokio::time::interval(WAL_CHECKPOINT_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_checkpoint = Instant::now();
        loop {
            ticker.tick().await;
            let commits = self.commits_since_checkpoint.load(Ordering::Relaxed);
            let due = commits >= WAL_CHECKPOINT_COMMITS
                || (commits > 0 && last_checkpoint.elapsed() >= WAL_CHECKPOINT_AT_MOST_EVERY);
            if !due {
                continue;
            }
            // A shred or the close is checkpointing: that one covers these commits too.
            let Ok(_turn) = self.wal_checkpoint.try_lock() else {
                continue;
            };
            if self.pool.is_closed() {
                return;
            }
            self.commits_since_checkpoint
                .fetch_sub(commits, Ordering::Relaxed);
            last_checkpoint = Instant::now();
            if let Err(error) = self.checkpoint_wal("PASSIVE").await {
                tracing::warn!(error = %describe_sqlx_error(&error), "sqlite wal checkpoint failed");
            }
        }
    }
}

fn engine_of(url: &str) -> Result<Engine, StorageError> {
    let scheme = url.split(':').next().unwrap_or_default();
    match scheme {
        "sqlite" => Ok(Engine::Sqlite),
        "postgres" | "postgresql" => Ok(Engine::Postgres),
        other => Err(StorageError::UnsupportedScheme(other.to_owned())),
    }
}

async fn connect_sqlite(url: &str) -> Result<AnyPool, StorageError> {
    let path_part = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let path = std::path::Path::new(path_part.split('?').next().unwrap_or_default());
    if let Some(parent) = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent).map_err(|source| StorageError::CreateDirectory {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    let with_mode = if url.contains('?') {
        url.to_owned()
    } else {
        format!("{url}?mode=rwc")
    };
    let options = AnyConnectOptions::from_str(&with_mode)
        .map_err(|error| StorageError::Connect(error.to_string()))?
        .disable_statement_logging();
    // No memory map: the file grows with every commit and each connection then remaps it, an
    // munmap with TLB shootdowns per connection per commit (measured: 4 per C-STORE). No ping
    // before handing out a connection either: a local file cannot drop it, and each ping is a
    // round trip to the connection's thread.
    AnyPoolOptions::new()
        .max_connections(8)
        .test_before_acquire(false)
        .acquire_timeout(Duration::from_secs(30))
        .after_connect(|connection, _| {
            Box::pin(async move {
                let pragmas = format!(
                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 30000; \
                     PRAGMA foreign_keys = ON; PRAGMA secure_delete = ON; \
                     PRAGMA cache_size = -32768; PRAGMA temp_store = MEMORY; \
                     PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES};"
                );
                connection.execute(pragmas.as_str()).await?;
                Ok(())
            })
        })
        .connect_with(options)
        .await
        .map_err(|error| StorageError::Connect(describe_sqlx_error(&error)))
}

async fn connect_postgres(url: &str) -> Result<AnyPool, StorageError> {
    let options = AnyConnectOptions::from_str(url)
        .map_err(|error| StorageError::Connect(error.to_string()))?
        .disable_statement_logging();
    AnyPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(|error| StorageError::Connect(describe_sqlx_error(&error)))
}
