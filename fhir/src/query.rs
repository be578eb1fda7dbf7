//! Search requests: the query string of a FHIR search parsed against the search-parameter
//! registry into typed criteria, result controls (`_count`, `_sort`, `_include`, …) and the list of
//! parameters that were ignored, following the R4 search specification.

use crate::dates::{DateRange, parse_range};
use crate::extract::normalize_reference;
use crate::search_parameters::{ParameterType, SearchParameter, SearchParameters};

/// The page size when the client names none, and the largest it may ask for.
pub const DEFAULT_COUNT: usize = 50;
pub const MAX_COUNT: usize = 1000;

/// Limits that keep one search's cost bounded: criteria, alternatives per criterion (and `_id`
/// values), `_include`/`_revinclude` parameters, and how deep `_offset` may page.
pub const MAX_CRITERIA: usize = 50;
pub const MAX_VALUES: usize = 500;
pub const MAX_INCLUDES: usize = 10;
pub const MAX_OFFSET: usize = 100_000;

/// A request the server cannot run; answered with 400 and this (PHI-free) message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SearchError(pub String);

fn error(message: impl Into<String>) -> SearchError {
    SearchError(message.into())
}

/// A parsed search of one resource type.
#[derive(Debug, Clone, Default)]
pub struct SearchRequest {
    /// All must hold (AND); each holds when any of its alternatives does (OR).
    pub criteria: Vec<Criterion>,
    pub count: usize,
    pub offset: usize,
    pub sort: Vec<SortKey>,
    pub includes: Vec<Include>,
    pub revincludes: Vec<Include>,
    /// `_summary=count`: only the total.
    pub summary_count: bool,
    /// `_elements`: top-level elements to keep (plus `id`, `meta`, `resourceType`).
    pub elements: Vec<String>,
    /// Parameters that were not applied, described for the Bundle's OperationOutcome.
    pub ignored: Vec<String>,
}

/// One condition on the matched resources.
#[derive(Debug, Clone, PartialEq)]
pub enum Criterion {
    /// `_id`: one of these ids.
    Id(Vec<String>),
    /// `_lastUpdated`: any of these date conditions.
    LastUpdated(Vec<DateMatch>),
    /// A condition on a stored index parameter.
    Indexed(IndexedCriterion),
    /// `subject:Patient.name=x`: the reference points at a resource matching the inner criterion.
    Chain {
        code: String,
        targets: Vec<(String, Box<Criterion>)>,
    },
    /// `_has:Observation:patient:code=x`: some resource of `source_type` refers to this one through
    /// its `reference_code` parameter and matches the inner criterion.
    Has {
        source_type: String,
        reference_code: String,
        inner: Box<Criterion>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct IndexedCriterion {
    pub code: String,
    pub parameter_type: ParameterType,
    /// `:not`: no value matches.
    pub negated: bool,
    pub test: Test,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Test {
    /// `:missing=true|false`.
    Missing(bool),
    /// Any of these matches.
    AnyOf(Vec<Match>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Match {
    /// Default string search: a word of the value starts with this.
    TextStartsWith(String),
    /// `:exact`: the whole value, case and accents included.
    TextExact(String),
    /// `:contains`: the value contains this.
    TextContains(String),
    Token {
        system: SystemMatch,
        code: Option<String>,
    },
    /// `:text`: every word of this is a word of the code's display text.
    TokenText(String),
    /// A reference: `Type/id`, a bare id, or an absolute URL.
    Reference(String),
    Date(DateMatch),
    Number(NumberMatch),
    Quantity {
        number: NumberMatch,
        system: Option<String>,
        code: Option<String>,
    },
    Uri(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SystemMatch {
    /// `code`: any system.
    Any,
    /// `|code`: no system.
    Absent,
    /// `system|code` or `system|`.
    Is(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
    Ap,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateMatch {
    pub prefix: Prefix,
    pub range: DateRange,
}

/// A number with its implicit precision: `100` means [99.5, 100.5).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NumberMatch {
    pub prefix: Prefix,
    pub value: f64,
    pub low: f64,
    pub high: f64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SortKey {
    /// `_id`, `_lastUpdated` or a date/number/quantity parameter code.
    pub code: String,
    pub descending: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Include {
    pub source_type: String,
    pub code: String,
    pub target_type: Option<String>,
}

/// Result-control parameters that are handled here or by the HTTP layer, never ignored.
const CONTROL_PARAMETERS: &[&str] = &[
    "_count",
    "_offset",
    "_sort",
    "_include",
    "_revinclude",
    "_summary",
    "_elements",
    "_total",
    "_format",
    "_pretty",
];

/// Parses the `(name, value)` pairs of a search of `resource_type`.
pub fn parse_search(
    resource_type: &str,
    pairs: &[(String, String)],
) -> Result<SearchRequest, SearchError> {
    let registry = SearchParameters::r4();
    let mut request = SearchRequest {
        count: DEFAULT_COUNT,
        ..SearchRequest::default()
    };
    for (name, value) in pairs {
        if CONTROL_PARAMETERS.contains(&name.as_str()) {
            apply_control(resource_type, name, value, &mut request)?;
            continue;
        }
        match parse_criterion(registry, resource_type, name, value)? {
            Parsed::Criterion(criterion) => request.criteria.push(criterion),
            Parsed::Ignored(reason) => request.ignored.push(reason),
        }
    }
    if request.criteria.len() > MAX_CRITERIA {
        return Err(error(format!(
            "a search may carry at most {MAX_CRITERIA} criteria"
        )));
    }
    if request.includes.len() + request.revincludes.len() > MAX_INCLUDES {
        return Err(error(format!(
            "a search may carry at most {MAX_INCLUDES} _include and _revinclude parameters"
        )));
    }
    request.includes.dedup();
    request.revincludes.dedup();
    Ok(request)
}

enum Parsed {
    Criterion(Criterion),
    Ignored(String),
}

fn apply_control(
    resource_type: &str,
    name: &str,
    value: &str,
    request: &mut SearchRequest,
) -> Result<(), SearchError> {
    match name {
        "_count" => {
            let count: usize = value
                .parse()
                .map_err(|_| error("_count must be a non-negative integer"))?;
            request.count = count.min(MAX_COUNT);
        }
        "_offset" => {
            request.offset = value
                .parse()
                .ok()
                .filter(|offset| *offset <= MAX_OFFSET)
                .ok_or_else(|| {
                    error(format!("_offset must be an integer from 0 to {MAX_OFFSET}"))
                })?;
        }
        "_sort" => {
            for key in value.split(',').filter(|key| !key.is_empty()) {
                request.sort.push(parse_sort_key(resource_type, key)?);
            }
        }
        "_include" => request
            .includes
            .push(parse_include(value, Some(resource_type))?),
        "_revinclude" => request.revincludes.push(parse_include(value, None)?),
        "_summary" => match value {
            "count" => request.summary_count = true,
            "false" => {}
            other => request.ignored.push(format!(
                "_summary={other} is not supported; full resources are returned"
            )),
        },
        "_elements" => {
            request.elements = value
                .split(',')
                .map(str::trim)
                .filter(|element| !element.is_empty())
                .map(str::to_owned)
                .collect();
        }
        _ => {}
    }
    Ok(())
}

fn parse_sort_key(resource_type: &str, key: &str) -> Result<SortKey, SearchError> {
    let (code, descending) = match key.strip_prefix('-') {
        Some(code) => (code, true),
        None => (key, false),
    };
    let sortable = matches!(code, "_id" | "_lastUpdated")
        || SearchParameters::r4()
            .get(resource_type, code)
            .is_some_and(|parameter| {
                matches!(
                    parameter.parameter_type,
                    ParameterType::Date | ParameterType::Number | ParameterType::Quantity
                )
            });
    if !sortable {
        return Err(error(format!(
            "cannot sort by '{code}': sorting is supported on _id, _lastUpdated and date, number and quantity parameters (string and token values are stored as keyed hashes)"
        )));
    }
    Ok(SortKey {
        code: code.to_owned(),
        descending,
    })
}

/// `Observation:patient`, `Observation:subject:Patient`; `*` is not supported.
fn parse_include(value: &str, expected_source: Option<&str>) -> Result<Include, SearchError> {
    let mut parts = value.split(':');
    let source_type = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    let target_type = parts.next().map(str::to_owned);
    if let Some(expected) = expected_source
        && source_type != expected
    {
        return Err(error(format!(
            "_include must start with the searched type {expected}"
        )));
    }
    let parameter = SearchParameters::r4()
        .get(source_type, code)
        .filter(|parameter| parameter.parameter_type == ParameterType::Reference)
        .ok_or_else(|| error(format!("'{value}' is not a reference search parameter")))?;
    if let Some(target) = &target_type
        && !parameter.targets.contains(target)
    {
        return Err(error(format!(
            "'{value}' names a target the parameter cannot point at"
        )));
    }
    Ok(Include {
        source_type: source_type.to_owned(),
        code: code.to_owned(),
        target_type,
    })
}

fn parse_criterion(
    registry: &SearchParameters,
    resource_type: &str,
    name: &str,
    value: &str,
) -> Result<Parsed, SearchError> {
    if let Some(has) = name.strip_prefix("_has:") {
        return parse_has(registry, has, value);
    }
    if let Some((reference, chained)) = name.split_once('.') {
        return parse_chain(registry, resource_type, reference, chained, value);
    }
    let (code, modifier) = match name.split_once(':') {
        Some((code, modifier)) => (code, Some(modifier)),
        None => (name, None),
    };
    if code == "_id" {
        return Ok(Parsed::Criterion(Criterion::Id(bounded_values(
            code, value,
        )?)));
    }
    if code == "_lastUpdated" {
        let matches = bounded_values(code, value)?
            .iter()
            .map(|text| parse_date_match(text))
            .collect::<Result<_, _>>()?;
        return Ok(Parsed::Criterion(Criterion::LastUpdated(matches)));
    }
    let Some(parameter) = registry.get(resource_type, code) else {
        let reason = if registry.is_unsupported(resource_type, code) {
            format!("search parameter '{code}' of {resource_type} is not supported and was ignored")
        } else {
            format!("unknown search parameter '{code}' for {resource_type} was ignored")
        };
        return Ok(Parsed::Ignored(reason));
    };
    parse_indexed(parameter, modifier, value)
        .map(|criterion| Parsed::Criterion(Criterion::Indexed(criterion)))
}

fn parse_indexed(
    parameter: &SearchParameter,
    modifier: Option<&str>,
    value: &str,
) -> Result<IndexedCriterion, SearchError> {
    let code = parameter.code.clone();
    let criterion = |negated, test| IndexedCriterion {
        code: code.clone(),
        parameter_type: parameter.parameter_type,
        negated,
        test,
    };
    if modifier == Some("missing") {
        let missing = match value {
            "true" => true,
            "false" => false,
            _ => return Err(error(":missing takes true or false")),
        };
        return Ok(criterion(false, Test::Missing(missing)));
    }
    let negated = modifier == Some("not");
    let values = bounded_values(&code, value)?;
    let matches = values
        .iter()
        .map(|text| parse_match(parameter, modifier, text))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(criterion(negated, Test::AnyOf(matches)))
}

fn parse_match(
    parameter: &SearchParameter,
    modifier: Option<&str>,
    text: &str,
) -> Result<Match, SearchError> {
    let unsupported_modifier = || {
        error(format!(
            "modifier ':{}' is not supported on {} parameter '{}'",
            modifier.unwrap_or_default(),
            parameter.parameter_type.as_str(),
            parameter.code
        ))
    };
    match (parameter.parameter_type, modifier) {
        (ParameterType::String, None) => Ok(Match::TextStartsWith(text.to_owned())),
        (ParameterType::String, Some("exact")) => Ok(Match::TextExact(text.to_owned())),
        (ParameterType::String, Some("contains")) => Ok(Match::TextContains(text.to_owned())),
        (ParameterType::Token, None | Some("not")) => Ok(parse_token(text)),
        (ParameterType::Token, Some("text")) => Ok(Match::TokenText(text.to_owned())),
        (ParameterType::Reference, None) => Ok(Match::Reference(normalize_reference(text))),
        (ParameterType::Reference, Some(target))
            if parameter.targets.iter().any(|t| t == target) =>
        {
            if text.contains('/') {
                return Err(error("a typed reference modifier takes a bare id"));
            }
            Ok(Match::Reference(format!("{target}/{text}")))
        }
        (ParameterType::Date, None) => parse_date_match(text).map(Match::Date),
        (ParameterType::Number, None) => parse_number_match(text).map(Match::Number),
        (ParameterType::Quantity, None) => parse_quantity(text),
        (ParameterType::Uri, None) => Ok(Match::Uri(text.to_owned())),
        _ => Err(unsupported_modifier()),
    }
}

fn parse_token(text: &str) -> Match {
    match split_unescaped(text, '|').as_slice() {
        [code] => Match::Token {
            system: SystemMatch::Any,
            code: Some(unescape(code)),
        },
        [system, code] => Match::Token {
            system: if system.is_empty() {
                SystemMatch::Absent
            } else {
                SystemMatch::Is(unescape(system))
            },
            code: (!code.is_empty()).then(|| unescape(code)),
        },
        _ => Match::Token {
            system: SystemMatch::Any,
            code: Some(unescape(text)),
        },
    }
}

fn parse_chain(
    registry: &SearchParameters,
    resource_type: &str,
    reference: &str,
    chained: &str,
    value: &str,
) -> Result<Parsed, SearchError> {
    if chained.contains('.') {
        return Err(error("only one level of chaining is supported"));
    }
    let (code, target_modifier) = match reference.split_once(':') {
        Some((code, target)) => (code, Some(target)),
        None => (reference, None),
    };
    let parameter = registry
        .get(resource_type, code)
        .filter(|parameter| parameter.parameter_type == ParameterType::Reference)
        .ok_or_else(|| {
            error(format!(
                "'{code}' is not a reference parameter of {resource_type}"
            ))
        })?;
    let candidate_targets: Vec<&String> = match target_modifier {
        Some(target) => parameter.targets.iter().filter(|t| *t == target).collect(),
        None => parameter.targets.iter().collect(),
    };
    let mut targets = Vec::new();
    for target in candidate_targets {
        if let Ok(Parsed::Criterion(inner)) = parse_criterion(registry, target, chained, value) {
            targets.push((target.clone(), Box::new(inner)));
        }
    }
    if targets.is_empty() {
        return Err(error(format!(
            "no target of '{code}' has a search parameter '{chained}'"
        )));
    }
    Ok(Parsed::Criterion(Criterion::Chain {
        code: code.to_owned(),
        targets,
    }))
}

/// `_has:Observation:patient:code=1234-5`.
fn parse_has(registry: &SearchParameters, has: &str, value: &str) -> Result<Parsed, SearchError> {
    let mut parts = has.splitn(3, ':');
    let (Some(source_type), Some(reference_code), Some(inner_name)) =
        (parts.next(), parts.next(), parts.next())
    else {
        return Err(error("_has takes the form _has:Type:reference:parameter"));
    };
    if inner_name.starts_with("_has") {
        return Err(error("nested _has is not supported"));
    }
    registry
        .get(source_type, reference_code)
        .filter(|parameter| parameter.parameter_type == ParameterType::Reference)
        .ok_or_else(|| {
            error(format!(
                "'{reference_code}' is not a reference parameter of {source_type}"
            ))
        })?;
    match parse_criterion(registry, source_type, inner_name, value)? {
        Parsed::Criterion(inner) => Ok(Parsed::Criterion(Criterion::Has {
            source_type: source_type.to_owned(),
            reference_code: reference_code.to_owned(),
            inner: Box::new(inner),
        })),
        Parsed::Ignored(reason) => Err(error(reason)),
    }
}

fn split_prefix(text: &str) -> (Prefix, &str) {
    const PREFIXES: &[(&str, Prefix)] = &[
        ("eq", Prefix::Eq),
        ("ne", Prefix::Ne),
        ("gt", Prefix::Gt),
        ("lt", Prefix::Lt),
        ("ge", Prefix::Ge),
        ("le", Prefix::Le),
        ("sa", Prefix::Sa),
        ("eb", Prefix::Eb),
        ("ap", Prefix::Ap),
    ];
    for (letters, prefix) in PREFIXES {
        if let Some(rest) = text.strip_prefix(letters) {
            return (*prefix, rest);
        }
    }
    (Prefix::Eq, text)
}

fn parse_date_match(text: &str) -> Result<DateMatch, SearchError> {
    let (prefix, date) = split_prefix(text);
    let range = parse_range(date).ok_or_else(|| {
        error("a date must look like 2020, 2020-03, 2020-03-04 or 2020-03-04T10:00:00Z")
    })?;
    Ok(DateMatch { prefix, range })
}

fn parse_number_match(text: &str) -> Result<NumberMatch, SearchError> {
    let (prefix, number) = split_prefix(text);
    let value: f64 = number
        .parse()
        .ok()
        .filter(|value: &f64| value.is_finite())
        .ok_or_else(|| error("a number must be a decimal like 100 or 1.5e2"))?;
    let (mantissa, exponent) = match number.split_once(['e', 'E']) {
        Some((mantissa, exponent)) => (
            mantissa,
            exponent.parse::<i32>().unwrap_or(0).clamp(-300, 300),
        ),
        None => (number, 0),
    };
    let decimals = mantissa
        .split_once('.')
        .map_or(0, |(_, fraction)| fraction.len().min(300) as i32);
    let half_step = 0.5 * 10_f64.powi(exponent - decimals);
    Ok(NumberMatch {
        prefix,
        value,
        low: value - half_step,
        high: value + half_step,
    })
}

/// `5.4|http://unitsofmeasure.org|mg`, `5.4||mg`, `5.4`.
fn parse_quantity(text: &str) -> Result<Match, SearchError> {
    let parts = split_unescaped(text, '|');
    let number = parse_number_match(parts.first().copied().unwrap_or_default())?;
    let system = parts
        .get(1)
        .filter(|system| !system.is_empty())
        .map(|s| unescape(s));
    let code = parts
        .get(2)
        .filter(|code| !code.is_empty())
        .map(|c| unescape(c));
    Ok(Match::Quantity {
        number,
        system,
        code,
    })
}

/// The alternatives of a parameter: at least one, at most [`MAX_VALUES`].
fn bounded_values(code: &str, value: &str) -> Result<Vec<String>, SearchError> {
    let values = split_values(value);
    if values.is_empty() {
        return Err(error(format!("search parameter '{code}' has no value")));
    }
    if values.len() > MAX_VALUES {
        return Err(error(format!(
            "search parameter '{code}' has more than {MAX_VALUES} values"
        )));
    }
    Ok(values)
}

/// Splits on commas not escaped with a backslash; drops empty alternatives.
fn split_values(value: &str) -> Vec<String> {
    split_unescaped(value, ',')
        .into_iter()
        .filter(|part| !part.is_empty())
        .map(unescape)
        .collect()
}

fn split_unescaped(text: &str, separator: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (position, character) in text.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        if character == '\\' {
            escaped = true;
        } else if character == separator {
            parts.push(&text[start..position]);
            start = position + 1;
        }
    }
    parts.push(&text[start..]);
    parts
}

fn unescape(text: &str) -> String {
    let mut output = String::with_capacity(text.len());
    let mut characters = text.chars();
    while let Some(character) = characters.next() {
        if character == '\\' {
            if let Some(next) = characters.next() {
                output.push(next);
            }
        } else {
            output.push(character);
        }
    }
    output
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(query: &[(&str, &str)]) -> Vec<(String, String)> {
        query
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect()
    }

    fn parse(resource_type: &str, query: &[(&str, &str)]) -> SearchRequest {
        parse_search(resource_type, &pairs(query)).expect("parses")
    }

    #[test]
    fn strings_tokens_and_alternatives() {
        let request = parse(
            "Patient",
            &[
                ("name", "smi,jon"),
                ("identifier", "urn:mrn|12\\,3"),
                ("gender:not", "male"),
            ],
        );
        assert_eq!(request.criteria.len(), 3);
        let Criterion::Indexed(name) = &request.criteria[0] else {
            panic!("indexed")
        };
        assert_eq!(
            name.test,
            Test::AnyOf(vec![
                Match::TextStartsWith("smi".into()),
                Match::TextStartsWith("jon".into())
            ])
        );
        let Criterion::Indexed(identifier) = &request.criteria[1] else {
            panic!("indexed")
        };
        assert_eq!(
            identifier.test,
            Test::AnyOf(vec![Match::Token {
                system: SystemMatch::Is("urn:mrn".into()),
                code: Some("12,3".into())
            }])
        );
        let Criterion::Indexed(gender) = &request.criteria[2] else {
            panic!("indexed")
        };
        assert!(gender.negated);
    }

    #[test]
    fn dates_numbers_and_quantities_carry_prefixes_and_precision() {
        let request = parse(
            "Observation",
            &[
                ("date", "ge2020-01"),
                ("value-quantity", "lt5.40|http://unitsofmeasure.org|mg"),
            ],
        );
        let Criterion::Indexed(date) = &request.criteria[0] else {
            panic!("indexed")
        };
        let Test::AnyOf(matches) = &date.test else {
            panic!("any of")
        };
        assert!(matches!(
            matches[0],
            Match::Date(DateMatch {
                prefix: Prefix::Ge,
                ..
            })
        ));
        let Criterion::Indexed(quantity) = &request.criteria[1] else {
            panic!("indexed")
        };
        let Test::AnyOf(matches) = &quantity.test else {
            panic!("any of")
        };
        let Match::Quantity { number, code, .. } = &matches[0] else {
            panic!("quantity")
        };
        assert_eq!(number.prefix, Prefix::Lt);
        assert!((number.high - 5.405).abs() < 1e-9);
        assert_eq!(code.as_deref(), Some("mg"));
        let probability = parse("RiskAssessment", &[("probability", "100")]);
        let Criterion::Indexed(criterion) = &probability.criteria[0] else {
            panic!("indexed")
        };
        let Test::AnyOf(matches) = &criterion.test else {
            panic!("any of")
        };
        assert_eq!(
            matches[0],
            Match::Number(NumberMatch {
                prefix: Prefix::Eq,
                value: 100.0,
                low: 99.5,
                high: 100.5
            })
        );
    }

    #[test]
    fn references_chains_and_has() {
        let request = parse(
            "Observation",
            &[
                ("subject:Patient", "p1"),
                ("subject.name", "smith"),
                ("_has:Provenance:target:agent", "Practitioner/1"),
            ],
        );
        let Criterion::Indexed(subject) = &request.criteria[0] else {
            panic!("indexed")
        };
        assert_eq!(
            subject.test,
            Test::AnyOf(vec![Match::Reference("Patient/p1".into())])
        );
        let Criterion::Chain { targets, .. } = &request.criteria[1] else {
            panic!("chain")
        };
        assert!(targets.iter().any(|(target, _)| target == "Patient"));
        assert!(matches!(request.criteria[2], Criterion::Has { .. }));
    }

    #[test]
    fn controls_and_ignored_parameters() {
        let request = parse(
            "Patient",
            &[
                ("_count", "5000"),
                ("_sort", "-birthdate,_id"),
                ("_include", "Patient:organization"),
                ("_revinclude", "Observation:subject"),
                ("_summary", "count"),
                ("nonsense", "1"),
            ],
        );
        assert_eq!(request.count, MAX_COUNT);
        assert_eq!(
            request.sort[0],
            SortKey {
                code: "birthdate".into(),
                descending: true
            }
        );
        assert_eq!(request.includes.len(), 1);
        assert_eq!(request.revincludes.len(), 1);
        assert!(request.summary_count);
        assert_eq!(request.ignored.len(), 1);
    }

    #[test]
    fn bad_values_are_errors() {
        let cases: &[(&str, &str, &str)] = &[
            ("Patient", "birthdate", "last-tuesday"),
            ("Patient", "name:fuzzy", "x"),
            ("Patient", "_count", "-1"),
            ("Patient", "_sort", "family"),
            ("Patient", "_include", "Observation:subject"),
            ("Patient", "organization.name.alias", "x"),
            ("Patient", "active:missing", "maybe"),
            ("Patient", "_id", ""),
            ("Patient", "_lastUpdated", ","),
            ("Patient", "_offset", "100000000000000000000"),
        ];
        for (resource_type, name, value) in cases {
            assert!(
                parse_search(resource_type, &pairs(&[(name, value)])).is_err(),
                "{name}={value}"
            );
        }
    }
}
