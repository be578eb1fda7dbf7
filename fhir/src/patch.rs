//! JSON Patch (RFC 6902) for the FHIR `PATCH` interaction: add, remove, replace, move, copy and
//! test, with JSON Pointer (RFC 6901) paths. A patch applies completely or not at all.

use serde_json::Value;

/// Why a patch cannot be applied (answered with 422 or 400; no resource content is echoed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    #[error("a JSON Patch must be an array of operations")]
    NotAnArray,
    #[error("operation {0} is malformed")]
    Malformed(usize),
    #[error("operation {0}: the path does not exist")]
    MissingPath(usize),
    #[error("operation {0}: test failed")]
    TestFailed(usize),
    #[error("a patch may carry at most {MAX_OPERATIONS} operations")]
    TooManyOperations,
    #[error("operation {0}: the patched resource would be too large or too deeply nested")]
    TooLarge(usize),
}

/// The most operations one patch may carry.
pub const MAX_OPERATIONS: usize = 1000;
/// The largest patched resource (serialized bytes) and the deepest nesting a patch may produce.
pub const MAX_RESULT_BYTES: usize = 16 << 20;
pub const MAX_DEPTH: usize = 100;

/// Applies `patch` to a copy of `document` and returns the result.
pub fn apply_patch(document: &Value, patch: &Value) -> Result<Value, PatchError> {
    let operations = patch.as_array().ok_or(PatchError::NotAnArray)?;
    if operations.len() > MAX_OPERATIONS {
        return Err(PatchError::TooManyOperations);
    }
    let mut result = document.clone();
    for (position, operation) in operations.iter().enumerate() {
        apply_operation(&mut result, operation, position)?;
        let grows = matches!(
            operation.get("op").and_then(Value::as_str),
            Some("add" | "copy" | "replace" | "move")
        );
        if grows
            && (depth_exceeds(&result, MAX_DEPTH) || serialized_size(&result) > MAX_RESULT_BYTES)
        {
            return Err(PatchError::TooLarge(position));
        }
    }
    Ok(result)
}

/// Whether `value` nests deeper than `limit` (checked without recursion).
pub fn depth_exceeds(value: &Value, limit: usize) -> bool {
    let mut pending = vec![(value, 0_usize)];
    while let Some((current, depth)) = pending.pop() {
        if depth > limit {
            return true;
        }
        match current {
            Value::Object(object) => {
                pending.extend(object.values().map(|child| (child, depth + 1)))
            }
            Value::Array(items) => pending.extend(items.iter().map(|child| (child, depth + 1))),
            _ => {}
        }
    }
    false
}

fn serialized_size(value: &Value) -> usize {
    serde_json::to_vec(value).map_or(usize::MAX, |bytes| bytes.len())
}

fn apply_operation(
    document: &mut Value,
    operation: &Value,
    position: usize,
) -> Result<(), PatchError> {
    let malformed = || PatchError::Malformed(position);
    let op = operation
        .get("op")
        .and_then(Value::as_str)
        .ok_or_else(malformed)?;
    let path = parse_pointer(
        operation
            .get("path")
            .and_then(Value::as_str)
            .ok_or_else(malformed)?,
    )
    .ok_or_else(malformed)?;
    let value = || operation.get("value").cloned().ok_or_else(malformed);
    let from = || {
        operation
            .get("from")
            .and_then(Value::as_str)
            .and_then(parse_pointer)
            .ok_or_else(malformed)
    };
    match op {
        "add" => add(document, &path, value()?, position),
        "remove" => remove(document, &path, position).map(|_| ()),
        "replace" => {
            let target = resolve_mut(document, &path).ok_or(PatchError::MissingPath(position))?;
            *target = value()?;
            Ok(())
        }
        "move" => {
            let from = from()?;
            if path.starts_with(&from) && path.len() > from.len() {
                return Err(malformed());
            }
            let moved = remove(document, &from, position)?;
            add(document, &path, moved, position)
        }
        "copy" if operation.get("from").and_then(Value::as_str) == Some("") => Err(malformed()),
        "copy" => {
            let copied = resolve(document, &from()?)
                .cloned()
                .ok_or(PatchError::MissingPath(position))?;
            add(document, &path, copied, position)
        }
        "test" => {
            let actual = resolve(document, &path).ok_or(PatchError::MissingPath(position))?;
            if *actual == value()? {
                Ok(())
            } else {
                Err(PatchError::TestFailed(position))
            }
        }
        _ => Err(malformed()),
    }
}

fn parse_pointer(pointer: &str) -> Option<Vec<String>> {
    if pointer.is_empty() {
        return Some(Vec::new());
    }
    let rest = pointer.strip_prefix('/')?;
    Some(
        rest.split('/')
            .map(|token| token.replace("~1", "/").replace("~0", "~"))
            .collect(),
    )
}

fn resolve<'a>(document: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter()
        .try_fold(document, |current, token| match current {
            Value::Object(object) => object.get(token),
            Value::Array(items) => items.get(token.parse::<usize>().ok()?),
            _ => None,
        })
}

fn resolve_mut<'a>(document: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    path.iter()
        .try_fold(document, |current, token| match current {
            Value::Object(object) => object.get_mut(token),
            Value::Array(items) => items.get_mut(token.parse::<usize>().ok()?),
            _ => None,
        })
}

fn add(
    document: &mut Value,
    path: &[String],
    value: Value,
    position: usize,
) -> Result<(), PatchError> {
    let Some((last, parent_path)) = path.split_last() else {
        *document = value;
        return Ok(());
    };
    let parent = resolve_mut(document, parent_path).ok_or(PatchError::MissingPath(position))?;
    match parent {
        Value::Object(object) => {
            object.insert(last.clone(), value);
            Ok(())
        }
        Value::Array(items) => {
            let index = if last == "-" {
                items.len()
            } else {
                last.parse::<usize>()
                    .map_err(|_| PatchError::Malformed(position))?
            };
            if index > items.len() {
                return Err(PatchError::MissingPath(position));
            }
            items.insert(index, value);
            Ok(())
        }
        _ => Err(PatchError::MissingPath(position)),
    }
}

fn remove(document: &mut Value, path: &[String], position: usize) -> Result<Value, PatchError> {
    let (last, parent_path) = path.split_last().ok_or(PatchError::Malformed(position))?;
    let parent = resolve_mut(document, parent_path).ok_or(PatchError::MissingPath(position))?;
    match parent {
        Value::Object(object) => object.remove(last).ok_or(PatchError::MissingPath(position)),
        Value::Array(items) => {
            let index = last
                .parse::<usize>()
                .map_err(|_| PatchError::MissingPath(position))?;
            if index >= items.len() {
                return Err(PatchError::MissingPath(position));
            }
            Ok(items.remove(index))
        }
        _ => Err(PatchError::MissingPath(position)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn applies_the_rfc_6902_operations() {
        let document = json!({"active": true, "name": [{"family": "Ng"}], "a/b": 1});
        let patch = json!([
            {"op": "test", "path": "/active", "value": true},
            {"op": "replace", "path": "/active", "value": false},
            {"op": "add", "path": "/name/-", "value": {"family": "Ho"}},
            {"op": "copy", "from": "/name/0", "path": "/alias"},
            {"op": "move", "from": "/a~1b", "path": "/moved"},
            {"op": "remove", "path": "/name/0"},
        ]);
        let patched = apply_patch(&document, &patch).expect("applies");
        assert_eq!(
            patched,
            json!({"active": false, "name": [{"family": "Ho"}], "alias": {"family": "Ng"}, "moved": 1})
        );
    }

    #[test]
    fn failures_leave_nothing_half_done() {
        let document = json!({"active": true});
        let patch = json!([{"op": "replace", "path": "/active", "value": false}, {"op": "test", "path": "/active", "value": true}]);
        assert_eq!(
            apply_patch(&document, &patch),
            Err(PatchError::TestFailed(1))
        );
        assert_eq!(document, json!({"active": true}));
        assert_eq!(
            apply_patch(&document, &json!({})),
            Err(PatchError::NotAnArray)
        );
        assert_eq!(
            apply_patch(&document, &json!([{"op": "remove", "path": "/nothing"}])),
            Err(PatchError::MissingPath(0))
        );
        assert_eq!(
            apply_patch(&document, &json!([{"op": "jump", "path": "/x"}])),
            Err(PatchError::Malformed(0))
        );
    }
}
