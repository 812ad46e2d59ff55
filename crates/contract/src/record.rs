//! Prevention records (`docs/contract.md`) and their tamper-evident chain.

use serde::{Deserialize, Serialize};

use crate::canonical::{CanonicalError, RECORD_DOMAIN, canonical_json_value, domain_hash};
use crate::decision::DecisionPhase;
use crate::ids::{
    DecisionId, IncidentId, PatternId, PolicyId, RecordHash, RecordId, RunId, SignatureHash, SnapshotHash, TenantId,
};
use crate::timestamp::Timestamp;

/// A durable proof that an active policy blocked a step.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct PreventionRecord {
    /// `prv_…`.
    pub id: RecordId,
    /// Position in the chain, gap-free from 1.
    pub seq: u64,
    /// The run's tenant.
    pub tenant_id: TenantId,
    /// The run.
    pub run_id: RunId,
    /// The blocked step (`None` for run start or run end).
    pub step_index: Option<u64>,
    /// The phase of the blocked call.
    pub phase: DecisionPhase,
    /// The blocking decision.
    pub decision_id: DecisionId,
    /// The deciding policy.
    pub policy_id: PolicyId,
    /// Its pinned version.
    pub policy_version: u32,
    /// For pattern policies: the pattern.
    pub pattern_id: Option<PatternId>,
    /// For pattern policies: the matched signature.
    pub signature_hash: Option<SignatureHash>,
    /// The id reserved for the incident that would have been created.
    pub incident_id_blocked: IncidentId,
    /// The snapshot evaluated.
    pub snapshot_hash: SnapshotHash,
    /// When the block happened.
    pub prevented_at: Timestamp,
    /// Written by a simulation, never counted for graduation.
    pub is_simulated: bool,
    /// The hash of the previous record in the chain.
    pub prev_hash: RecordHash,
    /// `SHA-256(domain ‖ 0 ‖ canonical(record without hash))`.
    pub hash: RecordHash,
}

impl PreventionRecord {
    /// The hash this record must carry: over every field but `hash`, `prev_hash` included.
    pub fn compute_hash(&self) -> Result<RecordHash, CanonicalError> {
        let mut value = serde_json::to_value(self)?;
        if let Some(object) = value.as_object_mut() {
            object.remove("hash");
        }
        Ok(RecordHash::from_bytes(&domain_hash(RECORD_DOMAIN, &canonical_json_value(&value)?)))
    }

    /// Links this record after `prev_hash` at position `seq` and seals it with its hash.
    pub fn seal(mut self, seq: u64, prev_hash: RecordHash) -> Result<Self, CanonicalError> {
        self.seq = seq;
        self.prev_hash = prev_hash;
        self.hash = self.compute_hash()?;
        Ok(self)
    }

    /// Whether the stored hash matches the record's content.
    pub fn hash_is_valid(&self) -> bool {
        self.compute_hash().is_ok_and(|h| h == self.hash)
    }
}

/// Where a chain of records stops verifying.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainBreak {
    /// A record's content does not match its hash.
    #[error("record `{id}` (seq {seq}) does not match its hash")]
    HashMismatch {
        /// The record.
        id: RecordId,
        /// Its position.
        seq: u64,
    },
    /// A record does not point at its predecessor.
    #[error("record `{id}` (seq {seq}) does not link to the previous record")]
    BrokenLink {
        /// The record.
        id: RecordId,
        /// Its position.
        seq: u64,
    },
    /// A sequence number is missing or repeated.
    #[error("record `{id}` has seq {found}, expected {expected}")]
    SequenceGap {
        /// The record.
        id: RecordId,
        /// The seq that should have followed.
        expected: u64,
        /// The seq found.
        found: u64,
    },
}

/// Walks records in chain order, reporting the first break. Returns the head hash on success.
pub fn verify_chain<'a>(records: impl IntoIterator<Item = &'a PreventionRecord>) -> Result<RecordHash, ChainBreak> {
    verify_chain_from(RecordHash::genesis(), 1, records)
}

/// Like [`verify_chain`], starting after a known `(prev_hash, next_seq)`.
pub fn verify_chain_from<'a>(
    mut prev: RecordHash,
    mut next_seq: u64,
    records: impl IntoIterator<Item = &'a PreventionRecord>,
) -> Result<RecordHash, ChainBreak> {
    for record in records {
        if record.seq != next_seq {
            return Err(ChainBreak::SequenceGap { id: record.id.clone(), expected: next_seq, found: record.seq });
        }
        if record.prev_hash != prev {
            return Err(ChainBreak::BrokenLink { id: record.id.clone(), seq: record.seq });
        }
        if !record.hash_is_valid() {
            return Err(ChainBreak::HashMismatch { id: record.id.clone(), seq: record.seq });
        }
        prev = record.hash.clone();
        next_seq = next_seq.saturating_add(1);
    }
    Ok(prev)
}
