//! Canonical encoding and domain-separated hashing.
//!
//! Everything that is hashed (snapshots, prevention records, request signatures) is first encoded as
//! RFC 8785 canonical JSON, then hashed as `SHA-256(domain ‖ 0x00 ‖ canonical_json)`. The domain names the
//! kind of object and the format version, so that a hash of one kind can never be replayed as another and
//! a format change cannot collide with old hashes.

use serde::Serialize;
use sha2::{Digest, Sha256};

/// Domain of snapshot hashes.
pub const SNAPSHOT_DOMAIN: &str = "runguard/snapshot/v1";
/// Domain of prevention record hashes.
pub const RECORD_DOMAIN: &str = "runguard/prevention-record/v1";
/// Domain of request signature hashes.
pub const SIGNATURE_DOMAIN: &str = "runguard/signature/v1";
/// Domain of generated decision ids.
pub const DECISION_DOMAIN: &str = "runguard/decision-id/v1";

/// Encoding failed: only values that cannot be represented as JSON (non-finite floats, maps with
/// non-string keys) get here, and contract types have none.
#[derive(Debug, thiserror::Error)]
#[error("canonical encoding failed: {0}")]
pub struct CanonicalError(#[from] serde_json::Error);

/// The RFC 8785 canonical JSON bytes of `value`.
pub fn canonical_json<T: Serialize>(value: &T) -> Result<Vec<u8>, CanonicalError> {
    canonical_json_value(&serde_json::to_value(value)?)
}

/// The RFC 8785 canonical JSON bytes of a JSON value.
///
/// Written directly for what contract types hold — objects, arrays, strings, booleans and integers of at
/// most 2^53 in magnitude — which is several times faster than the general canonicaliser (it buffers
/// every property and re-reads its key); any other number needs JavaScript's float formatting and the
/// whole value goes through `serde_json_canonicalizer` instead. A property test checks that both agree.
pub fn canonical_json_value(value: &serde_json::Value) -> Result<Vec<u8>, CanonicalError> {
    let mut out = Vec::with_capacity(512);
    if write_canonical(value, &mut out)? { Ok(out) } else { Ok(serde_json_canonicalizer::to_vec(value)?) }
}

/// Integers up to this magnitude print the same as JavaScript prints the double they convert to.
const EXACT_INTEGER: u64 = 1 << 53;

/// Appends the canonical form of `value`; `false` (with `out` left partial) when a number needs float
/// formatting.
fn write_canonical(value: &serde_json::Value, out: &mut Vec<u8>) -> Result<bool, CanonicalError> {
    use serde_json::Value;
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(number) => {
            let exact = match (number.as_u64(), number.as_i64()) {
                (Some(u), _) => u <= EXACT_INTEGER,
                (None, Some(i)) => i.unsigned_abs() <= EXACT_INTEGER,
                (None, None) => false,
            };
            if !exact {
                return Ok(false);
            }
            // Integers print as plain decimals, exactly as serde_json writes them.
            serde_json::to_writer(&mut *out, number)?;
        }
        // serde_json escapes exactly what RFC 8785 escapes (quote, backslash, control characters, with
        // the short forms and lowercase `\u00xx`), and nothing else.
        Value::String(text) => serde_json::to_writer(&mut *out, text)?,
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                if !write_canonical(item, out)? {
                    return Ok(false);
                }
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            // RFC 8785 orders properties by their UTF-16 code units; for ASCII keys that is byte order.
            entries.sort_by(|(a, _), (b, _)| {
                if a.is_ascii() && b.is_ascii() { a.cmp(b) } else { a.encode_utf16().cmp(b.encode_utf16()) }
            });
            out.push(b'{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, key)?;
                out.push(b':');
                if !write_canonical(item, out)? {
                    return Ok(false);
                }
            }
            out.push(b'}');
        }
    }
    Ok(true)
}

/// `SHA-256(domain ‖ 0x00 ‖ bytes)`.
pub fn domain_hash(domain: &str, bytes: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(domain.as_bytes());
    hasher.update([0u8]);
    hasher.update(bytes);
    hasher.finalize().into()
}

/// The domain-separated hash of the canonical encoding of `value`.
pub fn hash_canonical<T: Serialize>(domain: &str, value: &T) -> Result<[u8; 32], CanonicalError> {
    Ok(domain_hash(domain, &canonical_json(value)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_sorts_keys_and_strips_whitespace() {
        let value = serde_json::json!({"b": 1, "a": [true, null, "x"]});
        assert_eq!(canonical_json(&value).unwrap(), br#"{"a":[true,null,"x"],"b":1}"#.to_vec());
    }

    fn json() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        use serde_json::Value;
        let text = prop_oneof![any::<String>(), "[\\x00-\\x1f\"\\\\/a-z\\x7f\\u{2028}\\u{e000}\\u{1f600}]{0,6}"];
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-(1i64 << 53)..=(1i64 << 53)).prop_map(Value::from),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
            (-1000i32..1000).prop_map(|n| Value::from(f64::from(n) / 8.0)),
            text.clone().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map(text.clone(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn the_fast_encoding_equals_the_general_canonicaliser(value in json()) {
            let general = serde_json_canonicalizer::to_vec(&value).unwrap();
            proptest::prop_assert_eq!(canonical_json_value(&value).unwrap(), general);
        }
    }

    #[test]
    fn domains_separate_equal_payloads() {
        assert_ne!(domain_hash(SNAPSHOT_DOMAIN, b"{}"), domain_hash(RECORD_DOMAIN, b"{}"));
    }
}
