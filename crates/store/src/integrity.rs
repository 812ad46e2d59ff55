//! What loading and verifying report when stored data does not verify.

use runguard_contract::canonical::{SNAPSHOT_DOMAIN, domain_hash};
use runguard_contract::{ChainBreak, RecordId, Snapshot, SnapshotHash, SnapshotId};

use crate::model::{LedgerCall, LedgerEntry, StoredRun};

/// Why stored data of a run cannot be trusted. The node fails closed on any of these: the run's decisions
/// become `block` with violation type `integrity`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IntegrityError {
    /// The snapshot is not stored.
    #[error("snapshot `{hash}` is missing")]
    SnapshotMissing {
        /// The hash the run is bound to.
        hash: SnapshotHash,
    },
    /// The stored snapshot does not decode.
    #[error("snapshot `{hash}` does not decode: {reason}")]
    SnapshotUndecodable {
        /// The expected hash.
        hash: SnapshotHash,
        /// The decoder's complaint.
        reason: String,
    },
    /// The stored bytes hash to something else.
    #[error("snapshot `{expected}` hashes to `{actual}`")]
    SnapshotHashMismatch {
        /// The hash the run is bound to (and the key it is stored under).
        expected: SnapshotHash,
        /// The hash of the stored bytes.
        actual: SnapshotHash,
    },
    /// A ledger entry does not decode.
    #[error("ledger entry {position} does not decode: {reason}")]
    LedgerUndecodable {
        /// Its position.
        position: u64,
        /// The decoder's complaint.
        reason: String,
    },
    /// The ledger does not add up to the stored totals.
    #[error("ledger and totals disagree: {reason}")]
    TotalsMismatch {
        /// Where they disagree.
        reason: String,
    },
}

/// A stored snapshot as `GET /v1/snapshots/{id}` shows it: its hash and the verified snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredSnapshot {
    /// The hash it is stored under.
    pub hash: SnapshotHash,
    /// The snapshot, or why it does not verify.
    pub snapshot: Result<Snapshot, IntegrityError>,
}

/// A run as loaded for rehydration, with the outcome of every integrity check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadedRun {
    /// The stored run.
    pub run: StoredRun,
    /// Its snapshot, re-verified against the bound hash.
    pub snapshot: Result<Snapshot, IntegrityError>,
    /// Every decodable ledger entry, in order.
    pub ledger: Vec<LedgerEntry>,
    /// Whether the ledger decodes completely and adds up to the stored totals.
    pub totals_consistent: bool,
    /// The ledger problem, when `totals_consistent` is false.
    pub ledger_problem: Option<IntegrityError>,
}

impl LoadedRun {
    /// A loaded run from its stored row and its ledger, read once: a running run's row is caught up from
    /// that ledger (`StoredRun::catch_up`) before anything is checked, so that the two cannot disagree
    /// because a commit fell between two reads. The ledger read stopped at `undecodable` (if it did); a
    /// ledger read whole is checked against the run's totals.
    pub(crate) fn checked(
        mut run: StoredRun,
        snapshot: Result<Snapshot, IntegrityError>,
        ledger: Vec<LedgerEntry>,
        undecodable: Option<IntegrityError>,
    ) -> Self {
        run.catch_up_from(ledger.iter().rev());
        let problem = undecodable.or_else(|| check_ledger_totals(&run, &ledger).err());
        Self { run, snapshot, ledger, totals_consistent: problem.is_none(), ledger_problem: problem }
    }

    /// Whether every check passed; when false the node marks the run `integrity_failure`.
    pub fn is_intact(&self) -> bool {
        self.snapshot.is_ok() && self.totals_consistent
    }
}

/// The first break in the record chain.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordBreak {
    /// The stored value does not decode.
    #[error("record at seq {seq} does not decode: {reason}")]
    Undecodable {
        /// The key's sequence number.
        seq: u64,
        /// The decoder's complaint.
        reason: String,
    },
    /// The record is stored under another sequence number than it carries.
    #[error("record `{id}` carries seq {found} but is stored at seq {key}")]
    KeyMismatch {
        /// The record.
        id: RecordId,
        /// The key's sequence number.
        key: u64,
        /// The record's own.
        found: u64,
    },
    /// The chain itself breaks (content, link or sequence).
    #[error(transparent)]
    Chain(ChainBreak),
    /// A secondary index lacks the record.
    #[error("record `{id}` (seq {seq}) is missing from index `{index}`")]
    IndexMissing {
        /// The record.
        id: RecordId,
        /// Its position.
        seq: u64,
        /// The index.
        index: &'static str,
    },
}

/// The first snapshot that does not verify.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("snapshot `{id}`: {problem}")]
pub struct SnapshotBreak {
    /// The snapshot's id.
    pub id: SnapshotId,
    /// What failed.
    pub problem: IntegrityError,
}

/// What [`Store::verify`](crate::Store::verify) found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Snapshots checked.
    pub snapshots_checked: u64,
    /// Records checked (up to the first break).
    pub records_checked: u64,
    /// The first snapshot that does not verify, in key order.
    pub snapshot_break: Option<SnapshotBreak>,
    /// The first break of the record chain.
    pub record_break: Option<RecordBreak>,
    /// What is missing or unreadable as a whole: the store recovered to an earlier state than its
    /// acknowledgement watermark records, or cannot be opened at all (only [`Store::verify_dir`] sets it).
    ///
    /// [`Store::verify_dir`]: crate::Store::verify_dir
    pub lost: Option<String>,
}

impl VerifyReport {
    /// Whether everything verified.
    pub fn is_ok(&self) -> bool {
        self.snapshot_break.is_none() && self.record_break.is_none() && self.lost.is_none()
    }
}

/// Checks a snapshot's stored canonical bytes against the hash it is stored under and decodes it: the
/// check every backend makes on every load.
pub(crate) fn verify_snapshot_bytes(hash: &SnapshotHash, bytes: &[u8]) -> Result<Snapshot, IntegrityError> {
    let undecodable = |reason: String| IntegrityError::SnapshotUndecodable { hash: hash.clone(), reason };
    let actual = SnapshotHash::from_bytes(&domain_hash(SNAPSHOT_DOMAIN, bytes));
    if &actual != hash {
        return Err(IntegrityError::SnapshotHashMismatch { expected: hash.clone(), actual });
    }
    let snapshot: Snapshot = serde_json::from_slice(bytes).map_err(|err| undecodable(err.to_string()))?;
    if !snapshot.verify(hash) {
        return Err(undecodable("the decoded snapshot does not re-encode to its hash".to_owned()));
    }
    Ok(snapshot)
}

/// Checks a run's ledger against its stored totals: the totals after the last entry are the run's, each
/// post adds exactly its usage (a throttled call adds nothing), and steps grow by at most one per post.
pub(crate) fn check_ledger_totals(run: &StoredRun, ledger: &[LedgerEntry]) -> Result<(), IntegrityError> {
    let mismatch = |reason: String| Err(IntegrityError::TotalsMismatch { reason });
    let mut before = runguard_contract::Totals::default();
    for (i, entry) in ledger.iter().enumerate() {
        let expected_position = u64::try_from(i).unwrap_or(u64::MAX);
        if entry.position != expected_position {
            return mismatch(format!("entry {i} carries position {}", entry.position));
        }
        let after = entry.totals_after;
        let throttled = entry.decision.action == runguard_contract::Action::Throttle;
        let (usage, is_post) = match &entry.call {
            LedgerCall::Step(call) if call.phase == runguard_contract::Phase::Post => {
                (call.usage.unwrap_or_default(), true)
            }
            _ => (runguard_contract::Usage::default(), false),
        };
        let (add_tokens, add_cost, add_ms) =
            if is_post && !throttled { (usage.tokens, usage.cost_micros, usage.duration_ms) } else { (0, 0, 0) };
        let steps_delta = after.steps.checked_sub(before.steps);
        let consistent = after.tokens == before.tokens.saturating_add(add_tokens)
            && after.cost_micros == before.cost_micros.saturating_add(add_cost)
            && after.duration_ms == before.duration_ms.saturating_add(add_ms)
            && match steps_delta {
                Some(0) => true,
                Some(1) => is_post && !throttled,
                _ => false,
            };
        if !consistent {
            return mismatch(format!("entry {i} moves totals from {before:?} to {after:?}"));
        }
        before = after;
    }
    if before != run.totals {
        return mismatch(format!("the ledger sums to {before:?}, the run stores {:?}", run.totals));
    }
    Ok(())
}
