//! Verification on PostgreSQL: what `verify` checks on sled, over the tables.
//!
//! Every snapshot's text must hash to its key; the records, read in `seq` order, must decode, carry the
//! `seq` of their row, chain (content hash, link and gap-free sequence) and agree with the columns the
//! queries select them by (the analogue of sled's secondary indexes: a row edited in one place and not
//! the other is found). The chain head row must name the last record.

use runguard_contract::record::verify_chain_from;
use runguard_contract::{PreventionRecord, RecordHash, SnapshotHash, SnapshotId};

use super::{PgStore, from_json, i64_of, pg_error, u64_of};
use crate::error::StoreError;
use crate::integrity::{RecordBreak, SnapshotBreak, VerifyReport, verify_snapshot_bytes};

/// Rows read per query while walking a table.
const CHUNK: i64 = 1000;

impl PgStore {
    pub(crate) fn verify(&self) -> Result<VerifyReport, StoreError> {
        super::off_runtime(|| self.verify_off_runtime())
    }

    fn verify_off_runtime(&self) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport::default();
        let mut conn = self.live()?;
        let mut after = String::new();
        'snapshots: loop {
            let rows = conn
                .query(
                    "SELECT hash, canonical FROM snapshots WHERE hash > $1 ORDER BY hash LIMIT $2",
                    &[&after, &CHUNK],
                )
                .map_err(|err| pg_error("cannot read snapshots", err))?;
            for row in &rows {
                let key: String = row.try_get(0).map_err(|err| pg_error("cannot read snapshots", err))?;
                let canonical: String = row.try_get(1).map_err(|err| pg_error("cannot read snapshots", err))?;
                report.snapshots_checked += 1;
                let hash =
                    SnapshotHash::new(key.clone()).map_err(|_| StoreError::corrupt("a snapshot key is not a hash"))?;
                if let Err(problem) = verify_snapshot_bytes(&hash, canonical.as_bytes()) {
                    report.snapshot_break = Some(SnapshotBreak { id: SnapshotId::for_hash(&hash), problem });
                    break 'snapshots;
                }
                after = key;
            }
            if i64::try_from(rows.len()).unwrap_or(0) < CHUNK {
                break;
            }
        }
        let mut prev = RecordHash::genesis();
        let mut next_seq = 1u64;
        'records: loop {
            let rows = conn
                .query(
                    "SELECT seq, record_id, tenant_id, run_id, policy_id, is_simulated, prevented_at_ms, hash, body
                     FROM records WHERE seq >= $1 ORDER BY seq LIMIT $2",
                    &[&i64_of(next_seq)?, &CHUNK],
                )
                .map_err(|err| pg_error("cannot read records", err))?;
            for row in &rows {
                let read = |err| pg_error("cannot read records", err);
                let key_seq = u64_of(row.try_get(0).map_err(read)?).unwrap_or(0);
                let record: PreventionRecord = match from_json("prevention record", row.try_get(8).map_err(read)?) {
                    Ok(record) => record,
                    Err(err) => {
                        report.record_break =
                            Some(RecordBreak::Undecodable { seq: key_seq, reason: err.message().to_owned() });
                        break 'records;
                    }
                };
                if record.seq != key_seq {
                    report.record_break =
                        Some(RecordBreak::KeyMismatch { id: record.id, key: key_seq, found: record.seq });
                    break 'records;
                }
                match verify_chain_from(prev.clone(), next_seq, std::iter::once(&record)) {
                    Ok(hash) => prev = hash,
                    Err(chain) => {
                        report.record_break = Some(RecordBreak::Chain(chain));
                        break 'records;
                    }
                }
                if let Some(index) = column_mismatch(row, &record)? {
                    report.record_break = Some(RecordBreak::IndexMissing { id: record.id, seq: record.seq, index });
                    break 'records;
                }
                report.records_checked += 1;
                next_seq = next_seq.saturating_add(1);
            }
            if i64::try_from(rows.len()).unwrap_or(0) < CHUNK {
                break;
            }
        }
        if report.record_break.is_none() {
            let row = conn
                .query_one("SELECT head_seq, head_hash FROM runguard_chain", &[])
                .map_err(|err| pg_error("cannot read the chain head", err))?;
            let head_seq = u64_of(row.try_get(0).map_err(|err| pg_error("cannot read the chain head", err))?)?;
            let head_hash: String = row.try_get(1).map_err(|err| pg_error("cannot read the chain head", err))?;
            if head_seq != report.records_checked || head_hash != prev.as_str() {
                report.lost = Some(format!(
                    "the chain head names record {head_seq} (hash `{head_hash}`), but the records end at seq {} \
                     (hash `{prev}`)",
                    report.records_checked
                ));
            }
        }
        Ok(report)
    }
}

/// The first column of a record's row that disagrees with the record itself.
fn column_mismatch(row: &postgres::Row, record: &PreventionRecord) -> Result<Option<&'static str>, StoreError> {
    let text =
        |i: usize| -> Result<String, StoreError> { row.try_get(i).map_err(|err| pg_error("cannot read records", err)) };
    let simulated: bool = row.try_get(5).map_err(|err| pg_error("cannot read records", err))?;
    let at: i64 = row.try_get(6).map_err(|err| pg_error("cannot read records", err))?;
    Ok(if text(1)? != record.id.as_str() {
        Some("records.record_id")
    } else if text(2)? != record.tenant_id.as_str() {
        Some("records.tenant_id")
    } else if text(3)? != record.run_id.as_str() {
        Some("records.run_id")
    } else if text(4)? != record.policy_id.as_str() {
        Some("records.policy_id")
    } else if simulated != record.is_simulated {
        Some("records.is_simulated")
    } else if at != record.prevented_at.unix_millis() {
        Some("records.prevented_at_ms")
    } else if text(7)? != record.hash.as_str() {
        Some("records.hash")
    } else {
        None
    })
}
