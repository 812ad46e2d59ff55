//! The on-disk value encoding: one envelope byte, then the payload.
//!
//! Every stored value starts with [`ENVELOPE_V1`]. In format 1 the payload of each value type is fixed:
//! bincode 2 with [`CONFIG`] for plain serde types (records, runs, ledger entries, learning-loop data), and
//! JSON for the two types whose serde layout bincode cannot decode (`Policy` and `Snapshot` hold `Rule`,
//! an internally tagged enum). Snapshots are stored as their exact RFC 8785 canonical bytes so that the
//! stored bytes are the hashed bytes. A new payload layout or codec gets a new envelope byte; old values
//! stay readable by matching on it.
//!
//! Keys are never encoded here: they are built by hand, big-endian, in [`crate::keys`].

use bincode::config::{Configuration, Limit, LittleEndian, Varint};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::StoreError;

/// The largest value the store writes or decodes, in bytes: a bound on allocation for corrupt input.
pub const MAX_VALUE_LEN: usize = 16 * 1024 * 1024;

/// Format 1 of the envelope.
pub const ENVELOPE_V1: u8 = 1;

/// The bincode configuration of format 1: little-endian varints with a decode limit. Part of the on-disk
/// format: changing it requires a new envelope version.
pub const CONFIG: Configuration<LittleEndian, Varint, Limit<MAX_VALUE_LEN>> =
    bincode::config::standard().with_limit::<MAX_VALUE_LEN>();

/// A value type with a fixed format-1 encoding.
pub(crate) trait Stored: Sized {
    /// What the value is, for error messages.
    const WHAT: &'static str;
    /// The envelope and payload.
    fn encode(&self) -> Result<Vec<u8>, StoreError>;
    /// Parses an envelope and payload, rejecting unknown envelopes, oversized input and trailing bytes.
    fn decode(bytes: &[u8]) -> Result<Self, StoreError>;
}

fn payload<'a>(what: &str, bytes: &'a [u8]) -> Result<&'a [u8], StoreError> {
    match bytes.split_first() {
        Some((&ENVELOPE_V1, payload)) if payload.len() <= MAX_VALUE_LEN => Ok(payload),
        Some((&ENVELOPE_V1, payload)) => {
            Err(StoreError::corrupt(format!("stored {what} is {} bytes, over the limit", payload.len())))
        }
        Some((version, _)) => Err(StoreError::corrupt(format!("stored {what} has unknown envelope version {version}"))),
        None => Err(StoreError::corrupt(format!("stored {what} is empty"))),
    }
}

fn too_large(what: &str, len: usize) -> Result<(), StoreError> {
    if len > MAX_VALUE_LEN + 1 {
        return Err(StoreError::contract(format!("{what} encodes to {len} bytes, over the {MAX_VALUE_LEN} limit")));
    }
    Ok(())
}

/// Envelope plus bincode payload.
pub(crate) fn encode_bincode<T: Serialize>(what: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![ENVELOPE_V1];
    bincode::serde::encode_into_std_write(value, &mut out, CONFIG)
        .map_err(|err| StoreError::contract(format!("cannot encode {what}: {err}")))?;
    too_large(what, out.len())?;
    Ok(out)
}

/// Decodes an envelope plus bincode payload.
pub(crate) fn decode_bincode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    decode_bincode_payload(what, payload(what, bytes)?)
}

/// The bincode `payload` of a value whose envelope byte the caller has already read.
pub(crate) fn decode_bincode_payload<T: DeserializeOwned>(what: &str, payload: &[u8]) -> Result<T, StoreError> {
    if payload.len() > MAX_VALUE_LEN {
        return Err(StoreError::corrupt(format!("stored {what} is {} bytes, over the limit", payload.len())));
    }
    let (value, read) = bincode::serde::decode_from_slice(payload, CONFIG)
        .map_err(|err| StoreError::corrupt(format!("stored {what} does not decode: {err}")))?;
    if read != payload.len() {
        return Err(StoreError::corrupt(format!(
            "stored {what} has {} trailing bytes",
            payload.len().saturating_sub(read)
        )));
    }
    Ok(value)
}

/// Envelope plus JSON payload.
pub(crate) fn encode_json<T: Serialize>(what: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![ENVELOPE_V1];
    serde_json::to_writer(&mut out, value)
        .map_err(|err| StoreError::contract(format!("cannot encode {what}: {err}")))?;
    too_large(what, out.len())?;
    Ok(out)
}

/// Decodes an envelope plus JSON payload (serde_json rejects trailing bytes).
pub(crate) fn decode_json<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    let payload = payload(what, bytes)?;
    serde_json::from_slice(payload).map_err(|err| StoreError::corrupt(format!("stored {what} does not decode: {err}")))
}

/// Envelope plus raw bytes (snapshots: their canonical encoding).
pub(crate) fn encode_raw(what: &str, bytes: &[u8]) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(bytes.len() + 1);
    out.push(ENVELOPE_V1);
    out.extend_from_slice(bytes);
    too_large(what, out.len())?;
    Ok(out)
}

/// The raw payload of an envelope.
pub(crate) fn decode_raw<'a>(what: &str, bytes: &'a [u8]) -> Result<&'a [u8], StoreError> {
    payload(what, bytes)
}

/// Implements [`Stored`] for each type with the given pair of encode/decode functions.
macro_rules! stored {
    ($encode:ident, $decode:ident: $($ty:ty => $what:literal),* $(,)?) => {$(
        impl Stored for $ty {
            const WHAT: &'static str = $what;
            fn encode(&self) -> Result<Vec<u8>, StoreError> {
                $encode(Self::WHAT, self)
            }
            fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
                $decode(Self::WHAT, bytes)
            }
        }
    )*};
}

stored! {
    encode_bincode, decode_bincode:
    runguard_contract::PreventionRecord => "prevention record",
    runguard_contract::AuditEntry => "audit entry",
    runguard_contract::Incident => "incident",
    runguard_contract::Pattern => "pattern",
    runguard_contract::Regret => "regret",
    crate::model::ShadowStats => "shadow statistics",
    crate::model::GraduationState => "graduation state",
    crate::model::RunRollup => "rolled-up totals",
    u32 => "counter",
    u64 => "sequence number",
    String => "pattern id",
}

/// Runs and ledger entries: envelope 2, still reading envelope 1 (`crate::legacy`).
macro_rules! stored_v2 {
    ($($ty:ty => $old:ty, $what:literal),* $(,)?) => {$(
        impl Stored for $ty {
            const WHAT: &'static str = $what;
            fn encode(&self) -> Result<Vec<u8>, StoreError> {
                crate::legacy::encode_v2(Self::WHAT, self)
            }
            fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
                crate::legacy::decode_v2::<$ty, $old>(Self::WHAT, bytes)
            }
        }
    )*};
}

stored_v2! {
    crate::model::StoredRun => crate::legacy::RunV1, "run",
    crate::model::LedgerEntry => crate::legacy::LedgerEntryV1, "ledger entry",
}

stored! {
    encode_json, decode_json:
    runguard_contract::Policy => "policy",
}
