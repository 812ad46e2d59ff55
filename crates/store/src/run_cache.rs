//! What the writer remembers of the runs it wrote recently, so that a commit does not read them back.
//!
//! Every step call of a run appends a ledger entry and rewrites the run. Checking that batch needs the
//! run's snapshot binding (a read and decode of the stored run), its next ledger position (a reverse scan
//! of its ledger) and whether it is listed as live. The cache holds those three for recently written runs.
//! It is filled only from commits that succeeded, under the writer lock, so it always agrees with the
//! store; a miss falls back to reading the store. It is bounded: when full it starts over.

use std::collections::HashMap;

use runguard_contract::SnapshotHash;

/// Runs remembered at most (a few megabytes; the runs in flight on a busy node are far fewer).
const CAPACITY: usize = 16_384;

/// What is known of one run, each part only once a commit established it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct CachedRun {
    /// The snapshot the run is bound to (a binding never changes, and snapshots are never deleted).
    pub(crate) snapshot: Option<SnapshotHash>,
    /// The position its next ledger entry takes.
    pub(crate) next_position: Option<u64>,
    /// Whether it is listed in the live-runs tree.
    pub(crate) live: Option<bool>,
}

/// The cache, keyed by the run key (`tenant\0 run\0`).
#[derive(Debug, Default)]
pub(crate) struct RunCache {
    runs: HashMap<Vec<u8>, CachedRun>,
}

impl RunCache {
    /// What is known of the run with `key`.
    pub(crate) fn get(&self, key: &[u8]) -> Option<&CachedRun> {
        self.runs.get(key)
    }

    /// Merges what a successful commit established about the run with `key`.
    pub(crate) fn learn(&mut self, key: Vec<u8>, learned: CachedRun) {
        if self.runs.len() >= CAPACITY && !self.runs.contains_key(&key) {
            self.runs.clear();
        }
        let known = self.runs.entry(key).or_default();
        if learned.snapshot.is_some() {
            known.snapshot = learned.snapshot;
        }
        if learned.next_position.is_some() {
            known.next_position = learned.next_position;
        }
        if learned.live.is_some() {
            known.live = learned.live;
        }
    }

    /// How many runs are remembered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.runs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learning_merges_parts_and_the_cache_stays_bounded() {
        let mut cache = RunCache::default();
        let hash = SnapshotHash::from_bytes(&[7; 32]);
        cache.learn(b"a".to_vec(), CachedRun { snapshot: Some(hash.clone()), ..CachedRun::default() });
        cache.learn(b"a".to_vec(), CachedRun { next_position: Some(3), live: Some(true), ..CachedRun::default() });
        assert_eq!(
            cache.get(b"a"),
            Some(&CachedRun { snapshot: Some(hash), next_position: Some(3), live: Some(true) })
        );
        for i in 0..CAPACITY + 10 {
            cache.learn(i.to_be_bytes().to_vec(), CachedRun { live: Some(false), ..CachedRun::default() });
        }
        assert!(cache.len() <= CAPACITY);
    }
}
