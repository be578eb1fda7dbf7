//! The current head (version, deleted) of each record a write batch touches, read in the query
//! that begins the batch's transaction on SQLite, so that no row needs a head query of its own.
//! What a unit writes updates it as it goes; a unit undone to its savepoint makes the heads it
//! touched unknown again, and an unknown head is read from the database.

use std::collections::HashMap;

use sqlx::Row;
use sqlx::any::AnyRow;

use super::RecordError;
use super::writer::RowWrite;

/// The most records whose heads one query reads; a larger batch reads the rest row by row.
pub const MAX_KNOWN_HEADS: usize = 256;

/// Key counts the head query is written for (the key list is padded up to one of them by
/// repeating its last key), so the engine's statement cache holds a handful of statements.
const HEAD_QUERY_SIZES: [usize; 5] = [1, 4, 16, 64, MAX_KNOWN_HEADS];

/// A record's current version and whether it is deleted; `None` when it has no version yet.
pub type Head = Option<(i64, bool)>;

pub type RecordName = (String, String);

/// Heads known for this transaction.
#[derive(Debug, Default)]
pub struct KnownHeads {
    heads: HashMap<RecordName, Head>,
}

impl KnownHeads {
    /// The distinct records `rows` write, at most [`MAX_KNOWN_HEADS`] of them (the rest stay
    /// unknown).
    pub fn records_of<'a>(rows: impl Iterator<Item = &'a RowWrite>) -> Vec<RecordName> {
        let mut seen = std::collections::HashSet::new();
        rows.map(name_of)
            .filter(|name| seen.insert(name.clone()))
            .take(MAX_KNOWN_HEADS)
            .collect()
    }

    /// `SELECT` of the heads of `records` (placeholders from `$first_parameter`), with the
    /// parameters to bind in order: type and id of each record, padded to a fixed count.
    pub fn query_for(records: &[RecordName], first_parameter: usize) -> (String, Vec<String>) {
        let size = HEAD_QUERY_SIZES
            .into_iter()
            .find(|size| *size >= records.len())
            .unwrap_or(MAX_KNOWN_HEADS);
        let pairs: Vec<String> = (0..size)
            .map(|position| {
                let type_parameter = first_parameter + 2 * position;
                format!("(${type_parameter}, ${})", type_parameter + 1)
            })
            .collect();
        let sql = format!(
            "SELECT resource_type, resource_id, version, deleted FROM record_heads \
             WHERE (resource_type, resource_id) IN (VALUES {})",
            pairs.join(", ")
        );
        let last = records.last().cloned().unwrap_or_default();
        let parameters = records
            .iter()
            .chain(std::iter::repeat(&last))
            .take(size)
            .flat_map(|(resource_type, resource_id)| [resource_type.clone(), resource_id.clone()])
            .collect();
        (sql, parameters)
    }

    /// The heads of `records` from the rows the head query returned (a record without a row
    /// has no version yet).
    pub fn from_rows(records: Vec<RecordName>, rows: &[AnyRow]) -> Result<Self, sqlx::Error> {
        let mut heads: HashMap<RecordName, Head> =
            records.into_iter().map(|name| (name, None)).collect();
        for row in rows {
            let name = (row.try_get(0)?, row.try_get(1)?);
            let head = Some((row.try_get(2)?, row.try_get::<i64, _>(3)? != 0));
            heads.insert(name, head);
        }
        Ok(Self { heads })
    }

    /// The head of `row`'s record, if known.
    pub fn get(&self, row: &RowWrite) -> Option<Head> {
        self.heads.get(&name_of(row)).copied()
    }

    /// Whether the head of every record `rows` write is known.
    pub fn knows_all<'a>(&self, mut rows: impl Iterator<Item = &'a RowWrite>) -> bool {
        rows.all(|row| self.get(row).is_some())
    }

    /// Notes the head read for a row's record.
    pub fn learn(&mut self, row: &RowWrite, head: Head) {
        self.heads.insert(name_of(row), head);
    }

    /// What is known of the records `rows` write, to [`restore`](Self::restore) after a unit
    /// that was not written.
    pub fn save(&self, rows: &[RowWrite]) -> Vec<(RecordName, Option<Head>)> {
        rows.iter()
            .map(|row| {
                let name = name_of(row);
                let head = self.heads.get(&name).copied();
                (name, head)
            })
            .collect()
    }

    /// Puts back what [`save`](Self::save) returned (in reverse, so a record named twice ends
    /// as it was first).
    pub fn restore(&mut self, saved: Vec<(RecordName, Option<Head>)>) {
        for (name, head) in saved.into_iter().rev() {
            match head {
                Some(head) => self.heads.insert(name, head),
                None => self.heads.remove(&name),
            };
        }
    }

    /// Notes the version a row just wrote.
    pub fn wrote(&mut self, row: &RowWrite, version: i64) {
        self.learn(row, Some((version, row.deleted)));
    }

    /// Forgets the heads of `rows` (their unit was undone): they are read again when needed.
    pub fn forget(&mut self, rows: &[RowWrite]) {
        for row in rows {
            self.heads.remove(&name_of(row));
        }
    }
}

/// The record a row writes.
fn name_of(row: &RowWrite) -> RecordName {
    (row.resource_type.clone(), row.resource_id.clone())
}

/// Reads a record's head from the database (inside the batch's transaction).
pub async fn read_head(
    connection: &mut sqlx::AnyConnection,
    row: &RowWrite,
) -> Result<Head, RecordError> {
    let head = sqlx::query(
        "SELECT version, deleted FROM record_heads WHERE resource_type = $1 AND resource_id = $2",
    )
    .bind(&row.resource_type)
    .bind(&row.resource_id)
    .fetch_optional(&mut *connection)
    .await?;
    Ok(match head {
        Some(found) => Some((found.try_get(0)?, found.try_get::<i64, _>(1)? != 0)),
        None => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_head_query_is_padded_to_a_fixed_size_with_the_last_record() {
        let records = vec![
            ("Patient".to_owned(), "a".to_owned()),
            ("Patient".to_owned(), "b".to_owned()),
        ];
        let (sql, parameters) = KnownHeads::query_for(&records, 1);
        assert!(sql.ends_with("IN (VALUES ($1, $2), ($3, $4), ($5, $6), ($7, $8))"));
        assert_eq!(
            parameters,
            [
                "Patient", "a", "Patient", "b", "Patient", "b", "Patient", "b"
            ]
        );
    }
}
