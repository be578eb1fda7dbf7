//! Appending leaves: encode drafts into canonical leaves, then, inside the group-commit
//! transaction that holds the journal head row, write the leaves, every Merkle node they
//! complete, and the new frontier, so the tree is always exactly as durable as the effects.

use glastonbury_audit::{CompactRange, Hash, StoredNode};
use sqlx::AnyConnection;

use super::JournalError;
use super::draft::{AuditDraft, JournalIdentity, to_event};
use super::store;
use crate::storage::Engine;
use crate::storage::statement::{AnyQuery, BindValue, Statement};

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
    /// Committed (on SQLite in the append's own query).
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
    if Engine::of_connection(connection) == Engine::Sqlite {
        let (mut script, next) = sqlite_append_statements_after(range, leaves)?;
        if finish == Finish::Commit {
            script.push_statement(Statement::new("COMMIT"));
        }
        // Leaves, nodes, head (and the commit) as one query: one round trip to SQLite's
        // connection thread instead of three or four.
        script.execute(connection).await?;
        *range = next;
        return Ok(first_index);
    }
    let hashes: Vec<Hash> = leaves.iter().map(|leaf| leaf.hash).collect();
    let mut next = range.clone();
    let batch = next.append_batch(&hashes)?;
    insert_leaf_rows(connection, first_index, leaves).await?;
    insert_node_rows(connection, &batch.nodes).await?;
    store_head(connection, &next).await?;
    end_transaction(connection, finish).await?;
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

/// The statements that append `leaves` after `range` on SQLite (leaf rows, completed nodes, new
/// head), for the caller to run at the end of its own multi-statement query; with the range the
/// journal has once they ran.
pub fn sqlite_append_statements_after(
    range: &CompactRange,
    leaves: &[PendingLeaf],
) -> Result<(Statement, CompactRange), JournalError> {
    let hashes: Vec<Hash> = leaves.iter().map(|leaf| leaf.hash).collect();
    let mut next = range.clone();
    let batch = next.append_batch(&hashes)?;
    let statements = sqlite_append_statements(range.size(), leaves, &batch.nodes, &next)?;
    Ok((statements, next))
}

/// SQLite's leaf insert: one statement for any number of leaves (a JSON array of `[index, hex
/// leaf, recorded at, patient, agent, event code, outcome]`), so the statement cache holds one
/// shape of every query that appends.
const INSERT_LEAVES_FROM_JSON: &str = "INSERT INTO audit_leaves (leaf_index, leaf, recorded_at, patient_ref, agent_id, event_code, outcome) \
     SELECT value ->> 0, unhex(value ->> 1), value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6 \
     FROM json_each($1)";

/// SQLite's node insert, likewise: a JSON array of `[level, index, hex hash]`.
const INSERT_NODES_FROM_JSON: &str = "INSERT INTO audit_nodes (level, node_index, hash) \
     SELECT value ->> 0, value ->> 1, unhex(value ->> 2) FROM json_each($1)";

fn sqlite_append_statements(
    first_index: u64,
    leaves: &[PendingLeaf],
    nodes: &[StoredNode],
    head: &CompactRange,
) -> Result<Statement, JournalError> {
    let mut script = Statement::default();
    script.push_statement(Statement::with_values(
        INSERT_LEAVES_FROM_JSON,
        vec![BindValue::Text(leaves_as_json(first_index, leaves)?)],
    ));
    if !nodes.is_empty() {
        script.push_statement(Statement::with_values(
            INSERT_NODES_FROM_JSON,
            vec![BindValue::Text(nodes_as_json(nodes))],
        ));
    }
    let (tree_size, frontier) = head_values(head)?;
    script.push_statement(Statement::with_values(
        STORE_HEAD,
        vec![BindValue::Integer(tree_size), BindValue::Blob(frontier)],
    ));
    Ok(script)
}

fn leaves_as_json(first_index: u64, leaves: &[PendingLeaf]) -> Result<String, JournalError> {
    let rows: Vec<serde_json::Value> = (to_i64(first_index)?..)
        .zip(leaves)
        .map(|(index, leaf)| {
            serde_json::json!([
                index,
                hex::encode(&leaf.bytes),
                leaf.recorded_at,
                leaf.patient_ref,
                leaf.agent_id,
                leaf.event_code,
                leaf.outcome,
            ])
        })
        .collect();
    Ok(serde_json::Value::Array(rows).to_string())
}

fn leaf_row_values(
    first_index: u64,
    leaves: &[PendingLeaf],
) -> Result<Vec<BindValue>, JournalError> {
    let mut values = Vec::with_capacity(leaves.len() * LEAF_COLUMNS);
    for (index, leaf) in (to_i64(first_index)?..).zip(leaves) {
        values.extend([
            BindValue::Integer(index),
            BindValue::Blob(leaf.bytes.clone()),
            BindValue::Integer(leaf.recorded_at),
            BindValue::optional_text(leaf.patient_ref.as_deref()),
            BindValue::Text(leaf.agent_id.clone()),
            BindValue::Text(leaf.event_code.clone()),
            BindValue::Integer(leaf.outcome),
        ]);
    }
    Ok(values)
}

/// `[[level, index, "hex hash"], …]`.
fn nodes_as_json(nodes: &[StoredNode]) -> String {
    let rows: Vec<serde_json::Value> = nodes
        .iter()
        .map(|node| serde_json::json!([node.id.level, node.id.index, hex::encode(node.hash)]))
        .collect();
    serde_json::Value::Array(rows).to_string()
}

async fn insert_leaf_rows(
    connection: &mut AnyConnection,
    first_index: u64,
    leaves: &[PendingLeaf],
) -> Result<(), JournalError> {
    let mut chunk_first_index = first_index;
    for chunk in leaves.chunks(LEAF_ROWS_PER_STATEMENT) {
        let sql = multi_row_insert_from(INSERT_LEAVES, LEAF_COLUMNS, chunk.len(), 1);
        Statement::with_values(&sql, leaf_row_values(chunk_first_index, chunk)?)
            .execute(&mut *connection)
            .await?;
        chunk_first_index += chunk.len() as u64;
    }
    Ok(())
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
    sqlx::query(STORE_HEAD)
        .bind(tree_size)
        .bind(frontier)
        .execute(&mut *connection)
        .await?;
    Ok(())
}

/// The head row's new tree size and frontier.
const STORE_HEAD: &str = "UPDATE journal_head SET tree_size = $1, frontier = $2 WHERE id = 1";

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
