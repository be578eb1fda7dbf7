//! Appending leaves: encode drafts into canonical leaves, then, inside the group-commit
//! transaction that holds the journal head row, write the leaves, every Merkle node they
//! complete, and the new frontier, so the tree is always exactly as durable as the effects.

use glastonbury_audit::{CompactRange, Hash, StoredNode};
use sqlx::AnyConnection;

use super::JournalError;
use super::draft::{AuditDraft, JournalIdentity, to_event};
use super::store;
use crate::storage::Engine;
use crate::storage::statement::AnyQuery;

/// Rows per multi-row INSERT (well below SQLite's and PostgreSQL's parameter limits).
const LEAF_ROWS_PER_STATEMENT: usize = 200;
const NODE_ROWS_PER_STATEMENT: usize = 400;

/// A leaf ready to append: canonical bytes plus the columns the query API filters on.
#[derive(Debug, Clone)]
pub struct PendingLeaf {
    pub bytes: Vec<u8>,
    pub hash: Hash,
    pub recorded_at: i64,
    pub patient_ref: Option<String>,
    pub agent_id: String,
    pub event_code: String,
    pub outcome: i64,
}

impl PendingLeaf {
    /// Encodes `draft` as the canonical leaf of an event recorded at `recorded_at` (µs).
    pub fn encode(
        identity: &JournalIdentity,
        draft: &AuditDraft,
        recorded_at: i64,
    ) -> Result<Self, JournalError> {
        let event = to_event(identity, draft, recorded_at);
        let bytes = event.leaf_bytes()?;
        Ok(Self {
            hash: glastonbury_audit::leaf_hash(&bytes),
            bytes,
            recorded_at,
            patient_ref: draft.patient_pseudonym().map(str::to_owned),
            agent_id: draft.agent_id.clone(),
            event_code: draft.event_code.code.to_owned(),
            outcome: i64::from(draft.outcome.code()),
        })
    }
}

/// The statement that takes the journal head row (returning its tree size and frontier): the
/// first write of every batch, so batches serialize on it on both engines.
pub const LOCK_HEAD: &str =
    "UPDATE journal_head SET batches = batches + 1 WHERE id = 1 RETURNING tree_size, frontier";

/// Takes the journal head row for this transaction and returns the appender state it holds.
pub async fn lock_head(connection: &mut AnyConnection) -> Result<CompactRange, JournalError> {
    let row = sqlx::query(LOCK_HEAD).fetch_one(&mut *connection).await?;
    store::head_of_row(connection, &row).await
}

/// How the append leaves the transaction it ran in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Open, for the caller to commit.
    LeaveOpen,
    /// Committed (SQLite, in the append's last query when it fits one).
    Commit,
}

/// Appends `leaves` after `range` inside the caller's transaction: leaf rows, completed nodes,
/// and the new head; then ends the transaction as `finish` says. Returns the index of the first
/// appended leaf. On error `range` is unchanged.
pub async fn append_leaves(
    connection: &mut AnyConnection,
    range: &mut CompactRange,
    leaves: &[PendingLeaf],
    finish: Finish,
) -> Result<u64, JournalError> {
    let first_index = range.size();
    if leaves.is_empty() {
        end_transaction(connection, finish).await?;
        return Ok(first_index);
    }
    let hashes: Vec<Hash> = leaves.iter().map(|leaf| leaf.hash).collect();
    let mut next = range.clone();
    let batch = next.append_batch(&hashes)?;
    let fits_one_query = leaves.len() <= LEAF_ROWS_PER_STATEMENT
        && batch.nodes.len() <= NODE_ROWS_PER_STATEMENT
        && Engine::of_connection(connection) == Engine::Sqlite;
    if fits_one_query {
        append_in_one_query(connection, first_index, leaves, &batch.nodes, &next, finish).await?;
    } else {
        insert_leaf_rows(connection, first_index, leaves).await?;
        insert_node_rows(connection, &batch.nodes).await?;
        store_head(connection, &next).await?;
        end_transaction(connection, finish).await?;
    }
    *range = next;
    Ok(first_index)
}

async fn end_transaction(
    connection: &mut AnyConnection,
    finish: Finish,
) -> Result<(), JournalError> {
    if finish == Finish::Commit {
        sqlx::query("COMMIT").execute(&mut *connection).await?;
    }
    Ok(())
}

const INSERT_LEAVES: &str = "INSERT INTO audit_leaves (leaf_index, leaf, recorded_at, patient_ref, agent_id, event_code, outcome) VALUES ";
const LEAF_COLUMNS: usize = 7;
const INSERT_NODES: &str = "INSERT INTO audit_nodes (level, node_index, hash) VALUES ";
const NODE_COLUMNS: usize = 3;

/// Leaves, nodes, head (and the commit) as one multi-statement query: one round trip to SQLite's
/// connection thread instead of three or four (SQLite numbers placeholders across the statements
/// of one query).
async fn append_in_one_query(
    connection: &mut AnyConnection,
    first_index: u64,
    leaves: &[PendingLeaf],
    nodes: &[StoredNode],
    head: &CompactRange,
    finish: Finish,
) -> Result<(), JournalError> {
    let mut sql = multi_row_insert_from(INSERT_LEAVES, LEAF_COLUMNS, leaves.len(), 1);
    let mut next_parameter = 1 + LEAF_COLUMNS * leaves.len();
    if !nodes.is_empty() {
        sql.push_str(";\n");
        sql.push_str(&multi_row_insert_from(
            INSERT_NODES,
            NODE_COLUMNS,
            nodes.len(),
            next_parameter,
        ));
        next_parameter += NODE_COLUMNS * nodes.len();
    }
    sql.push_str(&format!(
        ";\nUPDATE journal_head SET tree_size = ${}, frontier = ${} WHERE id = 1",
        next_parameter,
        next_parameter + 1
    ));
    if finish == Finish::Commit {
        sql.push_str(";\nCOMMIT");
    }
    let query = bind_leaf_rows(sqlx::query(&sql), first_index, leaves)?;
    let query = bind_node_rows(query, nodes)?;
    let (tree_size, frontier) = head_values(head)?;
    query
        .bind(tree_size)
        .bind(frontier)
        .execute(&mut *connection)
        .await?;
    Ok(())
}

async fn insert_leaf_rows(
    connection: &mut AnyConnection,
    first_index: u64,
    leaves: &[PendingLeaf],
) -> Result<(), JournalError> {
    let mut chunk_first_index = first_index;
    for chunk in leaves.chunks(LEAF_ROWS_PER_STATEMENT) {
        let sql = multi_row_insert_from(INSERT_LEAVES, LEAF_COLUMNS, chunk.len(), 1);
        bind_leaf_rows(sqlx::query(&sql), chunk_first_index, chunk)?
            .execute(&mut *connection)
            .await?;
        chunk_first_index += chunk.len() as u64;
    }
    Ok(())
}

fn bind_leaf_rows<'q>(
    mut query: AnyQuery<'q>,
    first_index: u64,
    leaves: &'q [PendingLeaf],
) -> Result<AnyQuery<'q>, JournalError> {
    for (index, leaf) in (to_i64(first_index)?..).zip(leaves) {
        query = query
            .bind(index)
            .bind(leaf.bytes.as_slice())
            .bind(leaf.recorded_at)
            .bind(leaf.patient_ref.as_deref())
            .bind(leaf.agent_id.as_str())
            .bind(leaf.event_code.as_str())
            .bind(leaf.outcome);
    }
    Ok(query)
}

async fn insert_node_rows(
    connection: &mut AnyConnection,
    nodes: &[StoredNode],
) -> Result<(), JournalError> {
    for chunk in nodes.chunks(NODE_ROWS_PER_STATEMENT) {
        let sql = multi_row_insert_from(INSERT_NODES, NODE_COLUMNS, chunk.len(), 1);
        bind_node_rows(sqlx::query(&sql), chunk)?
            .execute(&mut *connection)
            .await?;
    }
    Ok(())
}

fn bind_node_rows<'q>(
    mut query: AnyQuery<'q>,
    nodes: &'q [StoredNode],
) -> Result<AnyQuery<'q>, JournalError> {
    for node in nodes {
        query = query
            .bind(i64::from(node.id.level))
            .bind(to_i64(node.id.index)?)
            .bind(node.hash.as_slice());
    }
    Ok(query)
}

async fn store_head(
    connection: &mut AnyConnection,
    range: &CompactRange,
) -> Result<(), JournalError> {
    let (tree_size, frontier) = head_values(range)?;
    sqlx::query("UPDATE journal_head SET tree_size = $1, frontier = $2 WHERE id = 1")
        .bind(tree_size)
        .bind(frontier)
        .execute(&mut *connection)
        .await?;
    Ok(())
}

/// The head row's tree size and frontier (the border nodes' hashes, concatenated).
fn head_values(range: &CompactRange) -> Result<(i64, Vec<u8>), JournalError> {
    let frontier: Vec<u8> = range.border().iter().flat_map(|node| node.hash).collect();
    Ok((to_i64(range.size())?, frontier))
}

/// `prefix` followed by `rows` groups of `columns` placeholders numbered from `first_parameter`.
fn multi_row_insert_from(
    prefix: &str,
    columns: usize,
    rows: usize,
    first_parameter: usize,
) -> String {
    let mut sql = String::with_capacity(prefix.len() + rows * columns * 6);
    sql.push_str(prefix);
    let mut parameter = first_parameter;
    for row in 0..rows {
        if row > 0 {
            sql.push(',');
        }
        sql.push('(');
        for column in 0..columns {
            if column > 0 {
                sql.push(',');
            }
            sql.push('$');
            sql.push_str(&parameter.to_string());
            parameter += 1;
        }
        sql.push(')');
    }
    sql
}

pub(crate) fn to_i64(value: u64) -> Result<i64, JournalError> {
    i64::try_from(value).map_err(|_| JournalError::Damaged("index beyond i64".to_owned()))
}

#[cfg(test)]
mod tests {
    use super::multi_row_insert_from;

    #[test]
    fn placeholders_are_numbered_across_rows() {
        assert_eq!(
            multi_row_insert_from("INSERT INTO t (a, b) VALUES ", 2, 2, 1),
            "INSERT INTO t (a, b) VALUES ($1,$2),($3,$4)"
        );
    }

    #[test]
    fn placeholders_continue_from_an_earlier_statement() {
        assert_eq!(
            multi_row_insert_from("INSERT INTO t (a) VALUES ", 1, 2, 8),
            "INSERT INTO t (a) VALUES ($8),($9)"
        );
    }
}
