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
    Ok(serde_json_canonicalizer::to_vec(value)?)
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

    #[test]
    fn domains_separate_equal_payloads() {
        assert_ne!(domain_hash(SNAPSHOT_DOMAIN, b"{}"), domain_hash(RECORD_DOMAIN, b"{}"));
    }
}
