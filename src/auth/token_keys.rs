//! Generations of the access-token signing key: the newest signs, the one before it keeps
//! verifying (and stays in `/auth/jwks`) until the next rotation. Seeds live wrapped in the vault.

use sqlx::Row;

use crate::storage::{Database, StorageError, now_micros};
use crate::vault::{Vault, VaultError};

/// Why the token keys could not be read or rotated.
#[derive(Debug, thiserror::Error)]
pub enum TokenKeyError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Vault(#[from] VaultError),
}

impl From<sqlx::Error> for TokenKeyError {
    fn from(error: sqlx::Error) -> Self {
        Self::Storage(StorageError::from(error))
    }
}

/// The newest generation and the seeds in use (newest first, at most two).
pub async fn token_seeds(
    database: &Database,
    vault: &Vault,
) -> Result<(u32, Vec<[u8; 32]>), TokenKeyError> {
    let mut generations = newest_generations(database).await?;
    if generations.is_empty() {
        insert_generation(database, 1).await?;
        generations = vec![1];
    }
    let mut seeds = Vec::with_capacity(generations.len());
    for generation in &generations {
        seeds.push(*vault.token_signing_seed(*generation).await?);
    }
    Ok((generations[0], seeds))
}

/// Starts a new signing key generation; returns it.
pub async fn rotate_token_key(database: &Database, vault: &Vault) -> Result<u32, TokenKeyError> {
    let (newest, _) = token_seeds(database, vault).await?;
    let next = newest + 1;
    vault.token_signing_seed(next).await?;
    insert_generation(database, next).await?;
    Ok(next)
}

async fn newest_generations(database: &Database) -> Result<Vec<u32>, TokenKeyError> {
    let rows =
        sqlx::query("SELECT generation FROM token_signing_keys ORDER BY generation DESC LIMIT 2")
            .fetch_all(database.pool())
            .await?;
    Ok(rows
        .iter()
        .filter_map(|row| row.try_get::<i64, _>(0).ok())
        .filter_map(|generation| u32::try_from(generation).ok())
        .collect())
}

async fn insert_generation(database: &Database, generation: u32) -> Result<(), TokenKeyError> {
    sqlx::query(
        "INSERT INTO token_signing_keys (generation, created_at) VALUES ($1, $2) \
         ON CONFLICT (generation) DO NOTHING",
    )
    .bind(i64::from(generation))
    .bind(now_micros())
    .execute(database.pool())
    .await?;
    Ok(())
}
