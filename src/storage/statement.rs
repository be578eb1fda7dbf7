//! Dynamic SQL with numbered `$n` placeholders that both engines accept through sqlx's `Any`
//! driver: the search planner and the index writer build their statements with it.

use sqlx::any::AnyArguments;
use sqlx::query::Query;
use sqlx::{Any, AnyConnection, AnyPool};

/// A query of sqlx's `Any` driver, as its binders take and return it.
pub type AnyQuery<'q> = Query<'q, Any, AnyArguments<'q>>;

/// One bound value.
#[derive(Debug, Clone, PartialEq)]
pub enum BindValue {
    Text(String),
    Integer(i64),
    Real(f64),
    NullText,
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

    /// Appends another statement's SQL and values (renumbering its placeholders).
    pub fn append(&mut self, other: &Statement) -> &mut Self {
        let offset = self.binds.len();
        let mut renumbered = String::with_capacity(other.sql.len());
        let mut characters = other.sql.chars().peekable();
        while let Some(character) = characters.next() {
            if character != '$' {
                renumbered.push(character);
                continue;
            }
            let mut digits = String::new();
            while let Some(digit) = characters.peek().filter(|next| next.is_ascii_digit()) {
                digits.push(*digit);
                characters.next();
            }
            match digits.parse::<usize>() {
                Ok(number) => {
                    renumbered.push('$');
                    renumbered.push_str(&(number + offset).to_string());
                }
                Err(_) => renumbered.push('$'),
            }
        }
        self.sql.push_str(&renumbered);
        self.binds.extend(other.binds.iter().cloned());
        self
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
                BindValue::NullText => query.bind(None::<String>),
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
}
