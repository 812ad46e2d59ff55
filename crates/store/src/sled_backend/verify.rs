//! Verification: walking snapshots and the record chain, and the integrity checks loads share.

use std::path::Path;

use runguard_contract::record::verify_chain_from;
use runguard_contract::{PreventionRecord, RecordHash, Snapshot, SnapshotHash, SnapshotId};

use super::commit::record_index_keys;
use super::{Acknowledged, Store, StoreOptions, T, TREE_NAMES};
use crate::codec::{self, Stored};
use crate::error::{StoreError, StoreErrorKind};
use crate::integrity::{IntegrityError, RecordBreak, SnapshotBreak, VerifyReport};
use crate::keys;

impl Store {
    /// Verifies the store in `dir` without changing it: the directory is copied (under sled's lock, so
    /// that no node writes it meanwhile) into a temporary directory beside nothing else, and the copy is
    /// opened and walked. Finds a store behind its acknowledgement watermark, a store too damaged to open
    /// (both reported in [`VerifyReport::lost`]), and every break [`Store::verify`] finds.
    ///
    /// Errors only when the directory cannot be read or copied, or another process holds the store.
    pub fn verify_dir(dir: impl AsRef<Path>, options: &StoreOptions) -> Result<VerifyReport, StoreError> {
        let dir = dir.as_ref();
        let copy = crate::offline::locked_copy(dir)?;
        let opened = std::panic::catch_unwind(|| Self::open_with(copy.path(), dir, options, Acknowledged::Report));
        let store = match opened {
            Ok(Ok(store)) => store,
            Ok(Err(err)) if err.kind() == StoreErrorKind::Io && crate::offline::is_lock_error(&err) => return Err(err),
            Ok(Err(err)) => {
                // Name the original, not the copy.
                let why = err.to_string().replace(&copy.path().display().to_string(), &dir.display().to_string());
                return Ok(VerifyReport {
                    lost: Some(format!("the store cannot be opened: {why}")),
                    ..Default::default()
                });
            }
            Err(_) => {
                return Ok(VerifyReport {
                    lost: Some("the store cannot be opened: the database engine panicked on its files".to_owned()),
                    ..Default::default()
                });
            }
        };
        let mut report = store.verify().unwrap_or_else(|err| VerifyReport {
            lost: Some(format!("the store cannot be read: {err}")),
            ..VerifyReport::default()
        });
        report.lost = report.lost.or_else(|| store.lost.clone());
        Ok(report)
    }

    // ---- verification -----------------------------------------------------------------------------

    /// Walks every snapshot and the whole record chain (with its indexes) and reports the first break of
    /// each. Used by `runguard verify`; reads only.
    pub fn verify(&self) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport::default();
        for item in self.tree(T::Snapshots)?.iter() {
            let (key, value) = item?;
            report.snapshots_checked += 1;
            let hex_key = hex::encode(&key);
            let hash =
                SnapshotHash::new(hex_key.clone()).map_err(|_| StoreError::corrupt("a snapshot key is not a hash"))?;
            if let Err(problem) = verify_snapshot(&hash, &value) {
                report.snapshot_break = Some(SnapshotBreak { id: SnapshotId::for_hash(&hash), problem });
                break;
            }
        }
        let mut prev = RecordHash::genesis();
        let mut next_seq = 1u64;
        for item in self.tree(T::Records)?.iter() {
            let (key, value) = item?;
            let key_seq = keys::trailing_u64(&key).unwrap_or(0);
            let record = match PreventionRecord::decode(&value) {
                Ok(record) => record,
                Err(err) => {
                    report.record_break =
                        Some(RecordBreak::Undecodable { seq: key_seq, reason: err.message().to_owned() });
                    break;
                }
            };
            if record.seq != key_seq {
                report.record_break = Some(RecordBreak::KeyMismatch { id: record.id, key: key_seq, found: record.seq });
                break;
            }
            match verify_chain_from(prev.clone(), next_seq, std::iter::once(&record)) {
                Ok(hash) => prev = hash,
                Err(chain) => {
                    report.record_break = Some(RecordBreak::Chain(chain));
                    break;
                }
            }
            if let Some(index) = self.missing_index(&record)? {
                report.record_break = Some(RecordBreak::IndexMissing { id: record.id, seq: record.seq, index });
                break;
            }
            report.records_checked += 1;
            next_seq = next_seq.saturating_add(1);
        }
        Ok(report)
    }

    pub(super) fn missing_index(&self, r: &PreventionRecord) -> Result<Option<&'static str>, StoreError> {
        for (t, key) in record_index_keys(r) {
            if !self.tree(t)?.contains_key(key)? {
                return Ok(Some(TREE_NAMES[t as usize]));
            }
        }
        Ok(None)
    }
}

pub(super) fn verify_snapshot(hash: &SnapshotHash, value: &[u8]) -> Result<Snapshot, IntegrityError> {
    let undecodable = |reason: String| IntegrityError::SnapshotUndecodable { hash: hash.clone(), reason };
    let bytes = codec::decode_raw("snapshot", value).map_err(|err| undecodable(err.message().to_owned()))?;
    crate::integrity::verify_snapshot_bytes(hash, bytes)
}
