//! Dynamic SQL with numbered `$n` placeholders that both engines accept through sqlx's `Any`
//! driver: the search planner and the index writer build their statements with it.

use sqlx::any::AnyArguments;
use sqlx::query::Query;
use sqlx::{Any, AnyConnection, AnyPool};

/// A query of sqlx's `Any` driver, as its binders take and return it.
pub type AnyQuery<'q> = Query<'q, Any, AnyArguments<'q>>;

/// One bound value. Nulls carry their type: PostgreSQL refuses a text null for a bigint or
/// bytea column.
#[derive(Debug, Clone, PartialEq)]
pub enum BindValue {
    Text(String),
    Integer(i64),
    Real(f64),
    Blob(Vec<u8>),
    NullText,
    NullInteger,
    NullBlob,
}

impl BindValue {
    pub fn optional_text(value: Option<&str>) -> Self {
        value.map_or(Self::NullText, |text| Self::Text(text.to_owned()))
    }

    pub fn optional_integer(value: Option<i64>) -> Self {
        value.map_or(Self::NullInteger, Self::Integer)
    }

    pub fn optional_blob(value: Option<&[u8]>) -> Self {
        value.map_or(Self::NullBlob, |bytes| Self::Blob(bytes.to_vec()))
    }
}

/// A statement under construction: SQL text plus the values of its placeholders, in order.
#[derive(Debug, Clone, Default)]
pub struct Statement {
    sql: String,
    binds: Vec<BindValue>,
}

impl Statement {
    pub fn new(sql: &str) -> Self {
        Self {
            sql: sql.to_owned(),
            binds: Vec::new(),
        }
    }

    /// Appends SQL text.
    pub fn push(&mut self, sql: &str) -> &mut Self {
        self.sql.push_str(sql);
        self
    }

    /// Appends a placeholder bound to `value`.
    pub fn bind(&mut self, value: BindValue) -> &mut Self {
        self.binds.push(value);
        self.sql.push('$');
        self.sql.push_str(&self.binds.len().to_string());
        self
    }

    pub fn bind_text(&mut self, value: &str) -> &mut Self {
        self.bind(BindValue::Text(value.to_owned()))
    }

    pub fn bind_integer(&mut self, value: i64) -> &mut Self {
        self.bind(BindValue::Integer(value))
    }

    pub fn bind_real(&mut self, value: f64) -> &mut Self {
        self.bind(BindValue::Real(value))
    }

    /// Appends `($a, $b, …)` for a non-empty list of texts.
    pub fn bind_text_list<'a>(&mut self, values: impl IntoIterator<Item = &'a str>) -> &mut Self {
        self.sql.push('(');
        for (position, value) in values.into_iter().enumerate() {
            if position > 0 {
                self.sql.push_str(", ");
            }
            self.bind_text(value);
        }
        self.sql.push(')');
        self
    }

    /// A statement of fixed SQL whose placeholders `$1…$n` take `values` in order.
    pub fn with_values(sql: &str, values: Vec<BindValue>) -> Self {
        Self {
            sql: sql.to_owned(),
            binds: values,
        }
    }

    /// Appends another statement's SQL and values (renumbering its placeholders).
    pub fn append(&mut self, other: &Statement) -> &mut Self {
        push_renumbered(&mut self.sql, &other.sql, self.binds.len());
        self.binds.extend(other.binds.iter().cloned());
        self
    }

    /// Appends `other` as the next statement of a multi-statement query (SQLite only: it binds
    /// `$n` by number across the statements of one query).
    pub fn push_statement(&mut self, other: Statement) -> &mut Self {
        if !self.sql.is_empty() {
            self.sql.push_str(";\n");
        }
        push_renumbered(&mut self.sql, &other.sql, self.binds.len());
        self.binds.extend(other.binds);
        self
    }

    pub fn is_empty(&self) -> bool {
        self.sql.is_empty()
    }

    pub fn sql(&self) -> &str {
        &self.sql
    }

    pub fn bind_count(&self) -> usize {
        self.binds.len()
    }

    /// The sqlx query with every value bound.
    pub fn query(&self) -> Query<'_, Any, AnyArguments<'_>> {
        let mut query = sqlx::query(&self.sql);
        for value in &self.binds {
            query = match value {
                BindValue::Text(text) => query.bind(text.as_str()),
                BindValue::Integer(number) => query.bind(*number),
                BindValue::Real(number) => query.bind(*number),
                BindValue::Blob(bytes) => query.bind(bytes.as_slice()),
                BindValue::NullText => query.bind(None::<String>),
                BindValue::NullInteger => query.bind(None::<i64>),
                BindValue::NullBlob => query.bind(None::<Vec<u8>>),
            };
        }
        query
    }

    pub async fn execute(&self, connection: &mut AnyConnection) -> Result<u64, sqlx::Error> {
        Ok(self.query().execute(connection).await?.rows_affected())
    }

    pub async fn fetch_all(&self, pool: &AnyPool) -> Result<Vec<sqlx::any::AnyRow>, sqlx::Error> {
        self.query().fetch_all(pool).await
    }
}

/// Appends `sql` to `target` with each placeholder `$n` written as `$(n + offset)`.
fn push_renumbered(target: &mut String, sql: &str, offset: usize) {
    let mut rest = sql;
    while let Some(dollar) = rest.find('$') {
        target.push_str(&rest[..=dollar]);
        rest = &rest[dollar + 1..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        match rest[..digits].parse::<usize>() {
            Ok(number) => target.push_str(&(number + offset).to_string()),
            Err(_) => target.push_str(&rest[..digits]),
        }
        rest = &rest[digits..];
    }
    target.push_str(rest);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_statements_are_renumbered() {
        let mut outer = Statement::new("SELECT 1 WHERE a = ");
        outer.bind_text("x");
        let mut inner = Statement::new(" AND b IN ");
        inner.bind_text_list(["y", "z"]);
        outer.append(&inner);
        assert_eq!(outer.sql(), "SELECT 1 WHERE a = $1 AND b IN ($2, $3)");
        assert_eq!(outer.bind_count(), 3);
    }

    #[test]
    fn pushed_statements_keep_shared_placeholders_shared() {
        let mut script = Statement::new("");
        script.push_statement(Statement::with_values(
            "INSERT INTO a VALUES ($1, $2)",
            vec![BindValue::Integer(1), BindValue::Integer(2)],
        ));
        script.push_statement(Statement::with_values(
            "INSERT INTO b VALUES ($2, $1, $3); UPDATE c SET d = $2",
            vec![
                BindValue::Integer(3),
                BindValue::Integer(4),
                BindValue::NullText,
            ],
        ));
        assert_eq!(
            script.sql(),
            "INSERT INTO a VALUES ($1, $2);\nINSERT INTO b VALUES ($4, $3, $5); UPDATE c SET d = $4"
        );
        assert_eq!(script.bind_count(), 5);
    }
}
