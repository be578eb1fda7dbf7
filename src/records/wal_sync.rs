//! Durability of the record writer's SQLite commits, off the writer's path: the writer's
//! connection commits without waiting for the disk (`synchronous = NORMAL`), and one thread
//! flushes the write-ahead log, once for every commit that arrived while its last flush ran,
//! before any of those commits' callers hears of them. The writer meanwhile runs its next batch.
//!
//! SQLite recovers a WAL up to its last intact commit, so a flush that covers a commit covers
//! every earlier one too. A failed flush stops the process, as PostgreSQL does: the kernel may
//! have dropped the pages that failed, a later flush that succeeds would not bring them back, and
//! every commit after them (by any connection) would sit behind a gap that recovery cannot reach
//! past. What was kept is for recovery, at the next start, to decide.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use super::RecordError;
use super::writer::{Reply, UnitReceipt};
use crate::storage::StorageError;

/// One unit's caller and what to tell it.
pub type Answer = (Reply, Result<UnitReceipt, RecordError>);

/// The write-ahead log of the writer's SQLite database, opened while the writer's connection
/// holds it in place (SQLite removes it only when its last connection closes). Kept open, so a
/// write-back error of its pages is reported to this descriptor's next flush.
#[derive(Debug)]
pub struct WalFile {
    file: File,
}

impl WalFile {
    /// Opens the WAL of the SQLite database file at `database_path`; `None` when there is none
    /// (a database in memory, or not in WAL mode).
    /// A WAL that cannot be opened for another reason is logged; the caller then commits with
    /// the flush inside `COMMIT`.
    pub fn open(database_path: &Path) -> Option<Self> {
        let mut wal_path = database_path.as_os_str().to_owned();
        wal_path.push("-wal");
        match std::fs::OpenOptions::new().write(true).open(wal_path) {
            Ok(file) => Some(Self { file }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
            Err(error) => {
                tracing::warn!(error = %error, "sqlite write-ahead log not opened for flushing; the record writer flushes inside each commit");
                None
            }
        }
    }

    fn flush(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

/// A committed batch: the WAL its frames are in, and the answers to send once they are durable.
struct CommittedBatch {
    wal: Arc<WalFile>,
    answers: Vec<Answer>,
}

/// The handle through which the writer passes committed batches to the flushing thread.
#[derive(Debug)]
pub struct WalSync {
    sender: mpsc::Sender<CommittedBatch>,
    failed: Arc<AtomicBool>,
}

impl WalSync {
    /// Starts the flushing thread; it ends when this handle is dropped. A failed flush stops the
    /// process once the callers it concerns are answered.
    pub fn start() -> std::io::Result<Self> {
        Self::start_with(WalFile::flush, stop_process)
    }

    fn start_with(
        flush: impl Fn(&WalFile) -> std::io::Result<()> + Send + 'static,
        after_failed_flush: fn(),
    ) -> std::io::Result<Self> {
        let (sender, receiver) = mpsc::channel();
        let failed = Arc::new(AtomicBool::new(false));
        let thread_failed = Arc::clone(&failed);
        std::thread::Builder::new()
            .name("glastonbury-wal-sync".to_owned())
            .spawn(move || {
                flush_and_answer(&receiver, &thread_failed, &flush, after_failed_flush);
            })?;
        Ok(Self { sender, failed })
    }

    /// Whether a flush failed: no write may be committed any more.
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Sends `answers` once the commit they belong to is on disk in `wal`.
    pub fn answer_when_durable(&self, wal: Arc<WalFile>, answers: Vec<Answer>) {
        if let Err(mpsc::SendError(batch)) = self.sender.send(CommittedBatch { wal, answers }) {
            // The flushing thread is gone: nothing can be made durable any more.
            self.failed.store(true, Ordering::Release);
            answer_not_durable(batch.answers);
        }
    }
}

/// The flushing thread: takes every batch committed so far, flushes their WAL once and answers.
fn flush_and_answer(
    receiver: &mpsc::Receiver<CommittedBatch>,
    failed: &AtomicBool,
    flush: &dyn Fn(&WalFile) -> std::io::Result<()>,
    after_failed_flush: fn(),
) {
    while let Ok(first) = receiver.recv() {
        let mut batches = vec![first];
        batches.extend(receiver.try_iter());
        let durable = !failed.load(Ordering::Acquire) && flush_each_wal(&batches, flush);
        if !durable {
            failed.store(true, Ordering::Release);
        }
        for batch in batches {
            if durable {
                answer(batch.answers);
            } else {
                answer_not_durable(batch.answers);
            }
        }
        if !durable {
            after_failed_flush();
        }
    }
}

/// Exit status of a process stopped by a failed WAL flush.
const EXIT_WAL_NOT_DURABLE: i32 = 75;

/// Stops the process after a failed flush, giving the answers just sent a moment to leave.
fn stop_process() {
    std::thread::sleep(std::time::Duration::from_millis(200));
    std::process::exit(EXIT_WAL_NOT_DURABLE);
}

/// Flushes the WAL of every batch (normally one file); `false` at the first failure.
fn flush_each_wal(
    batches: &[CommittedBatch],
    flush: &dyn Fn(&WalFile) -> std::io::Result<()>,
) -> bool {
    let mut flushed: Vec<&Arc<WalFile>> = Vec::new();
    for batch in batches {
        if flushed.iter().any(|wal| Arc::ptr_eq(wal, &batch.wal)) {
            continue;
        }
        if let Err(error) = flush(&batch.wal) {
            tracing::error!(error = %error, "sqlite write-ahead log could not be flushed to disk; the appliance stops so that recovery decides what was kept");
            return false;
        }
        flushed.push(&batch.wal);
    }
    true
}

/// Sends each unit its outcome.
pub fn answer(answers: Vec<Answer>) {
    for (reply, outcome) in answers {
        let _ = reply.send(outcome);
    }
}

/// Answers every unit of a batch whose commit may or may not have been kept with a storage
/// error.
pub fn answer_not_durable(answers: Vec<Answer>) {
    for (reply, _) in answers {
        let _ = reply.send(Err(not_durable()));
    }
}

/// The error of a write that cannot be made durable.
pub fn not_durable() -> RecordError {
    RecordError::Storage(StorageError::NotDurable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::sync::oneshot;

    /// Tests observe the refusals instead of the process stopping.
    fn keep_running() {}

    fn receipt(first_leaf_index: u64) -> Result<UnitReceipt, RecordError> {
        Ok(UnitReceipt {
            rows: Vec::new(),
            first_leaf_index,
        })
    }

    fn wal_in(folder: &tempfile::TempDir) -> Arc<WalFile> {
        let database = folder.path().join("glastonbury.db");
        std::fs::write(folder.path().join("glastonbury.db-wal"), b"").unwrap();
        Arc::new(WalFile::open(&database).unwrap())
    }

    #[test]
    fn a_wal_that_does_not_exist_is_not_opened() {
        let folder = tempfile::tempdir().unwrap();
        assert!(WalFile::open(&folder.path().join("missing.db")).is_none());
    }

    #[tokio::test]
    async fn callers_hear_of_a_commit_after_its_wal_is_flushed() {
        let folder = tempfile::tempdir().unwrap();
        let flushes = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&flushes);
        let sync = WalSync::start_with(
            move |wal| {
                counted.fetch_add(1, Ordering::SeqCst);
                wal.flush()
            },
            keep_running,
        )
        .unwrap();
        let (reply, answered) = oneshot::channel();
        sync.answer_when_durable(wal_in(&folder), vec![(reply, receipt(7))]);
        let outcome = answered.await.unwrap().unwrap();
        assert_eq!(outcome.first_leaf_index, 7);
        assert_eq!(flushes.load(Ordering::SeqCst), 1);
        assert!(!sync.has_failed());
    }

    #[tokio::test]
    async fn commits_that_arrive_during_a_flush_share_the_next_one() {
        let folder = tempfile::tempdir().unwrap();
        let wal = wal_in(&folder);
        let flushes = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&flushes);
        let (flush_started, started) = mpsc::channel();
        let (release, released) = mpsc::channel::<()>();
        let sync = WalSync::start_with(
            move |_| {
                counted.fetch_add(1, Ordering::SeqCst);
                flush_started.send(()).unwrap();
                released.recv().unwrap();
                Ok(())
            },
            keep_running,
        )
        .unwrap();
        let (reply, first) = oneshot::channel();
        sync.answer_when_durable(Arc::clone(&wal), vec![(reply, receipt(1))]);
        started.recv().unwrap();
        let mut later = Vec::new();
        for leaf in 2..5 {
            let (reply, answered) = oneshot::channel();
            sync.answer_when_durable(Arc::clone(&wal), vec![(reply, receipt(leaf))]);
            later.push(answered);
        }
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap().unwrap().first_leaf_index, 1);
        started.recv().unwrap();
        release.send(()).unwrap();
        for (answered, leaf) in later.into_iter().zip(2..) {
            assert_eq!(answered.await.unwrap().unwrap().first_leaf_index, leaf);
        }
        assert_eq!(flushes.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failed_flush_fails_its_batch_and_every_later_one() {
        let folder = tempfile::tempdir().unwrap();
        let wal = wal_in(&folder);
        let flushes = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&flushes);
        let sync = WalSync::start_with(
            move |_| {
                // The first flush fails; a later one would succeed, and must not be believed.
                match counted.fetch_add(1, Ordering::SeqCst) {
                    0 => Err(std::io::Error::other("write-back failed")),
                    _ => Ok(()),
                }
            },
            keep_running,
        )
        .unwrap();
        let (reply, answered) = oneshot::channel();
        sync.answer_when_durable(Arc::clone(&wal), vec![(reply, receipt(1))]);
        assert!(matches!(
            answered.await.unwrap(),
            Err(RecordError::Storage(StorageError::NotDurable))
        ));
        assert!(sync.has_failed());
        let (reply, answered) = oneshot::channel();
        sync.answer_when_durable(wal, vec![(reply, receipt(2))]);
        assert!(matches!(
            answered.await.unwrap(),
            Err(RecordError::Storage(StorageError::NotDurable))
        ));
        assert_eq!(flushes.load(Ordering::SeqCst), 1);
    }
}
