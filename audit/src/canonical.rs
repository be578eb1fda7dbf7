//! RFC 8785 JSON Canonicalization Scheme (JCS) for leaf content, restricted to integers.

use std::cmp::Ordering;

use serde_json::{Map, Number, Value};

/// The largest integer ECMAScript numbers represent exactly (2^53 - 1).
const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// Why a value has no canonical encoding here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CanonicalError {
    /// Only integers are supported; fractions would need ECMAScript float formatting.
    #[error("non-integer number {0} is not supported in canonical json")]
    NonInteger(String),
    /// The integer cannot be represented exactly as an IEEE 754 double.
    #[error("integer {0} is outside the exactly representable range (2^53 - 1)")]
    UnsafeInteger(String),
    /// The bytes are not JSON.
    #[error("leaf is not valid json: {0}")]
    Syntax(String),
    /// The bytes are JSON but not in canonical form (whitespace, key order, escapes, duplicates).
    #[error("leaf json is not in canonical form")]
    NotCanonical,
}

/// Encodes `value` per RFC 8785: object keys sorted by UTF-16 code units, no whitespace,
/// minimal string escapes, ECMAScript integer formatting. Non-integer numbers are rejected.
pub fn canonical_json(value: &Value) -> Result<Vec<u8>, CanonicalError> {
    let mut out = Vec::with_capacity(256);
    write_value(value, &mut out)?;
    Ok(out)
}

/// Parses JSON bytes and checks they are already canonical (so no duplicate keys, no
/// whitespace, sorted keys); returns the parsed value.
pub fn parse_canonical(bytes: &[u8]) -> Result<Value, CanonicalError> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|err| CanonicalError::Syntax(err.to_string()))?;
    if canonical_json(&value)? == bytes {
        Ok(value)
    } else {
        Err(CanonicalError::NotCanonical)
    }
}

fn write_value(value: &Value, out: &mut Vec<u8>) -> Result<(), CanonicalError> {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(number) => write_number(number, out)?,
        Value::String(text) => write_string(text, out),
        Value::Array(items) => write_array(items, out)?,
        Value::Object(map) => write_object(map, out)?,
    }
    Ok(())
}

fn write_number(number: &Number, out: &mut Vec<u8>) -> Result<(), CanonicalError> {
    if let Some(unsigned) = number.as_u64() {
        return write_integer(unsigned, false, number, out);
    }
    if let Some(signed) = number.as_i64() {
        return write_integer(signed.unsigned_abs(), signed < 0, number, out);
    }
    match number.as_f64() {
        Some(float) if float.is_finite() && float.fract() == 0.0 => {
            if float.abs() > MAX_SAFE_INTEGER as f64 {
                return Err(CanonicalError::UnsafeInteger(number.to_string()));
            }
            // Exact: |float| <= 2^53 - 1 and integral; -0 formats as 0 like ECMAScript.
            let magnitude = float.abs() as u64;
            write_integer(magnitude, float < 0.0, number, out)
        }
        _ => Err(CanonicalError::NonInteger(number.to_string())),
    }
}

fn write_integer(
    magnitude: u64,
    negative: bool,
    number: &Number,
    out: &mut Vec<u8>,
) -> Result<(), CanonicalError> {
    if magnitude > MAX_SAFE_INTEGER {
        return Err(CanonicalError::UnsafeInteger(number.to_string()));
    }
    if negative && magnitude != 0 {
        out.push(b'-');
    }
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    let mut rest = magnitude;
    loop {
        start -= 1;
        digits[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
    Ok(())
}

fn write_string(text: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    let bytes = text.as_bytes();
    let mut copied = 0;
    for (position, &byte) in bytes.iter().enumerate() {
        // Multi-byte UTF-8 sequences never contain bytes below 0x80, so byte-wise is safe.
        let escape: &[u8] = match byte {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            0x0c => b"\\f",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x00..=0x1f => &[],
            _ => continue,
        };
        out.extend_from_slice(&bytes[copied..position]);
        if escape.is_empty() {
            out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                hex_digit(byte >> 4),
                hex_digit(byte),
            ]);
        } else {
            out.extend_from_slice(escape);
        }
        copied = position + 1;
    }
    out.extend_from_slice(&bytes[copied..]);
    out.push(b'"');
}

fn hex_digit(nibble: u8) -> u8 {
    b"0123456789abcdef"[usize::from(nibble & 0x0f)]
}

fn write_array(items: &[Value], out: &mut Vec<u8>) -> Result<(), CanonicalError> {
    out.push(b'[');
    for (position, item) in items.iter().enumerate() {
        if position > 0 {
            out.push(b',');
        }
        write_value(item, out)?;
    }
    out.push(b']');
    Ok(())
}

fn write_object(map: &Map<String, Value>, out: &mut Vec<u8>) -> Result<(), CanonicalError> {
    let mut entries: Vec<(&String, &Value)> = map.iter().collect();
    entries.sort_by(|(a, _), (b, _)| utf16_order(a, b));
    out.push(b'{');
    for (position, (key, item)) in entries.into_iter().enumerate() {
        if position > 0 {
            out.push(b',');
        }
        write_string(key, out);
        out.push(b':');
        write_value(item, out)?;
    }
    out.push(b'}');
    Ok(())
}

/// Orders keys by their UTF-16 code units, as RFC 8785 §3.2.3 requires.
fn utf16_order(a: &str, b: &str) -> Ordering {
    let (left, right) = (a.as_bytes(), b.as_bytes());
    match left.iter().zip(right).find(|(x, y)| x != y) {
        None => left.len().cmp(&right.len()),
        // Below 0xEE both bytes are continuation bytes or leads of chars below U+E000, where
        // UTF-8 byte order, code point order and UTF-16 order all agree.
        Some((x, y)) if *x < 0xee && *y < 0xee => x.cmp(y),
        Some(_) => a.encode_utf16().cmp(b.encode_utf16()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sorts_keys_by_utf16_and_strips_whitespace() {
        // U+E000 sorts before U+1F600 in UTF-8 but after it in UTF-16 (surrogates 0xD83D...).
        let value = json!({"b": 1, "a": [true, null, "x"], "\u{e000}": 0, "\u{1f600}": -3});
        let text = String::from_utf8(canonical_json(&value).unwrap()).unwrap();
        assert_eq!(
            text,
            "{\"a\":[true,null,\"x\"],\"b\":1,\"\u{1f600}\":-3,\"\u{e000}\":0}"
        );
    }

    #[test]
    fn escapes_like_ecmascript() {
        let value = json!("q\"\\\u{1}\n\u{7f}\u{2028}é");
        let text = String::from_utf8(canonical_json(&value).unwrap()).unwrap();
        assert_eq!(text, "\"q\\\"\\\\\\u0001\\n\u{7f}\u{2028}é\"");
    }

    #[test]
    fn integers_only() {
        assert_eq!(canonical_json(&json!(1.0)).unwrap(), b"1");
        assert_eq!(canonical_json(&json!(-0.0)).unwrap(), b"0");
        assert_eq!(canonical_json(&json!(-42)).unwrap(), b"-42");
        assert!(matches!(
            canonical_json(&json!(1.5)),
            Err(CanonicalError::NonInteger(_))
        ));
        assert!(matches!(
            canonical_json(&json!(1u64 << 60)),
            Err(CanonicalError::UnsafeInteger(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn key_order_matches_utf16(a in "\\PC{0,6}", b in "\\PC{0,6}") {
            proptest::prop_assert_eq!(utf16_order(&a, &b), a.encode_utf16().cmp(b.encode_utf16()));
        }

        #[test]
        fn strings_round_trip(text in "\\PC*|[\\x00-\\x1f\"\\\\]*") {
            let encoded = canonical_json(&Value::String(text.clone())).unwrap();
            let decoded: String = serde_json::from_slice(&encoded).unwrap();
            proptest::prop_assert_eq!(decoded, text);
        }
    }

    #[test]
    fn parse_canonical_rejects_duplicates_and_whitespace() {
        assert!(parse_canonical(br#"{"a":1}"#).is_ok());
        assert_eq!(
            parse_canonical(br#"{"a":1,"a":2}"#),
            Err(CanonicalError::NotCanonical)
        );
        assert_eq!(
            parse_canonical(br#"{"a": 1}"#),
            Err(CanonicalError::NotCanonical)
        );
        assert_eq!(
            parse_canonical(br#"{"b":1,"a":2}"#),
            Err(CanonicalError::NotCanonical)
        );
    }
}
