//! What the writer remembers of the runs it wrote recently, so that a commit does not read them back.
//!
//! Every step call of a run appends a ledger entry and rewrites the run. Checking that batch needs the
//! run's snapshot binding (a read and decode of the stored run), its next ledger position (a reverse scan
//! of its ledger) and whether it is listed as live. The cache holds those three for recently written runs.
//! It is filled only from commits that succeeded, under the writer lock, so it always agrees with the
//! store; a miss falls back to reading the store. It is bounded by two generations: when the current one
//! is full it becomes the previous one (the one before is dropped), so the runs written most recently
//! are kept, and a run found in the previous generation moves back into the current one.

use std::collections::HashMap;

use runguard_contract::SnapshotHash;

/// Runs per generation; at most twice as many are remembered (a few megabytes).
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
    current: HashMap<Vec<u8>, CachedRun>,
    previous: HashMap<Vec<u8>, CachedRun>,
}

impl RunCache {
    /// What is known of the run with `key`.
    pub(crate) fn get(&self, key: &[u8]) -> Option<&CachedRun> {
        self.current.get(key).or_else(|| self.previous.get(key))
    }

    /// Merges what a successful commit established about the run with `key`.
    pub(crate) fn learn(&mut self, key: Vec<u8>, learned: CachedRun) {
        let mut known = match self.current.remove(&key) {
            Some(known) => known,
            None => self.previous.remove(&key).unwrap_or_default(),
        };
        if self.current.len() >= CAPACITY {
            self.previous = std::mem::take(&mut self.current);
        }
        if learned.snapshot.is_some() {
            known.snapshot = learned.snapshot;
        }
        if learned.next_position.is_some() {
            known.next_position = learned.next_position;
        }
        if learned.live.is_some() {
            known.live = learned.live;
        }
        self.current.insert(key, known);
    }

    /// How many runs are remembered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.current.len() + self.previous.len()
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
        for i in 0..3 * CAPACITY {
            cache.learn(i.to_be_bytes().to_vec(), CachedRun { live: Some(false), ..CachedRun::default() });
        }
        assert!(cache.len() <= 2 * CAPACITY);
        let newest = (3 * CAPACITY - 1).to_be_bytes();
        let within = (2 * CAPACITY).to_be_bytes();
        assert!(cache.get(&newest).is_some() && cache.get(&within).is_some(), "the most recent runs are kept");
        assert!(cache.get(&0usize.to_be_bytes()).is_none(), "the oldest are dropped");
    }
}
