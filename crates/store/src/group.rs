//! What both backends' group commit share: the test switches (injected failures and delay), readiness,
//! the policy generation, and the frame around one attempt — an empty group touches nothing, the
//! injected delay, health from the attempt's outcome, the policy generation bumped after any attempt
//! that wrote policy versions, and one result per batch (a caller's own refusal stands whatever happened
//! to the others).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::batch::{CommitReceipt, WriteBatch, WriteOp};
use crate::error::{StoreError, StoreErrorKind};

/// What one caller's batch of a group commit got.
pub(crate) type Outcome = Result<CommitReceipt, StoreError>;

/// A backend's commit switches and signals.
#[derive(Debug)]
pub(crate) struct CommitSignals {
    /// Whether the latest commit attempt (or readiness probe) could write.
    healthy: AtomicBool,
    inject_failure: AtomicBool,
    inject_durability_failure: AtomicBool,
    commit_delay_ms: AtomicU64,
    policy_generation: AtomicU64,
}

impl Default for CommitSignals {
    fn default() -> Self {
        Self {
            healthy: AtomicBool::new(true),
            inject_failure: AtomicBool::new(false),
            inject_durability_failure: AtomicBool::new(false),
            commit_delay_ms: AtomicU64::new(0),
            policy_generation: AtomicU64::new(0),
        }
    }
}

impl CommitSignals {
    pub(crate) fn inject_commit_failure(&self, fail: bool) {
        self.inject_failure.store(fail, Ordering::SeqCst);
    }

    pub(crate) fn inject_durability_failure(&self, fail: bool) {
        self.inject_durability_failure.store(fail, Ordering::SeqCst);
    }

    pub(crate) fn inject_commit_delay(&self, delay: Duration) {
        self.commit_delay_ms.store(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    pub(crate) fn commit_failure_injected(&self) -> bool {
        self.inject_failure.load(Ordering::SeqCst)
    }

    pub(crate) fn durability_failure_injected(&self) -> bool {
        self.inject_durability_failure.load(Ordering::SeqCst)
    }

    /// The error of an injected commit failure.
    pub(crate) fn injected() -> StoreError {
        StoreError::new(StoreErrorKind::Injected, "commit failure injected by a test")
    }

    pub(crate) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    pub(crate) fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::SeqCst);
    }

    pub(crate) fn policy_generation(&self) -> u64 {
        self.policy_generation.load(Ordering::Acquire)
    }

    /// Makes the policy generation change without a commit (a backend that could not read its own part).
    pub(crate) fn bump_policy_generation(&self) {
        self.policy_generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Runs one group commit: `lock` takes the backend's writer, `attempt` fills `outcomes` for the
    /// batches it refused and, on success, for the ones it committed (an `Err` answers every batch left
    /// without an outcome), and `after_io` runs under the writer when the store could not write.
    pub(crate) fn group<W>(
        &self,
        batches: &[WriteBatch],
        lock: impl FnOnce() -> W,
        attempt: impl FnOnce(&mut W, &mut [Option<Outcome>]) -> Result<(), StoreError>,
        after_io: impl FnOnce(&mut W),
    ) -> Vec<Outcome> {
        if batches.is_empty() {
            // Not even the writer lock: an attempt that writes nothing must not report the store healthy.
            return Vec::new();
        }
        let mut outcomes: Vec<Option<Outcome>> = batches.iter().map(|_| None).collect();
        let writes_policies =
            batches.iter().any(|b| b.ops().iter().any(|op| matches!(op, WriteOp::PutPolicyVersion(_))));
        let mut writer = lock();
        let delay = self.commit_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        let result = attempt(&mut writer, &mut outcomes);
        match &result {
            Ok(()) => self.set_healthy(true),
            Err(err) if matches!(err.kind(), StoreErrorKind::Io | StoreErrorKind::Injected) => {
                if err.kind() == StoreErrorKind::Io {
                    after_io(&mut writer);
                }
                self.set_healthy(false);
            }
            Err(_) => {}
        }
        drop(writer);
        if writes_policies {
            self.policy_generation.fetch_add(1, Ordering::AcqRel);
        }
        outcomes
            .into_iter()
            .map(|outcome| match (outcome, &result) {
                (Some(outcome), Ok(())) => outcome,
                // A refusal stands whatever happened to the others.
                (Some(Err(refused)), Err(_)) => Err(refused),
                (Some(Ok(_)) | None, Err(err)) => Err(err.clone()),
                (None, Ok(())) => Ok(CommitReceipt::default()),
            })
            .collect()
    }
}

/// One batch as a group of one (an empty batch commits nothing and succeeds).
pub(crate) fn single(batch: WriteBatch, group: impl FnOnce(Vec<WriteBatch>) -> Vec<Outcome>) -> Outcome {
    if batch.is_empty() {
        return Ok(CommitReceipt::default());
    }
    group(vec![batch]).pop().unwrap_or_else(|| Ok(CommitReceipt::default()))
}
