//! FHIR search on the record path: criteria from `glastonbury_fhir::query` become SQL over the
//! blind index (`search_tokens`, `search_dates`, `search_numbers`) and `record_heads`; the matches
//! are decrypted like any read, and every search is journaled (the query text sealed).

use std::collections::BTreeSet;

use glastonbury_fhir::extract::references_of;
use glastonbury_fhir::path::reference_type;
use glastonbury_fhir::query::{
    Criterion, DateMatch, IndexedCriterion, Match, NumberMatch, Prefix, SearchRequest, SortKey,
    Test,
};
use glastonbury_fhir::{ParameterType, SearchParameters};
use sqlx::Row;

use super::search_index::{required_tokens, required_unit};
use super::{Record, RecordError, RecordKey, RecordVersion, Records, StoredVersion};
use crate::access::{self, Allowed, Principal};
use crate::journal::{AuditDraft, codes};
use crate::storage::statement::Statement;

/// The most resources a chained or `_has` inner search may match before the search is refused
/// as too broad (its ids become an `IN` list).
pub const MAX_INNER_MATCHES: usize = 1_000;

/// The most resources `$everything` returns in one answer (it is not paged yet).
pub const MAX_COMPARTMENT: usize = 10_000;

/// Sorts missing values after present ones in both directions.
const LARGEST_INSTANT: i64 = i64::MAX / 2;
const LARGEST_NUMBER: f64 = 1e300;

/// One page of search results.
#[derive(Debug)]
pub struct SearchPage {
    /// All matches, not only this page's.
    pub total: u64,
    pub records: Vec<Record>,
    /// Matches on this page that could not be returned (their patient was crypto-shredded).
    pub unreadable: usize,
}

impl Records {
    /// Runs a search of `allowed.resource_type()`: the total, and the page `request` asks for.
    /// `query_text` (which can name a patient) is sealed into the audit leaf.
    pub async fn search(
        &self,
        allowed: &Allowed<access::Search>,
        request: &SearchRequest,
        query_text: &str,
    ) -> Result<SearchPage, RecordError> {
        let resource_type = allowed.resource_type();
        let request = &self
            .search_in_view(allowed.view(), resource_type, request)
            .await?;
        let conditions = self.conditions(resource_type, &request.criteria).await?;
        let total = self.count_matches(resource_type, &conditions).await?;
        let ids = if request.summary_count || request.count == 0 {
            Vec::new()
        } else {
            self.page_ids(
                resource_type,
                &conditions,
                &request.sort,
                request.count,
                request.offset,
            )
            .await?
        };
        let (records, unreadable, patient_refs) = self.load_current(resource_type, &ids).await?;
        self.journal_search(
            allowed.principal(),
            allowed.decided_by(),
            allowed.break_glass(),
            resource_type,
            query_text,
            &patient_refs,
        )
        .await?;
        Ok(SearchPage {
            total,
            records: self.egress_all(allowed.view(), records)?,
            unreadable,
        })
    }

    /// Reads the current versions of `ids` of one type (for `_include`), journaled like a search.
    /// In a de-identified view the ids are pseudonyms (as the matches' references show them).
    pub async fn read_included(
        &self,
        allowed: &Allowed<access::Read>,
        ids: &[String],
    ) -> Result<Vec<Record>, RecordError> {
        let resource_type = allowed.resource_type();
        let mut real_ids = Vec::with_capacity(ids.len());
        for id in ids {
            match self.id_in_view(allowed.view(), resource_type, id).await {
                Ok(real_id) => real_ids.push(real_id),
                Err(RecordError::NotFound) => {}
                Err(error) => return Err(error),
            }
        }
        let (records, _, patient_refs) = self.load_current(resource_type, &real_ids).await?;
        self.journal_search(
            allowed.principal(),
            allowed.decided_by(),
            allowed.break_glass(),
            resource_type,
            "_include",
            &patient_refs,
        )
        .await?;
        self.egress_all(allowed.view(), records)
    }

    /// Every current record of one patient's compartment (`Patient/{id}/$everything`) of the
    /// types the caller may read, journaled once per type.
    pub async fn compartment(
        &self,
        allowed: &Allowed<access::Read>,
        patient_id: &str,
        resource_types: &[String],
    ) -> Result<Vec<Record>, RecordError> {
        let patient_id = &self
            .id_in_view(allowed.view(), "Patient", patient_id)
            .await?;
        let patient_ref = self.vault.patient_ref(Some(patient_id));
        let mut statement = Statement::new(
            "SELECT resource_type, resource_id FROM record_heads WHERE deleted = 0 AND patient_ref = ",
        );
        statement.bind_text(&patient_ref);
        statement
            .push(" AND resource_type IN ")
            .bind_text_list(resource_types.iter().map(String::as_str));
        statement.push(" ORDER BY resource_type, last_updated, resource_id");
        statement.push(&format!(" LIMIT {}", MAX_COMPARTMENT + 1));
        let rows = statement.fetch_all(self.database.pool()).await?;
        if rows.len() > MAX_COMPARTMENT {
            return Err(RecordError::TooBroad);
        }
        let mut by_type: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for row in rows {
            by_type
                .entry(row.try_get(0)?)
                .or_default()
                .push(row.try_get(1)?);
        }
        let mut records = Vec::new();
        for (resource_type, ids) in by_type {
            let (found, _, _) = self.load_current(&resource_type, &ids).await?;
            records.extend(found);
        }
        let draft = AuditDraft::by(allowed.principal(), codes::PATIENT_RECORD, "operation", 'E')
            .on("Patient", Some(patient_id))
            .for_patient(&patient_ref)
            .decided_by(allowed.decided_by())
            .emergency(allowed.break_glass());
        self.journal(draft).await?;
        self.egress_all(allowed.view(), records)
    }

    /// Type and system history (`/Type/_history`, `/_history`): versions of the allowed types,
    /// newest first, from `since` on; one page. Versions of shredded patients are left out.
    pub async fn history_of_types(
        &self,
        allowed: &[Allowed<access::Read>],
        since: Option<i64>,
        count: usize,
        offset: usize,
    ) -> Result<(u64, Vec<Record>), RecordError> {
        let Some(first) = allowed.first() else {
            return Ok((0, Vec::new()));
        };
        if allowed
            .iter()
            .any(|capability| capability.view().is_deidentified())
        {
            return Err(super::history_not_in_view());
        }
        let mut filter = Statement::new(" WHERE resource_type IN ");
        filter.bind_text_list(allowed.iter().map(|capability| capability.resource_type()));
        if let Some(since) = since {
            filter.push(" AND last_updated >= ").bind_integer(since);
        }
        let mut count_statement = Statement::new("SELECT COUNT(*) FROM records");
        count_statement.append(&filter);
        let total: i64 = count_statement
            .fetch_all(self.database.pool())
            .await?
            .first()
            .map(|row| row.try_get(0))
            .transpose()?
            .unwrap_or(0);
        let mut page = Statement::new("SELECT resource_type, resource_id, version FROM records");
        page.append(&filter);
        page.push(&format!(
            " ORDER BY last_updated DESC, resource_type, resource_id LIMIT {count} OFFSET {offset}"
        ));
        let mut found = Vec::new();
        let mut patient_refs = BTreeSet::new();
        let mut keyring = self.vault.keyring();
        for row in page.fetch_all(self.database.pool()).await? {
            let key = RecordKey::new(&row.try_get::<String, _>(0)?, &row.try_get::<String, _>(1)?);
            let stored = self.fetch_any_version(&key, row.try_get(2)?).await?;
            let patient_ref = stored.patient_ref.clone();
            match self.decrypt_stored_with(&mut keyring, stored).await {
                Ok(record) => {
                    patient_refs.insert(patient_ref);
                    found.push(record);
                }
                Err(RecordError::Shredded) => {}
                Err(error) => return Err(error),
            }
        }
        let subtype = if allowed.len() == 1 {
            "history-type"
        } else {
            "history-system"
        };
        let resource_type = if allowed.len() == 1 {
            first.resource_type()
        } else {
            "*"
        };
        let mut drafts = Vec::new();
        for patient_ref in &patient_refs {
            drafts.push(
                AuditDraft::by(first.principal(), codes::PATIENT_RECORD, subtype, 'R')
                    .on(resource_type, None)
                    .for_patient(patient_ref)
                    .decided_by(first.decided_by())
                    .emergency(first.break_glass()),
            );
        }
        if drafts.is_empty() {
            drafts.push(
                AuditDraft::by(first.principal(), codes::PATIENT_RECORD, subtype, 'R')
                    .on(resource_type, None)
                    .decided_by(first.decided_by()),
            );
        }
        self.journal_many(drafts).await?;
        Ok((u64::try_from(total).unwrap_or(0), found))
    }

    pub(super) async fn journal_search(
        &self,
        principal: &Principal,
        decided_by: &[String],
        break_glass: bool,
        resource_type: &str,
        query_text: &str,
        patient_refs: &BTreeSet<String>,
    ) -> Result<(), RecordError> {
        let sealed = crate::journal::sealing::seal(
            &self.vault,
            &self.vault.patient_ref(None),
            query_text.as_bytes(),
        )
        .await
        .map_err(|error| RecordError::Audit(error.to_string()))?;
        let mut drafts = vec![
            AuditDraft::by(principal, codes::QUERY, "search-type", 'E')
                .on(resource_type, None)
                .decided_by(decided_by)
                .emergency(break_glass)
                .with_detail(sealed),
        ];
        // One leaf per patient whose records were returned, so the accounting of disclosures
        // finds searches as it finds reads.
        for patient_ref in patient_refs {
            drafts.push(
                AuditDraft::by(principal, codes::PATIENT_RECORD, "search-type", 'R')
                    .on(resource_type, None)
                    .for_patient(patient_ref)
                    .decided_by(decided_by)
                    .emergency(break_glass),
            );
        }
        self.journal_many(drafts).await
    }

    /// The `WHERE` conditions (after `resource_type = … AND deleted = 0`) of `criteria`.
    pub(super) fn conditions<'a>(
        &'a self,
        resource_type: &'a str,
        criteria: &'a [Criterion],
    ) -> futures::future::BoxFuture<'a, Result<Statement, RecordError>> {
        Box::pin(async move {
            let mut conditions = Statement::new("");
            for criterion in criteria {
                let condition = self.condition(resource_type, criterion).await?;
                conditions.push(" AND (").append(&condition).push(")");
            }
            Ok(conditions)
        })
    }

    async fn condition(
        &self,
        resource_type: &str,
        criterion: &Criterion,
    ) -> Result<Statement, RecordError> {
        match criterion {
            Criterion::Id(ids) => {
                let mut statement = Statement::new("h.resource_id IN ");
                statement.bind_text_list(ids.iter().map(String::as_str));
                Ok(statement)
            }
            Criterion::LastUpdated(matches) => {
                let mut statement = Statement::new("");
                for (position, date) in matches.iter().enumerate() {
                    if position > 0 {
                        statement.push(" OR ");
                    }
                    statement
                        .push("(")
                        .append(&date_condition("h.last_updated", "h.last_updated", date))
                        .push(")");
                }
                Ok(statement)
            }
            Criterion::Indexed(indexed) => Ok(self.indexed_condition(resource_type, indexed)),
            Criterion::Chain { code, targets } => {
                let mut references = Vec::new();
                for (target_type, inner) in targets {
                    let ids = self
                        .matching_ids(target_type, std::slice::from_ref(inner.as_ref()))
                        .await?;
                    references.extend(
                        ids.into_iter()
                            .map(|id| Match::Reference(format!("{target_type}/{id}"))),
                    );
                }
                let criterion = IndexedCriterion {
                    code: code.clone(),
                    parameter_type: ParameterType::Reference,
                    negated: false,
                    test: Test::AnyOf(references),
                };
                Ok(self.indexed_condition(resource_type, &criterion))
            }
            Criterion::Has {
                source_type,
                reference_code,
                inner,
            } => {
                let source_ids = self
                    .matching_ids(source_type, std::slice::from_ref(inner.as_ref()))
                    .await?;
                let (sources, _, _) = self.load_current(source_type, &source_ids).await?;
                let mut referenced: BTreeSet<String> = BTreeSet::new();
                for source in &sources {
                    let Ok(resource) = serde_json::from_slice::<serde_json::Value>(&source.body)
                    else {
                        continue;
                    };
                    for reference in references_of(source_type, reference_code, &resource) {
                        if reference_type(&reference) == Some(resource_type)
                            && let Some((_, id)) = reference.rsplit_once('/')
                        {
                            referenced.insert(id.to_owned());
                        }
                    }
                }
                Ok(id_list_condition(referenced.iter().map(String::as_str)))
            }
        }
    }

    /// Ids of `resource_type` matching `criteria`, refused when more than [`MAX_INNER_MATCHES`].
    async fn matching_ids(
        &self,
        resource_type: &str,
        criteria: &[Criterion],
    ) -> Result<Vec<String>, RecordError> {
        let conditions = self.conditions(resource_type, criteria).await?;
        let mut statement =
            Statement::new("SELECT h.resource_id FROM record_heads h WHERE h.resource_type = ");
        statement
            .bind_text(resource_type)
            .push(" AND h.deleted = 0");
        statement.append(&conditions);
        statement.push(&format!(" LIMIT {}", MAX_INNER_MATCHES + 1));
        let rows = statement.fetch_all(self.database.pool()).await?;
        if rows.len() > MAX_INNER_MATCHES {
            return Err(RecordError::TooBroad);
        }
        rows.iter()
            .map(|row| row.try_get::<String, _>(0).map_err(RecordError::from))
            .collect()
    }

    fn indexed_condition(&self, resource_type: &str, criterion: &IndexedCriterion) -> Statement {
        let table = match criterion.parameter_type {
            ParameterType::Date => "search_dates",
            ParameterType::Number | ParameterType::Quantity => "search_numbers",
            _ => "search_tokens",
        };
        let matches = match &criterion.test {
            Test::Missing(missing) => {
                let mut statement = Statement::new(if *missing {
                    "h.resource_id NOT IN "
                } else {
                    "h.resource_id IN "
                });
                statement.push(&format!(
                    "(SELECT resource_id FROM {table} WHERE resource_type = "
                ));
                statement
                    .bind_text(resource_type)
                    .push(" AND param = ")
                    .bind_text(&criterion.code)
                    .push(")");
                return statement;
            }
            Test::AnyOf(matches) => matches,
        };
        let mut alternatives = Statement::new("");
        let mut single_tokens: Vec<String> = Vec::new();
        let mut first = true;
        let mut add_alternative = |alternatives: &mut Statement, subquery: Statement| {
            if !first {
                alternatives.push(" OR ");
            }
            first = false;
            alternatives
                .push("h.resource_id IN (")
                .append(&subquery)
                .push(")");
        };
        for searched in matches {
            match searched {
                Match::Date(date) => {
                    let mut subquery = owner_select("search_dates", resource_type, &criterion.code);
                    subquery
                        .push(" AND (")
                        .append(&date_condition("low", "high", date))
                        .push(")");
                    add_alternative(&mut alternatives, subquery);
                }
                Match::Number(number) => {
                    let mut subquery =
                        owner_select("search_numbers", resource_type, &criterion.code);
                    subquery
                        .push(" AND unit IS NULL AND (")
                        .append(&number_condition(number))
                        .push(")");
                    add_alternative(&mut alternatives, subquery);
                }
                Match::Quantity {
                    number,
                    system,
                    code,
                } => {
                    let mut subquery =
                        owner_select("search_numbers", resource_type, &criterion.code);
                    match required_unit(
                        self.vault.blind_index(),
                        resource_type,
                        &criterion.code,
                        system.as_deref(),
                        code.as_deref(),
                    ) {
                        Some(unit) => subquery.push(" AND unit = ").bind_text(&unit),
                        None => subquery.push(" AND unit IS NULL"),
                    };
                    subquery
                        .push(" AND (")
                        .append(&number_condition(number))
                        .push(")");
                    add_alternative(&mut alternatives, subquery);
                }
                token_match => {
                    let required = required_tokens(
                        self.vault.blind_index(),
                        resource_type,
                        &criterion.code,
                        token_match,
                    )
                    .unwrap_or_default();
                    match required.len() {
                        0 => {}
                        1 => single_tokens.extend(required),
                        count => {
                            let mut subquery =
                                owner_select("search_tokens", resource_type, &criterion.code);
                            subquery
                                .push(" AND token IN ")
                                .bind_text_list(required.iter().map(String::as_str));
                            subquery.push(&format!(
                                " GROUP BY resource_id HAVING COUNT(DISTINCT token) = {count}"
                            ));
                            add_alternative(&mut alternatives, subquery);
                        }
                    }
                }
            }
        }
        if !single_tokens.is_empty() {
            let mut subquery = owner_select("search_tokens", resource_type, &criterion.code);
            subquery
                .push(" AND token IN ")
                .bind_text_list(single_tokens.iter().map(String::as_str));
            add_alternative(&mut alternatives, subquery);
        }
        if first {
            alternatives.push("1 = 0");
        }
        if criterion.negated {
            let mut negated = Statement::new("NOT (");
            negated.append(&alternatives).push(")");
            return negated;
        }
        alternatives
    }

    async fn count_matches(
        &self,
        resource_type: &str,
        conditions: &Statement,
    ) -> Result<u64, RecordError> {
        let mut statement =
            Statement::new("SELECT COUNT(*) FROM record_heads h WHERE h.resource_type = ");
        statement
            .bind_text(resource_type)
            .push(" AND h.deleted = 0")
            .append(conditions);
        let rows = statement.fetch_all(self.database.pool()).await?;
        let count: i64 = rows
            .first()
            .map(|row| row.try_get(0))
            .transpose()?
            .unwrap_or(0);
        Ok(u64::try_from(count).unwrap_or(0))
    }

    async fn page_ids(
        &self,
        resource_type: &str,
        conditions: &Statement,
        sort: &[SortKey],
        count: usize,
        offset: usize,
    ) -> Result<Vec<String>, RecordError> {
        let mut statement =
            Statement::new("SELECT h.resource_id FROM record_heads h WHERE h.resource_type = ");
        statement
            .bind_text(resource_type)
            .push(" AND h.deleted = 0")
            .append(conditions);
        statement.push(" ORDER BY ");
        for key in sort {
            statement
                .append(&sort_expression(resource_type, key))
                .push(", ");
        }
        if sort.is_empty() {
            statement.push("h.last_updated, ");
        }
        statement.push(&format!("h.resource_id LIMIT {count} OFFSET {offset}"));
        let rows = statement.fetch_all(self.database.pool()).await?;
        rows.iter()
            .map(|row| row.try_get::<String, _>(0).map_err(RecordError::from))
            .collect()
    }

    /// Decrypts the current versions of `ids` (in that order), skipping deleted ones; counts the
    /// ones whose patient was shredded, and returns the patients they belong to.
    pub(super) async fn load_current(
        &self,
        resource_type: &str,
        ids: &[String],
    ) -> Result<(Vec<Record>, usize, BTreeSet<String>), RecordError> {
        let mut records = Vec::with_capacity(ids.len());
        let mut unreadable = 0;
        let mut patient_refs = BTreeSet::new();
        let mut keyring = self.vault.keyring();
        for chunk in ids.chunks(500) {
            let mut statement = Statement::new(
                "SELECT r.resource_id, r.version, r.patient_ref, r.last_updated, r.content_type, r.body, r.blob_key \
                 FROM record_heads h JOIN records r ON r.resource_type = h.resource_type AND r.resource_id = h.resource_id AND r.version = h.version \
                 WHERE h.deleted = 0 AND h.resource_type = ",
            );
            statement
                .bind_text(resource_type)
                .push(" AND h.resource_id IN ")
                .bind_text_list(chunk.iter().map(String::as_str));
            let rows = statement.fetch_all(self.database.pool()).await?;
            let mut by_id: std::collections::HashMap<String, StoredVersion> =
                std::collections::HashMap::new();
            for row in rows {
                let id: String = row.try_get(0)?;
                let stored = StoredVersion {
                    meta: RecordVersion {
                        key: RecordKey::new(resource_type, &id),
                        version: row.try_get(1)?,
                        last_updated: row.try_get(3)?,
                        deleted: false,
                    },
                    patient_ref: row.try_get(2)?,
                    content_type: row.try_get(4)?,
                    inline_body: row.try_get(5)?,
                    blob_key: row.try_get(6)?,
                };
                by_id.insert(id, stored);
            }
            for id in chunk {
                let Some(stored) = by_id.remove(id) else {
                    continue;
                };
                let patient_ref = stored.patient_ref.clone();
                match self.decrypt_stored_with(&mut keyring, stored).await {
                    Ok(record) => {
                        patient_refs.insert(patient_ref);
                        records.push(record);
                    }
                    Err(RecordError::Shredded) => unreadable += 1,
                    Err(error) => return Err(error),
                }
            }
        }
        Ok((records, unreadable, patient_refs))
    }
}

fn owner_select(table: &str, resource_type: &str, code: &str) -> Statement {
    let mut statement = Statement::new(&format!(
        "SELECT resource_id FROM {table} WHERE resource_type = "
    ));
    statement
        .bind_text(resource_type)
        .push(" AND param = ")
        .bind_text(code);
    statement
}

fn id_list_condition<'a>(ids: impl Iterator<Item = &'a str>) -> Statement {
    let ids: Vec<&str> = ids.collect();
    if ids.is_empty() {
        return Statement::new("1 = 0");
    }
    let mut statement = Statement::new("h.resource_id IN ");
    statement.bind_text_list(ids);
    statement
}

/// A stored range `[low, high]` against a searched date with its prefix (R4 3.1.1.4.2).
fn date_condition(low: &str, high: &str, date: &DateMatch) -> Statement {
    let (searched_low, searched_high) = (date.range.low, date.range.high);
    let mut statement = Statement::new("");
    match date.prefix {
        Prefix::Eq => statement
            .push(&format!("{low} >= "))
            .bind_integer(searched_low)
            .push(&format!(" AND {high} <= "))
            .bind_integer(searched_high),
        Prefix::Ne => statement
            .push(&format!("NOT ({low} >= "))
            .bind_integer(searched_low)
            .push(&format!(" AND {high} <= "))
            .bind_integer(searched_high)
            .push(")"),
        Prefix::Gt => statement
            .push(&format!("{high} > "))
            .bind_integer(searched_high),
        Prefix::Lt => statement
            .push(&format!("{low} < "))
            .bind_integer(searched_low),
        Prefix::Ge => statement
            .push(&format!("{high} >= "))
            .bind_integer(searched_low),
        Prefix::Le => statement
            .push(&format!("{low} <= "))
            .bind_integer(searched_high),
        Prefix::Sa => statement
            .push(&format!("{low} > "))
            .bind_integer(searched_high),
        Prefix::Eb => statement
            .push(&format!("{high} < "))
            .bind_integer(searched_low),
        Prefix::Ap => {
            let now = crate::storage::now_micros();
            let distance = (now - searched_low).abs().max((now - searched_high).abs());
            let widening = (distance / 10).max(86_400_000_000);
            statement
                .push(&format!("{low} <= "))
                .bind_integer(searched_high.saturating_add(widening))
                .push(&format!(" AND {high} >= "))
                .bind_integer(searched_low.saturating_sub(widening))
        }
    };
    statement
}

/// A stored number against a searched one with its implicit precision.
fn number_condition(number: &NumberMatch) -> Statement {
    let mut statement = Statement::new("");
    match number.prefix {
        Prefix::Eq => statement
            .push("value >= ")
            .bind_real(number.low)
            .push(" AND value < ")
            .bind_real(number.high),
        Prefix::Ne => statement
            .push("NOT (value >= ")
            .bind_real(number.low)
            .push(" AND value < ")
            .bind_real(number.high)
            .push(")"),
        Prefix::Gt | Prefix::Sa => statement.push("value > ").bind_real(number.value),
        Prefix::Lt | Prefix::Eb => statement.push("value < ").bind_real(number.value),
        Prefix::Ge => statement.push("value >= ").bind_real(number.value),
        Prefix::Le => statement.push("value <= ").bind_real(number.value),
        Prefix::Ap => {
            let margin = (number.value * 0.1).abs();
            statement
                .push("value >= ")
                .bind_real(number.value - margin)
                .push(" AND value <= ")
                .bind_real(number.value + margin)
        }
    };
    statement
}

fn sort_expression(resource_type: &str, key: &SortKey) -> Statement {
    let direction = if key.descending { " DESC" } else { "" };
    match key.code.as_str() {
        "_id" => return Statement::new(&format!("h.resource_id{direction}")),
        "_lastUpdated" => return Statement::new(&format!("h.last_updated{direction}")),
        _ => {}
    }
    let is_date = SearchParameters::r4()
        .get(resource_type, &key.code)
        .is_some_and(|parameter| parameter.parameter_type == ParameterType::Date);
    let (table, aggregate, missing) = match (is_date, key.descending) {
        (true, false) => ("search_dates", "MIN(low)", LARGEST_INSTANT.to_string()),
        (true, true) => ("search_dates", "MAX(high)", (-LARGEST_INSTANT).to_string()),
        (false, false) => (
            "search_numbers",
            "MIN(value)",
            format!("{LARGEST_NUMBER:e}"),
        ),
        (false, true) => (
            "search_numbers",
            "MAX(value)",
            format!("{:e}", -LARGEST_NUMBER),
        ),
    };
    let mut statement = Statement::new(&format!(
        "COALESCE((SELECT {aggregate} FROM {table} s WHERE s.resource_type = h.resource_type AND s.resource_id = h.resource_id AND s.param = "
    ));
    statement
        .bind_text(&key.code)
        .push(&format!("), {missing}){direction}"));
    statement
}
