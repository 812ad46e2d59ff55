//! JSON Schemas of the wire types (feature `schema`): the settings every schema of runguard is generated
//! with, and the policy document's schema that `runguard policy schema` prints.
//!
//! Types with their own (de)serialisers describe themselves exactly by hand (ids, digests, timestamps);
//! what no derive can see is added here: every integer is bounded by 2^53 − 1 in magnitude, as the strict
//! reader enforces (`crate::strict`).

use schemars::generate::SchemaSettings;
use schemars::transform::{RecursiveTransform, Transform};
use schemars::{Schema, SchemaGenerator};
use serde_json::Value;

use crate::policy::PolicyDocument;
use crate::strict::MAX_SAFE_INTEGER;

/// Integer formats whose natural range passes 2^53 − 1.
const WIDE_INTEGERS: [&str; 6] = ["uint64", "int64", "uint", "int", "uint128", "int128"];

/// The largest value of the narrow unsigned formats, which the generator leaves unbounded above.
fn narrow_maximum(format: &str) -> Option<u64> {
    match format {
        "uint8" => Some(u8::MAX.into()),
        "uint16" => Some(u16::MAX.into()),
        "uint32" => Some(u32::MAX.into()),
        _ => None,
    }
}

/// Bounds 64-bit integers to what the strict reader accepts and canonical JSON represents exactly, and
/// narrow ones to their type.
fn bound_integers(schema: &mut Schema) {
    let format = schema.get("format").and_then(Value::as_str).map(str::to_owned).unwrap_or_default();
    if let Some(maximum) = narrow_maximum(&format)
        && schema.get("maximum").is_none()
    {
        schema.insert("maximum".into(), maximum.into());
    }
    if WIDE_INTEGERS.contains(&format.as_str()) {
        schema.insert("maximum".into(), MAX_SAFE_INTEGER.into());
        let signed = schema.get("minimum").and_then(Value::as_i64).is_none_or(|min| min < 0);
        if signed {
            schema.insert("minimum".into(), Value::from(-i128::from(MAX_SAFE_INTEGER) as i64));
        }
    }
}

/// Applies the integer bound to a schema and every schema inside it. Generators apply it to root schemas
/// and definitions; a schema inlined into another document (OpenAPI request bodies) needs it applied here.
pub fn bound_integers_within(schema: &mut Schema) {
    RecursiveTransform(bound_integers).transform(schema);
}

#[derive(Clone, Copy, Debug)]
struct BoundIntegers;

impl Transform for BoundIntegers {
    fn transform(&mut self, schema: &mut Schema) {
        RecursiveTransform(bound_integers).transform(schema);
    }
}

/// JSON Schema 2020-12 settings for what the node reads (`serialize` false) or answers (`true`).
pub fn settings(serialize: bool) -> SchemaSettings {
    let settings = SchemaSettings::draft2020_12().with_transform(BoundIntegers);
    if serialize { settings.for_serialize() } else { settings.for_deserialize() }
}

/// A generator for what the node reads or answers (see [`settings`]).
pub fn generator(serialize: bool) -> SchemaGenerator {
    settings(serialize).into_generator()
}

/// The JSON Schema of a policy document as `POST /v1/policies` reads it (and `policy lint` checks it),
/// self-contained for editors.
pub fn policy_document() -> Schema {
    let mut schema = generator(false).into_root_schema_for::<PolicyDocument>();
    schema.insert("$id".into(), "https://runguard.invalid/schemas/policy-document.json".into());
    schema
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wide_integers_are_bounded_and_ids_are_patterned() {
        let schema = serde_json::to_value(policy_document()).unwrap_or_default();
        let text = schema.to_string();
        assert!(text.contains("9007199254740991"), "{text}");
        assert!(text.contains(crate::ids::ID_PATTERN.replace('\\', "\\\\").as_str()), "{text}");
    }
}
