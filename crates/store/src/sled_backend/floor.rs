//! sled with nothing of the store around it: the floor under what a durable commit on sled can cost.
//!
//! [`SledFloor`] appends opaque values under increasing keys of one tree and makes each group durable the
//! way the store does (sled's flush, then `fdatasync` of its file), without checks, encodings, indexes
//! or a transaction. The load generator's sled baseline answers HTTP requests through it, so that the
//! node's figures can be read against what sled alone allows on the same machine
//! (`docs/performance.md`). Only built with the `floor` feature; the node never uses it.

use std::fs::File;
use std::path::Path;

use crate::error::StoreError;

/// One sled tree written in groups: see the module documentation.
#[derive(Debug)]
pub struct SledFloor {
    db: sled::Db,
    tree: sled::Tree,
    file: File,
    next: u64,
}

impl SledFloor {
    /// Opens (or creates) the database in `dir` with the store's page-cache budget.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let options = super::StoreOptions::default();
        let db = sled::Config::new().path(dir).cache_capacity(options.cache_capacity_bytes).open()?;
        let tree = db.open_tree("floor")?;
        let file = File::open(dir.join("db")).map_err(|err| StoreError::io("cannot open the database file", err))?;
        Ok(Self { db, tree, file, next: 0 })
    }

    /// Writes each of `values` under `copies` new keys in one batch, then makes the batch durable.
    pub fn append<'a>(&mut self, values: impl IntoIterator<Item = &'a [u8]>, copies: u64) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for value in values {
            for _ in 0..copies {
                self.next += 1;
                batch.insert(&self.next.to_be_bytes(), value);
            }
        }
        self.tree.apply_batch(batch)?;
        self.db.flush()?;
        self.file.sync_data().map_err(|err| StoreError::io("fsync of the database file failed", err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_copy_of_every_value_is_there_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut floor = SledFloor::open(dir.path()).unwrap();
        floor.append([&b"one"[..], &b"two"[..]], 3).unwrap();
        drop(floor);
        let floor = SledFloor::open(dir.path()).unwrap();
        let values: Vec<Vec<u8>> = floor.tree.iter().values().map(|v| v.unwrap().to_vec()).collect();
        assert_eq!(
            values,
            [&b"one"[..]; 3].into_iter().chain([&b"two"[..]; 3]).map(<[u8]>::to_vec).collect::<Vec<_>>()
        );
    }
}
