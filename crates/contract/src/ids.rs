//! Identifiers: validated string newtypes with their prefixes (`pol_`, `snp_`, …).
//!
//! Ids supplied by callers (`run_id`, policy `id`, tenant names) are checked for length and alphabet so that
//! they are safe in keys, logs and URLs. Ids the node generates carry a prefix (`pol_`, `dec_`, `prv_`, …)
//! followed by 32 lowercase hex digits.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::ValidationError;

/// The longest id accepted, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// The alphabet and length of [`check_id`] as a regular expression (for JSON Schemas).
pub const ID_PATTERN: &str = "^[A-Za-z0-9_.:-]{1,128}$";

/// Checks the alphabet and length shared by every id: 1 to 128 bytes of `[A-Za-z0-9._:-]`.
pub fn check_id(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if value.len() > MAX_ID_LEN {
        return Err(ValidationError::new(field, format!("is {} bytes long, the limit is {MAX_ID_LEN}", value.len())));
    }
    if let Some(bad) = value.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))) {
        return Err(ValidationError::new(
            field,
            format!("contains `{}`; ids use only letters, digits and `_-.:`", bad.escape_default()),
        ));
    }
    Ok(())
}

/// The conversions every validated string newtype shares: parsing through `new`, back to `String`, and
/// `Display` as the plain string.
macro_rules! string_newtype_conversions {
    ($name:ident) => {
        impl TryFrom<String> for $name {
            type Error = ValidationError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

macro_rules! define_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// The prefix of ids of this kind that the node generates.
            pub const PREFIX: &'static str = $prefix;

            /// Validates `value` as an id of this kind.
            pub fn new(value: impl Into<String>) -> Result<Self, ValidationError> {
                let value = value.into();
                check_id(stringify!($name), &value)?;
                Ok(Self(value))
            }

            /// A generated id: the prefix followed by the 32 hex digits of `entropy`.
            pub fn from_u128(entropy: u128) -> Self {
                Self(format!("{}{:032x}", $prefix, entropy))
            }

            /// A generated id derived from a digest: the prefix followed by its first 32 hex digits.
            pub fn from_digest(digest: &[u8; 32]) -> Self {
                let head = digest.first_chunk::<16>().copied().unwrap_or_default();
                Self::from_u128(u128::from_be_bytes(head))
            }

            /// The id as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        string_newtype_conversions!($name);

        #[cfg(feature = "schema")]
        impl schemars::JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }

            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_ID_LEN,
                    "pattern": ID_PATTERN,
                })
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

define_id!(
    /// A tenant: every policy, run and record belongs to one (global policies to none).
    TenantId, "ten_"
);
define_id!(
    /// A policy, unique within its tenant (or among global policies).
    PolicyId, "pol_"
);
define_id!(
    /// A run of an agent, unique within its tenant.
    RunId, "run_"
);
define_id!(
    /// A decision returned for a run-start, step or run-end call.
    DecisionId, "dec_"
);
define_id!(
    /// A prevention record.
    RecordId, "prv_"
);
define_id!(
    /// An incident created by a failed run.
    IncidentId, "inc_"
);
define_id!(
    /// A pattern grouping incidents by signature and error type.
    PatternId, "pat_"
);
define_id!(
    /// A content-addressed snapshot: the prefix and the first 32 hex digits of its hash.
    SnapshotId, "snp_"
);

macro_rules! define_hex_digest {
    ($(#[$doc:meta])* $name:ident, $len:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// The number of lowercase hex digits.
            pub const HEX_LEN: usize = $len;

            /// Validates `value`: exactly the expected number of lowercase hex digits.
            pub fn new(value: impl Into<String>) -> Result<Self, ValidationError> {
                let value = value.into();
                if value.len() != $len
                    || !value.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                {
                    return Err(ValidationError::new(
                        stringify!($name),
                        format!("must be {} lowercase hex digits", $len),
                    ));
                }
                Ok(Self(value))
            }

            /// Builds the digest from raw bytes, keeping the first `HEX_LEN / 2` bytes.
            pub fn from_bytes(bytes: &[u8]) -> Self {
                let take = bytes.len().min($len / 2);
                Self(hex::encode(bytes.get(..take).unwrap_or_default()))
            }

            /// The digest as lowercase hex.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        string_newtype_conversions!($name);

        #[cfg(feature = "schema")]
        impl schemars::JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }

            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({
                    "type": "string",
                    "pattern": format!("^[0-9a-f]{{{}}}$", $len),
                })
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }
    };
}

define_hex_digest!(
    /// The SHA-256 of a snapshot's canonical encoding (64 hex digits).
    SnapshotHash, 64
);
define_hex_digest!(
    /// The SHA-256 linking a prevention record into the chain (64 hex digits).
    RecordHash, 64
);
define_hex_digest!(
    /// The first 32 hex digits of the SHA-256 of a request signature.
    SignatureHash, 32
);

impl RecordHash {
    /// The `prev_hash` of the first record of a chain.
    pub fn genesis() -> Self {
        Self("0".repeat(64))
    }
}

impl SnapshotId {
    /// The id of the snapshot with this hash: identical policy sets share one id.
    pub fn for_hash(hash: &SnapshotHash) -> Self {
        Self(format!("{}{}", Self::PREFIX, hash.as_str().get(..32).unwrap_or(hash.as_str())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_accept_the_safe_alphabet_and_reject_the_rest() {
        assert!(RunId::new("run-1.a:b_C").is_ok());
        assert!(RunId::new("").is_err());
        assert!(RunId::new("a b").is_err());
        assert!(RunId::new("a/b").is_err());
        assert!(RunId::new("x".repeat(MAX_ID_LEN)).is_ok());
        assert!(RunId::new("x".repeat(MAX_ID_LEN + 1)).is_err());
    }

    #[test]
    fn generated_ids_carry_their_prefix() {
        assert_eq!(RecordId::from_u128(255).as_str(), "prv_000000000000000000000000000000ff");
        assert_eq!(DecisionId::from_digest(&[0xab; 32]).as_str().len(), 4 + 32);
    }

    #[test]
    fn digests_are_lowercase_hex_of_fixed_length() {
        assert!(SignatureHash::new("0123456789abcdef0123456789abcdef").is_ok());
        assert!(SignatureHash::new("0123456789ABCDEF0123456789abcdef").is_err());
        assert!(SignatureHash::new("0123").is_err());
        assert_eq!(RecordHash::genesis().as_str().len(), 64);
        let hash = SnapshotHash::from_bytes(&[0x11; 32]);
        assert_eq!(SnapshotId::for_hash(&hash).as_str(), format!("snp_{}", "11".repeat(16)));
    }

    #[test]
    fn ids_round_trip_through_json_and_reject_bad_values() {
        let id: PolicyId = serde_json::from_str("\"pol_budget\"").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"pol_budget\"");
        assert!(serde_json::from_str::<PolicyId>("\"bad id\"").is_err());
    }
}
