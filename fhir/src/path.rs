//! The subset of FHIRPath that R4 search-parameter expressions use, compiled once and evaluated
//! over `serde_json` resources: member paths, `as`/`.as()` on choice elements, `.where(field='x')`,
//! `.where(resolve() is Type)`, `.ofType(Type)` and `.extension('url')`.

use serde_json::Value;

/// One navigation step of a compiled expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A member; arrays are flattened.
    Member(String),
    /// Keeps objects whose `field` equals `value` (`where(system='phone')`).
    WhereEquals { field: String, value: String },
    /// Keeps references whose target type is this one (`where(resolve() is Patient)`).
    ReferenceTo(String),
    /// Keeps extensions with this url (`extension('http://…')`).
    Extension(String),
}

/// A compiled path: steps from the resource root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledPath {
    pub steps: Vec<Step>,
}

/// Why an expression part could not be compiled (the parameter is then not supported).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported search expression: {0}")]
pub struct UnsupportedExpression(pub String);

/// Compiles the parts of `expression` that apply to `resource_type` (or to every resource when
/// the expression starts at `Resource`/`DomainResource`). Returns no paths when none applies.
pub fn compile_for(
    expression: &str,
    resource_type: &str,
) -> Result<Vec<CompiledPath>, UnsupportedExpression> {
    let mut paths = Vec::new();
    for part in split_top_level(expression, '|') {
        let part = part.trim();
        let Some(rest) = strip_root(part, resource_type) else {
            continue;
        };
        paths.push(compile_after_root(rest, part)?);
    }
    Ok(paths)
}

/// Removes `Type.` (or `(Type.` for the `(X as T)` form) and returns what follows, keeping the
/// opening parenthesis so the `as` form can be recognised.
fn strip_root<'a>(part: &'a str, resource_type: &str) -> Option<&'a str> {
    for root in [resource_type, "Resource", "DomainResource"] {
        if let Some(rest) = part
            .strip_prefix(root)
            .and_then(|rest| rest.strip_prefix('.'))
        {
            return Some(rest);
        }
        if let Some(rest) = part
            .strip_prefix('(')
            .and_then(|rest| rest.strip_prefix(root))
            .and_then(|rest| rest.strip_prefix('.'))
        {
            return Some(rest);
        }
    }
    None
}

fn compile_after_root(rest: &str, whole: &str) -> Result<CompiledPath, UnsupportedExpression> {
    let unsupported = || UnsupportedExpression(whole.to_owned());
    // `(Observation.value as Quantity).unit` was stripped to `value as Quantity).unit`.
    let (inner, after) = match rest.split_once(')') {
        Some((inner, after)) if inner.contains(" as ") && whole.starts_with('(') => {
            (inner, after.strip_prefix('.').unwrap_or(after))
        }
        _ => (rest, ""),
    };
    let (navigation, cast) = match inner.split_once(" as ") {
        Some((navigation, cast)) => (navigation, Some(cast.trim())),
        None => (inner, None),
    };
    let mut steps = compile_steps(navigation).ok_or_else(unsupported)?;
    if let Some(cast) = cast {
        apply_cast(&mut steps, cast).ok_or_else(unsupported)?;
    }
    if !after.is_empty() {
        steps.extend(compile_steps(after).ok_or_else(unsupported)?);
    }
    Ok(CompiledPath { steps })
}

fn compile_steps(navigation: &str) -> Option<Vec<Step>> {
    let mut steps = Vec::new();
    for segment in split_top_level(navigation, '.') {
        let segment = segment.trim();
        if let Some(argument) = call_argument(segment, "as").or(call_argument(segment, "ofType")) {
            apply_cast(&mut steps, argument)?;
            continue;
        }
        if let Some(argument) = call_argument(segment, "where") {
            steps.push(compile_where(argument)?);
            continue;
        }
        if let Some(argument) = call_argument(segment, "extension") {
            steps.push(Step::Extension(unquote(argument)?.to_owned()));
            continue;
        }
        if !segment.is_empty()
            && segment
                .chars()
                .all(|character| character.is_ascii_alphanumeric())
        {
            steps.push(Step::Member(segment.to_owned()));
            continue;
        }
        return None;
    }
    Some(steps)
}

/// `value` + `as(Quantity)` becomes the JSON member `valueQuantity`.
fn apply_cast(steps: &mut [Step], type_name: &str) -> Option<()> {
    let Some(Step::Member(member)) = steps.last_mut() else {
        return None;
    };
    let mut characters = type_name.chars();
    let first = characters.next()?;
    *member = format!(
        "{member}{}{}",
        first.to_ascii_uppercase(),
        characters.as_str()
    );
    Some(())
}

fn compile_where(argument: &str) -> Option<Step> {
    if let Some(target) = argument.strip_prefix("resolve() is ") {
        return Some(Step::ReferenceTo(target.trim().to_owned()));
    }
    let (field, value) = argument.split_once('=')?;
    let field = field.trim();
    if !field
        .chars()
        .all(|character| character.is_ascii_alphanumeric())
    {
        return None;
    }
    Some(Step::WhereEquals {
        field: field.to_owned(),
        value: unquote(value.trim())?.to_owned(),
    })
}

fn call_argument<'a>(segment: &'a str, function: &str) -> Option<&'a str> {
    segment
        .strip_prefix(function)?
        .strip_prefix('(')?
        .strip_suffix(')')
}

fn unquote(text: &str) -> Option<&str> {
    text.strip_prefix('\'')?.strip_suffix('\'')
}

/// Splits on `separator` outside parentheses and quotes.
fn split_top_level(text: &str, separator: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0_i32;
    let mut quoted = false;
    let mut start = 0;
    for (position, character) in text.char_indices() {
        match character {
            '\'' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => depth -= 1,
            _ if character == separator && depth == 0 && !quoted => {
                parts.push(&text[start..position]);
                start = position + character.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

impl CompiledPath {
    /// Every value the path reaches in `resource`.
    pub fn evaluate<'a>(&self, resource: &'a Value) -> Vec<&'a Value> {
        let mut current = vec![resource];
        for step in &self.steps {
            current = current
                .into_iter()
                .flat_map(|value| apply_step(step, value))
                .collect();
            if current.is_empty() {
                break;
            }
        }
        current
    }
}

fn apply_step<'a>(step: &Step, value: &'a Value) -> Vec<&'a Value> {
    match step {
        Step::Member(name) => match value.get(name.as_str()) {
            Some(found) => flatten(Some(found)),
            None => choice_values(value, name),
        },
        Step::WhereEquals {
            field,
            value: wanted,
        } => {
            if value.get(field.as_str()).and_then(Value::as_str) == Some(wanted.as_str()) {
                vec![value]
            } else {
                Vec::new()
            }
        }
        Step::ReferenceTo(target) => {
            let reference = value.get("reference").and_then(Value::as_str).unwrap_or("");
            if reference_type(reference) == Some(target.as_str()) {
                vec![value]
            } else {
                Vec::new()
            }
        }
        Step::Extension(url) => flatten(value.get("extension"))
            .into_iter()
            .filter(|extension| extension.get("url").and_then(Value::as_str) == Some(url))
            .collect(),
    }
}

/// `Observation.effective` names every `effective[x]`: `effectiveDateTime`, `effectivePeriod`, ….
fn choice_values<'a>(value: &'a Value, name: &str) -> Vec<&'a Value> {
    let Some(object) = value.as_object() else {
        return Vec::new();
    };
    object
        .iter()
        .filter(|(key, _)| {
            key.strip_prefix(name)
                .and_then(|suffix| suffix.chars().next())
                .is_some_and(|first| first.is_ascii_uppercase())
        })
        .flat_map(|(_, found)| flatten(Some(found)))
        .collect()
}

fn flatten(value: Option<&Value>) -> Vec<&Value> {
    match value {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items.iter().collect(),
        Some(single) => vec![single],
    }
}

/// The resource type a literal reference points at: `Patient/1`, `http://x/fhir/Patient/1`,
/// `Patient/1/_history/2`.
pub fn reference_type(reference: &str) -> Option<&str> {
    let segments: Vec<&str> = reference.split('/').collect();
    let type_position = match segments.iter().rposition(|segment| *segment == "_history") {
        Some(history) if history >= 2 => history - 2,
        Some(_) => return None,
        None if segments.len() >= 2 => segments.len() - 2,
        None => return None,
    };
    let candidate = segments[type_position];
    candidate
        .chars()
        .next()
        .filter(char::is_ascii_uppercase)
        .map(|_| candidate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn paths(expression: &str, resource_type: &str) -> Vec<CompiledPath> {
        compile_for(expression, resource_type).expect("compiles")
    }

    #[test]
    fn picks_the_part_for_the_resource_type() {
        let compiled = paths(
            "Patient.name.family | Practitioner.name.family",
            "Practitioner",
        );
        assert_eq!(compiled.len(), 1);
        let resource = json!({"name": [{"family": "Ng"}, {"family": "Ho"}]});
        let values = compiled[0].evaluate(&resource);
        assert_eq!(values, vec![&json!("Ng"), &json!("Ho")]);
    }

    #[test]
    fn casts_choice_elements_both_ways() {
        let resource = json!({"valueQuantity": {"value": 5}, "onsetDateTime": "2020"});
        let quantity = paths("(Observation.value as Quantity)", "Observation");
        assert_eq!(quantity[0].evaluate(&resource), vec![&json!({"value": 5})]);
        let onset = paths("Condition.onset.as(dateTime)", "Condition");
        assert_eq!(onset[0].steps, vec![Step::Member("onsetDateTime".into())]);
        let text = paths("(Observation.value as CodeableConcept).text", "Observation");
        assert_eq!(
            text[0].steps,
            vec![
                Step::Member("valueCodeableConcept".into()),
                Step::Member("text".into())
            ]
        );
    }

    #[test]
    fn filters_with_where() {
        let resource = json!({"telecom": [{"system": "phone", "value": "555"}, {"system": "email", "value": "a@b"}],
            "subject": {"reference": "Group/1"}});
        let phone = paths("Patient.telecom.where(system='phone')", "Patient");
        assert_eq!(phone[0].evaluate(&resource).len(), 1);
        let patient = paths(
            "Observation.subject.where(resolve() is Patient)",
            "Observation",
        );
        assert!(patient[0].evaluate(&resource).is_empty());
    }

    #[test]
    fn reference_types() {
        assert_eq!(reference_type("Patient/1"), Some("Patient"));
        assert_eq!(reference_type("https://x/fhir/Patient/1"), Some("Patient"));
        assert_eq!(reference_type("Patient/1/_history/3"), Some("Patient"));
        assert_eq!(reference_type("urn:uuid:1234"), None);
        assert_eq!(reference_type("#contained"), None);
    }

    #[test]
    fn unsupported_functions_are_reported() {
        assert!(compile_for("Patient.name.select(given)", "Patient").is_err());
        assert!(
            paths(
                "Patient.deceased.exists() and Patient.deceased != false",
                "Observation"
            )
            .is_empty()
        );
    }
}
