//! The acknowledgement watermark: what the store had acknowledged, kept outside sled.
//!
//! sled recovers a damaged log by stopping at the first bad segment and treating everything after it as
//! never written, silently. To notice, the store keeps a commit counter inside sled (bumped by every
//! commit, in the commit's own transaction) and this small file beside it, rewritten atomically and
//! fsynced after durable commits (at most about once a second, and at a graceful stop). On open, a store
//! whose counter or record chain is behind the file recovered to an earlier state than it acknowledged.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use runguard_contract::RecordHash;
use runguard_contract::canonical::domain_hash;
use serde::{Deserialize, Serialize};

use crate::error::StoreError;

/// The file's name inside the data directory.
pub const WATERMARK_FILE: &str = "runguard.ack";
const TEMP_FILE: &str = "runguard.ack.tmp";
const DOMAIN: &str = "runguard-ack-v1";

/// What had been made durable and acknowledged when the file was written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    /// Commits made durable so far (the store's own counter at that time).
    pub commits: u64,
    /// The sequence number of the last prevention record (0: none).
    pub record_seq: u64,
    /// Its hash (the genesis hash when there is none).
    pub record_hash: RecordHash,
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    #[serde(flatten)]
    mark: Watermark,
    /// Hex SHA-256 over the other fields, so that a damaged file is noticed rather than believed.
    check: String,
}

fn checksum(mark: &Watermark) -> Result<String, StoreError> {
    let body = serde_json::to_vec(mark).map_err(|err| StoreError::corrupt(format!("cannot encode: {err}")))?;
    Ok(hex::encode(domain_hash(DOMAIN, &body)))
}

fn path(dir: &Path) -> PathBuf {
    dir.join(WATERMARK_FILE)
}

/// Reads the watermark of the store in `dir`: `None` when there is no file; an error when it is damaged.
pub fn read(dir: &Path) -> Result<Option<Watermark>, StoreError> {
    let bytes = match fs::read(path(dir)) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(StoreError::io(format!("cannot read `{WATERMARK_FILE}`"), err)),
    };
    let damaged = |why: String| StoreError::corrupt(format!("the acknowledgement file `{WATERMARK_FILE}` {why}"));
    let on_disk: OnDisk = serde_json::from_slice(&bytes).map_err(|err| damaged(format!("is unreadable: {err}")))?;
    if checksum(&on_disk.mark)? != on_disk.check {
        return Err(damaged("does not match its checksum".to_owned()));
    }
    Ok(Some(on_disk.mark))
}

/// Replaces the watermark atomically: written to a temporary file, fsynced, renamed over the old one, and
/// the directory fsynced, so that a crash leaves either the old or the new file, never a torn one.
pub fn write(dir: &Path, mark: &Watermark) -> Result<(), StoreError> {
    let on_disk = OnDisk { mark: mark.clone(), check: checksum(mark)? };
    let bytes = serde_json::to_vec(&on_disk).map_err(|err| StoreError::corrupt(format!("cannot encode: {err}")))?;
    let temp = dir.join(TEMP_FILE);
    let failed = |err: std::io::Error| StoreError::io(format!("cannot write `{WATERMARK_FILE}`"), err);
    {
        let mut file = File::create(&temp).map_err(failed)?;
        file.write_all(&bytes).map_err(failed)?;
        file.sync_all().map_err(failed)?;
    }
    fs::rename(&temp, path(dir)).map_err(failed)?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(failed)?;
    Ok(())
}
