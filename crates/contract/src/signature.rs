//! Request signatures (`docs/learning-loop.md`): how a step is recognised as a recurrence of a failure, before it runs.

use serde::{Deserialize, Serialize};

use crate::canonical::{SIGNATURE_DOMAIN, canonical_json, domain_hash};
use crate::ids::SignatureHash;
use crate::step::StepError;

/// The normalised identity of a request: skill, endpoint and input keys. The error is not part of it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Signature {
    /// Trimmed, lower-case.
    pub skill: String,
    /// Query and trailing slash dropped, id-like segments replaced by `{id}`.
    pub api_endpoint: String,
    /// Sorted and deduplicated.
    pub input_keys: Vec<String>,
}

impl Signature {
    /// Normalises the parts of a request. Absent parts normalise to empty.
    pub fn normalize(skill: Option<&str>, api_endpoint: Option<&str>, input_keys: &[String]) -> Self {
        let mut keys: Vec<String> = input_keys.to_vec();
        keys.sort();
        keys.dedup();
        Self {
            skill: skill.map(|s| s.trim().to_lowercase()).unwrap_or_default(),
            api_endpoint: api_endpoint.map(normalize_endpoint).unwrap_or_default(),
            input_keys: keys,
        }
    }

    /// The first 32 hex digits of the domain-separated SHA-256 of the canonical encoding.
    pub fn hash(&self) -> SignatureHash {
        // A struct of strings always encodes; an empty encoding would still hash deterministically.
        let bytes = canonical_json(self).unwrap_or_default();
        SignatureHash::from_bytes(&domain_hash(SIGNATURE_DOMAIN, &bytes))
    }
}

/// Normalises an endpoint: drops the query string and fragment and a trailing slash, and replaces path
/// segments that are numbers, UUIDs or hex ids of 8+ characters by `{id}`.
pub fn normalize_endpoint(endpoint: &str) -> String {
    let trimmed = endpoint.trim();
    let path = trimmed.split(['?', '#']).next().unwrap_or_default();
    let mut out: Vec<&str> = path.split('/').map(|seg| if is_id_segment(seg) { "{id}" } else { seg }).collect();
    while out.len() > 1 && out.last().is_some_and(|s| s.is_empty()) {
        out.pop();
    }
    let joined = out.join("/");
    if joined.is_empty() && path.starts_with('/') { "/".to_owned() } else { joined }
}

fn is_id_segment(segment: &str) -> bool {
    if segment.is_empty() {
        return false;
    }
    if segment.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    if is_uuid(segment) {
        return true;
    }
    segment.len() >= 8 && segment.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_uuid(segment: &str) -> bool {
    let groups: Vec<&str> = segment.split('-').collect();
    groups.len() == 5
        && groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups.iter().all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// How an incident failed: classifies it, but is not part of the request signature.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ErrorClass {
    /// Lower-cased error type (empty when unknown).
    pub error_type: String,
    /// Upper-cased error code, if any.
    pub code: Option<String>,
    /// Status, if any.
    pub status: Option<u16>,
}

impl ErrorClass {
    /// Classifies a step error.
    pub fn of(error: &StepError) -> Self {
        Self {
            error_type: error.error_type.as_deref().map(|t| t.trim().to_lowercase()).unwrap_or_default(),
            code: error.code.as_deref().map(|c| c.trim().to_uppercase()),
            status: error.status,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_normalise_ids_queries_and_slashes() {
        assert_eq!(normalize_endpoint("/v1/users/123/orders/"), "/v1/users/{id}/orders");
        assert_eq!(normalize_endpoint("/v1/users/42?expand=true#top"), "/v1/users/{id}");
        assert_eq!(normalize_endpoint("/items/550e8400-e29b-41d4-a716-446655440000/x"), "/items/{id}/x");
        assert_eq!(normalize_endpoint("/blobs/deadbeef00"), "/blobs/{id}");
        assert_eq!(normalize_endpoint("/blobs/deadbee"), "/blobs/deadbee", "7 hex chars are not an id");
        assert_eq!(normalize_endpoint("/v2/accounts"), "/v2/accounts");
        assert_eq!(normalize_endpoint("/"), "/");
        assert_eq!(normalize_endpoint("https://api.example.com/a/7/"), "https://api.example.com/a/{id}");
    }

    #[test]
    fn signatures_ignore_key_order_case_and_ids() {
        let a = Signature::normalize(Some(" Search "), Some("/users/1"), &["b".into(), "a".into(), "a".into()]);
        let b = Signature::normalize(Some("search"), Some("/users/999/"), &["a".into(), "b".into()]);
        assert_eq!(a, b);
        assert_eq!(a.hash(), b.hash());
        let c = Signature::normalize(Some("search"), Some("/orders/1"), &["a".into(), "b".into()]);
        assert_ne!(a.hash(), c.hash());
    }

    #[test]
    fn error_class_normalises_case() {
        let class = ErrorClass::of(&StepError {
            error_type: Some("TimeOut".into()),
            code: Some("e_slow".into()),
            status: Some(504),
            message: Some("ignored".into()),
        });
        assert_eq!((class.error_type.as_str(), class.code.as_deref()), ("timeout", Some("E_SLOW")));
    }
}
