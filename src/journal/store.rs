//! Reading stored journal state: the head, nodes for proofs, leaves and checkpoints.

use std::collections::HashMap;

use glastonbury_audit::{CompactRange, Hash, NodeId};
use sqlx::{AnyConnection, Row};

use super::JournalError;
use super::append::to_i64;

/// Node lookups per SELECT.
const NODES_PER_STATEMENT: usize = 200;

/// The appender state committed in `journal_head` (size and frontier hashes). Falls back to the
/// stored nodes when the frontier column does not match the size.
pub async fn read_head(connection: &mut AnyConnection) -> Result<CompactRange, JournalError> {
    let row = sqlx::query("SELECT tree_size, frontier FROM journal_head WHERE id = 1")
        .fetch_one(&mut *connection)
        .await?;
    head_of_row(connection, &row).await
}

/// The appender state a `(tree_size, frontier)` row of `journal_head` describes; a frontier that
/// does not fit the size is restored from the stored nodes.
pub async fn head_of_row(
    connection: &mut AnyConnection,
    row: &sqlx::any::AnyRow,
) -> Result<CompactRange, JournalError> {
    let size = u64::try_from(row.try_get::<i64, _>(0)?)
        .map_err(|_| JournalError::Damaged("negative tree size".to_owned()))?;
    let frontier: Vec<u8> = row.try_get(1)?;
    let expected = size.count_ones() as usize;
    if frontier.len() == expected * 32 {
        let hashes = frontier
            .chunks_exact(32)
            .map(hash_from_slice)
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(CompactRange::from_hashes(size, hashes)?);
    }
    tracing::warn!(
        tree_size = size,
        "journal frontier does not match the tree size; restoring it from stored nodes"
    );
    let needed = CompactRange::nodes_needed(size);
    let found = fetch_nodes(connection, &needed).await?;
    let hashes = needed
        .iter()
        .map(|id| {
            found.get(id).copied().ok_or_else(|| {
                JournalError::Damaged(format!(
                    "node at level {} index {} is missing",
                    id.level, id.index
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(CompactRange::from_hashes(size, hashes)?)
}

/// The stored hashes of `ids` (absent ones are simply not in the map).
pub async fn fetch_nodes(
    connection: &mut AnyConnection,
    ids: &[NodeId],
) -> Result<HashMap<NodeId, Hash>, JournalError> {
    let mut found = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(NODES_PER_STATEMENT) {
        let mut sql = String::from("SELECT level, node_index, hash FROM audit_nodes WHERE ");
        for position in 0..chunk.len() {
            if position > 0 {
                sql.push_str(" OR ");
            }
            let first = position * 2 + 1;
            sql.push_str(&format!(
                "(level = ${first} AND node_index = ${})",
                first + 1
            ));
        }
        let mut query = sqlx::query(&sql);
        for id in chunk {
            query = query.bind(i64::from(id.level)).bind(to_i64(id.index)?);
        }
        for row in query.fetch_all(&mut *connection).await? {
            let level = u8::try_from(row.try_get::<i64, _>(0)?)
                .map_err(|_| JournalError::Damaged("node level out of range".to_owned()))?;
            let index = u64::try_from(row.try_get::<i64, _>(1)?)
                .map_err(|_| JournalError::Damaged("negative node index".to_owned()))?;
            let hash: Vec<u8> = row.try_get(2)?;
            found.insert(NodeId::new(level, index), hash_from_slice(&hash)?);
        }
    }
    Ok(found)
}

/// One stored leaf.
#[derive(Debug, Clone)]
pub struct StoredLeaf {
    pub index: u64,
    pub bytes: Vec<u8>,
    pub patient_ref: Option<String>,
}

/// Leaves with `begin <= index < end`, in index order.
pub async fn leaves_between(
    connection: &mut AnyConnection,
    begin: u64,
    end: u64,
) -> Result<Vec<StoredLeaf>, JournalError> {
    let rows = sqlx::query(
        "SELECT leaf_index, leaf, patient_ref FROM audit_leaves WHERE leaf_index >= $1 AND leaf_index < $2 ORDER BY leaf_index",
    )
    .bind(to_i64(begin)?)
    .bind(to_i64(end)?)
    .fetch_all(&mut *connection)
    .await?;
    rows.iter().map(stored_leaf).collect()
}

/// The first index below `size` with no stored leaf, if any (a deleted entry).
pub async fn first_missing_leaf(
    connection: &mut AnyConnection,
    size: u64,
) -> Result<Option<u64>, JournalError> {
    let row = sqlx::query("SELECT COUNT(*) FROM audit_leaves WHERE leaf_index < $1")
        .bind(to_i64(size)?)
        .fetch_one(&mut *connection)
        .await?;
    let count = u64::try_from(row.try_get::<i64, _>(0)?).unwrap_or(0);
    if count == size {
        return Ok(None);
    }
    let (mut low, mut high) = (0u64, size);
    // Binary search for the first index whose prefix count falls short.
    while low < high {
        let middle = low + (high - low) / 2;
        let row = sqlx::query("SELECT COUNT(*) FROM audit_leaves WHERE leaf_index <= $1")
            .bind(to_i64(middle)?)
            .fetch_one(&mut *connection)
            .await?;
        let present = u64::try_from(row.try_get::<i64, _>(0)?).unwrap_or(0);
        if present < middle + 1 {
            high = middle;
        } else {
            low = middle + 1;
        }
    }
    Ok(Some(low))
}

/// The smallest stored leaf index at or after `index`.
pub async fn first_leaf_from(
    connection: &mut AnyConnection,
    index: u64,
) -> Result<Option<u64>, JournalError> {
    let row = sqlx::query(
        "SELECT leaf_index FROM audit_leaves WHERE leaf_index >= $1 ORDER BY leaf_index LIMIT 1",
    )
    .bind(to_i64(index)?)
    .fetch_optional(&mut *connection)
    .await?;
    row.map(|row| {
        u64::try_from(row.try_get::<i64, _>(0)?)
            .map_err(|_| JournalError::Damaged("negative leaf index".to_owned()))
    })
    .transpose()
}

pub(crate) fn stored_leaf(row: &sqlx::any::AnyRow) -> Result<StoredLeaf, JournalError> {
    Ok(StoredLeaf {
        index: u64::try_from(row.try_get::<i64, _>(0)?)
            .map_err(|_| JournalError::Damaged("negative leaf index".to_owned()))?,
        bytes: row.try_get(1)?,
        patient_ref: row.try_get(2)?,
    })
}

/// One stored signed checkpoint.
#[derive(Debug, Clone)]
pub struct StoredCheckpoint {
    pub tree_size: u64,
    pub note: String,
    pub created_at: i64,
}

/// The checkpoint with the largest tree size, if any was signed.
pub async fn latest_checkpoint(
    connection: &mut AnyConnection,
) -> Result<Option<StoredCheckpoint>, JournalError> {
    let row = sqlx::query(
        "SELECT tree_size, note, created_at FROM audit_checkpoints ORDER BY tree_size DESC LIMIT 1",
    )
    .fetch_optional(&mut *connection)
    .await?;
    row.as_ref().map(stored_checkpoint).transpose()
}

/// Every stored checkpoint, smallest tree first.
pub async fn all_checkpoints(
    connection: &mut AnyConnection,
) -> Result<Vec<StoredCheckpoint>, JournalError> {
    let rows =
        sqlx::query("SELECT tree_size, note, created_at FROM audit_checkpoints ORDER BY tree_size")
            .fetch_all(&mut *connection)
            .await?;
    rows.iter().map(stored_checkpoint).collect()
}

fn stored_checkpoint(row: &sqlx::any::AnyRow) -> Result<StoredCheckpoint, JournalError> {
    Ok(StoredCheckpoint {
        tree_size: u64::try_from(row.try_get::<i64, _>(0)?)
            .map_err(|_| JournalError::Damaged("negative checkpoint size".to_owned()))?,
        note: row.try_get(1)?,
        created_at: row.try_get(2)?,
    })
}

fn hash_from_slice(bytes: &[u8]) -> Result<Hash, JournalError> {
    Hash::try_from(bytes)
        .map_err(|_| JournalError::Damaged("stored hash is not 32 bytes".to_owned()))
}
