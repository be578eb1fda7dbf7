//! Signed checkpoints: the signing keys (one generation per rotation, seeds wrapped in the
//! vault, public keys kept forever), and the service that signs a C2SP checkpoint of the current
//! tree every few seconds while there are new entries, refusing to sign a tree that is not
//! consistent with the last signed one.

use std::sync::Arc;
use std::time::Duration;

use glastonbury_audit::{
    Checkpoint, CompactRange, NoteSigner, NoteVerifier, consistency_plan, verify_consistency,
};
use sqlx::{AnyConnection, Row};
use tokio::sync::RwLock;

use super::JournalError;
use super::append::to_i64;
use super::store::{self, StoredCheckpoint};
use crate::storage::{Database, now_micros};
use crate::vault::Vault;

/// The checkpoint signing keys of one appliance.
#[derive(Debug)]
pub struct SigningKeys {
    origin: String,
    generation: u32,
    signer: NoteSigner,
    /// Every generation's public key, oldest first.
    verifiers: Vec<NoteVerifier>,
}

impl SigningKeys {
    /// Loads the keys, creating generation 1 (and with it the log's origin) on first use.
    pub async fn load(
        database: &Database,
        vault: &Vault,
        appliance_id: &str,
    ) -> Result<Self, JournalError> {
        let rows = key_rows(database).await?;
        if rows.is_empty() {
            let origin = origin_for(appliance_id);
            let signer = NoteSigner::from_seed(&origin, &vault.audit_signing_seed(1).await?)?;
            insert_generation(database, 1, &signer).await?;
            return Box::pin(Self::load(database, vault, appliance_id)).await;
        }
        let verifiers = rows
            .iter()
            .map(|(_, text)| NoteVerifier::from_key_text(text))
            .collect::<Result<Vec<_>, _>>()?;
        let (generation, current_text) = rows
            .last()
            .cloned()
            .ok_or_else(|| JournalError::Damaged("no signing key".to_owned()))?;
        let origin = verifiers
            .first()
            .map(|verifier| verifier.name().to_owned())
            .unwrap_or_default();
        let signer = NoteSigner::from_seed(&origin, &vault.audit_signing_seed(generation).await?)?;
        if signer.verifier().to_key_text() != current_text {
            return Err(JournalError::Damaged(format!(
                "signing key generation {generation} does not match its stored public key"
            )));
        }
        Ok(Self {
            origin,
            generation,
            signer,
            verifiers,
        })
    }

    /// Creates the next key generation and returns the keys with it current. The caller should
    /// sign a handover checkpoint with both the old and the new key.
    pub async fn rotate(
        database: &Database,
        vault: &Vault,
        appliance_id: &str,
    ) -> Result<(Self, Self), JournalError> {
        let old = Self::load(database, vault, appliance_id).await?;
        let generation = old.generation + 1;
        let signer =
            NoteSigner::from_seed(&old.origin, &vault.audit_signing_seed(generation).await?)?;
        insert_generation(database, generation, &signer).await?;
        let new = Self::load(database, vault, appliance_id).await?;
        Ok((old, new))
    }

    /// The log origin (first line of every checkpoint), fixed at first start.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    pub fn signer(&self) -> &NoteSigner {
        &self.signer
    }

    /// Every generation's public key, oldest first.
    pub fn verifiers(&self) -> &[NoteVerifier] {
        &self.verifiers
    }

    /// The current public key in note verifier form (`<origin>+<hash>+<key>`).
    pub fn public_key_text(&self) -> String {
        self.signer.verifier().to_key_text()
    }
}

/// The checkpoint origin for an appliance id: a schema-less name without spaces or `+`.
fn origin_for(appliance_id: &str) -> String {
    let cleaned: String = appliance_id
        .chars()
        .map(|character| {
            if character.is_ascii_alphanumeric() || matches!(character, '.' | '-' | '_') {
                character
            } else {
                '-'
            }
        })
        .collect();
    format!("{cleaned}/glastonbury-audit")
}

async fn key_rows(database: &Database) -> Result<Vec<(u32, String)>, JournalError> {
    let rows =
        sqlx::query("SELECT generation, verifier_key FROM audit_signing_keys ORDER BY generation")
            .fetch_all(database.pool())
            .await?;
    rows.iter()
        .map(|row| {
            let generation = u32::try_from(row.try_get::<i64, _>(0)?)
                .map_err(|_| JournalError::Damaged("bad key generation".to_owned()))?;
            Ok((generation, row.try_get(1)?))
        })
        .collect()
}

async fn insert_generation(
    database: &Database,
    generation: u32,
    signer: &NoteSigner,
) -> Result<(), JournalError> {
    sqlx::query(
        "INSERT INTO audit_signing_keys (generation, verifier_key, created_at) VALUES ($1, $2, $3) \
         ON CONFLICT (generation) DO NOTHING",
    )
    .bind(i64::from(generation))
    .bind(signer.verifier().to_key_text())
    .bind(now_micros())
    .execute(database.pool())
    .await?;
    Ok(())
}

/// Signs and stores checkpoints of the journal.
#[derive(Debug)]
pub struct CheckpointService {
    database: Database,
    vault: Arc<Vault>,
    appliance_id: String,
    keys: RwLock<Arc<SigningKeys>>,
}

impl CheckpointService {
    pub async fn open(
        database: Database,
        vault: Arc<Vault>,
        appliance_id: &str,
    ) -> Result<Self, JournalError> {
        let keys = SigningKeys::load(&database, &vault, appliance_id).await?;
        Ok(Self {
            database,
            vault,
            appliance_id: appliance_id.to_owned(),
            keys: RwLock::new(Arc::new(keys)),
        })
    }

    /// The current keys (reloaded when another process rotated them).
    pub async fn keys(&self) -> Result<Arc<SigningKeys>, JournalError> {
        let current = Arc::clone(&*self.keys.read().await);
        let newest_generation = key_rows(&self.database)
            .await?
            .last()
            .map_or(0, |(generation, _)| *generation);
        if newest_generation == current.generation {
            return Ok(current);
        }
        let reloaded =
            Arc::new(SigningKeys::load(&self.database, &self.vault, &self.appliance_id).await?);
        *self.keys.write().await = Arc::clone(&reloaded);
        Ok(reloaded)
    }

    /// Rotates the signing key: a new generation, and a handover checkpoint of the current tree
    /// signed by both the old and the new key.
    pub async fn rotate(&self) -> Result<Arc<SigningKeys>, JournalError> {
        let (old, new) =
            SigningKeys::rotate(&self.database, &self.vault, &self.appliance_id).await?;
        let new = Arc::new(new);
        *self.keys.write().await = Arc::clone(&new);
        let mut connection = self.database.pool().acquire().await?;
        let range = store::read_head(&mut connection).await?;
        if range.size() > 0 {
            self.check_against_latest(&mut connection, &new, &range)
                .await?;
            let checkpoint = Checkpoint {
                origin: new.origin().to_owned(),
                size: range.size(),
                root: range.root(),
            };
            let note = checkpoint.sign(&[old.signer(), new.signer()])?;
            store_checkpoint(&mut connection, range.size(), &note, true).await?;
        }
        Ok(new)
    }

    /// Signs a checkpoint of the current tree when it grew since the last one; returns the
    /// latest checkpoint either way (`None` while the log is empty).
    pub async fn sign_if_grown(&self) -> Result<Option<StoredCheckpoint>, JournalError> {
        // Keys first: never wait for a second pooled connection while holding one.
        let keys = self.keys().await?;
        let mut connection = self.database.pool().acquire().await?;
        let range = store::read_head(&mut connection).await?;
        let latest = store::latest_checkpoint(&mut connection).await?;
        if let Some(latest) = latest.filter(|latest| latest.tree_size >= range.size()) {
            return Ok(Some(latest));
        }
        if range.size() == 0 {
            return Ok(None);
        }
        self.sign_current(&mut connection, &keys)
            .await
            .map(|(_, checkpoint)| Some(checkpoint))
    }

    /// Signs a checkpoint of the tree as it is now. When another signer (timer, export, replica)
    /// certified a larger tree between our read of the head and our check, the head is read
    /// again rather than mistaking the race for rewritten history.
    pub async fn sign_current(
        &self,
        connection: &mut AnyConnection,
        keys: &SigningKeys,
    ) -> Result<(CompactRange, StoredCheckpoint), JournalError> {
        const ATTEMPTS: usize = 3;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let range = store::read_head(connection).await?;
            match self.sign_range(connection, keys, &range).await {
                Err(JournalError::Inconsistent {
                    checkpoint_size,
                    size,
                }) if checkpoint_size > size && attempt < ATTEMPTS => continue,
                other => return other.map(|checkpoint| (range, checkpoint)),
            }
        }
    }

    /// Signs (and stores) a checkpoint of exactly `range`, after checking it extends the
    /// latest signed checkpoint.
    pub async fn sign_range(
        &self,
        connection: &mut AnyConnection,
        keys: &SigningKeys,
        range: &CompactRange,
    ) -> Result<StoredCheckpoint, JournalError> {
        self.check_against_latest(connection, keys, range).await?;
        let checkpoint = Checkpoint {
            origin: keys.origin().to_owned(),
            size: range.size(),
            root: range.root(),
        };
        let note = checkpoint.sign(&[keys.signer()])?;
        store_checkpoint(connection, range.size(), &note, false).await
    }

    /// Refuses a tree that does not extend the latest signed checkpoint (rewritten history).
    async fn check_against_latest(
        &self,
        connection: &mut AnyConnection,
        keys: &SigningKeys,
        range: &CompactRange,
    ) -> Result<(), JournalError> {
        let Some(latest) = store::latest_checkpoint(connection).await? else {
            return Ok(());
        };
        check_consistency(connection, keys.verifiers(), &latest.note, range).await
    }

    /// Signs every `interval` while the log grows, until the process ends.
    pub fn spawn_periodic(self: Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                if let Err(error) = self.sign_if_grown().await {
                    tracing::error!(error = %error, "audit checkpoint was not signed");
                }
            }
        })
    }
}

/// Checks that `range` (the stored tree) extends the signed checkpoint `note`, by a consistency
/// proof assembled from stored nodes.
pub async fn check_consistency(
    connection: &mut AnyConnection,
    verifiers: &[NoteVerifier],
    note: &str,
    range: &CompactRange,
) -> Result<(), JournalError> {
    let signed = Checkpoint::open(note, verifiers)?;
    let inconsistent = || JournalError::Inconsistent {
        checkpoint_size: signed.size,
        size: range.size(),
    };
    if signed.size > range.size() {
        return Err(inconsistent());
    }
    if signed.size == range.size() {
        return if signed.root == range.root() {
            Ok(())
        } else {
            Err(inconsistent())
        };
    }
    let plan = consistency_plan(signed.size, range.size())?;
    let nodes = store::fetch_nodes(connection, &plan.nodes()).await?;
    let proof = plan.assemble(&nodes).map_err(|_| inconsistent())?;
    verify_consistency(
        signed.size,
        range.size(),
        &signed.root,
        &range.root(),
        &proof,
    )
    .map_err(|_| inconsistent())
}

async fn store_checkpoint(
    connection: &mut AnyConnection,
    size: u64,
    note: &str,
    replace: bool,
) -> Result<StoredCheckpoint, JournalError> {
    let created_at = now_micros();
    let sql = if replace {
        "INSERT INTO audit_checkpoints (tree_size, note, created_at) VALUES ($1, $2, $3) \
         ON CONFLICT (tree_size) DO UPDATE SET note = excluded.note, created_at = excluded.created_at"
    } else {
        "INSERT INTO audit_checkpoints (tree_size, note, created_at) VALUES ($1, $2, $3) \
         ON CONFLICT (tree_size) DO NOTHING"
    };
    sqlx::query(sql)
        .bind(to_i64(size)?)
        .bind(note)
        .bind(created_at)
        .execute(&mut *connection)
        .await?;
    let row = sqlx::query(
        "SELECT tree_size, note, created_at FROM audit_checkpoints WHERE tree_size = $1",
    )
    .bind(to_i64(size)?)
    .fetch_one(&mut *connection)
    .await?;
    Ok(StoredCheckpoint {
        tree_size: size,
        note: row.try_get(1)?,
        created_at: row.try_get(2)?,
    })
}
