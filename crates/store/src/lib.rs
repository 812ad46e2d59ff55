//! # runguard-store
//!
//! The persistence of runguard: policies with every version and their activation audit,
//! content-addressed snapshots (verified on every load), runs and their ledgers, the hash-chained
//! prevention records with their tenant-scoped indexes, shadow statistics, and the learning loop
//! (incidents, patterns, regrets, graduation). Two backends sit behind the one [`Store`] facade:
//! embedded sled ([`Store::open`], the default) and PostgreSQL ([`Store::open_postgres`]). This is the only
//! crate that names sled, bincode or the PostgreSQL client, each only inside its backend's module.
//!
//! All writes go through [`Store::commit_group`] (a group of callers, one result each) or [`Store::commit`]
//! (a group of one): each caller's [`WriteBatch`] is checked (records against the prevention contract,
//! policy versions against the current one) against the state the earlier callers leave, and the accepted
//! ones are written in one transaction (sled: one multi-tree transaction, flushed and fsynced; PostgreSQL:
//! one transaction with a savepoint per caller). A refused batch fails only its caller; nothing of a
//! failed batch is written. On sled, a commit counter inside the database and a watermark file beside it
//! let [`Store::open`] refuse a store that recovered to an earlier state than it acknowledged.
//!
//! ```
//! use runguard_store::{Store, StoreOptions, WriteBatch, PageRequest};
//! use runguard_contract::{Snapshot, TenantId};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
//! let snapshot = Snapshot::capture(&TenantId::new("acme").unwrap(), []);
//! let hash = snapshot.hash().unwrap();
//!
//! let mut batch = WriteBatch::new();
//! batch.put_snapshot(snapshot.clone());
//! store.commit(batch).unwrap();
//!
//! assert_eq!(store.load_snapshot(&hash).unwrap(), snapshot);
//! assert!(store.verify().unwrap().is_ok());
//! let runs = store.list_runs(&TenantId::new("acme").unwrap(), &PageRequest::first(10)).unwrap();
//! assert!(runs.items.is_empty() && runs.next_cursor.is_none());
//! ```
//!
//! See `docs/store.md` for the seam, the sled trees and key layout, the PostgreSQL schema and recovery.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[cfg(test)]
extern crate self as runguard_store;
#[cfg(test)]
#[path = "../tests/it/fixtures.rs"]
mod fixtures;
/// The stores unit tests start from.
#[cfg(test)]
mod test_stores {
    /// A fresh sled store in a temporary directory, without fsync (the tests do not lose power).
    pub(crate) fn fresh() -> (tempfile::TempDir, crate::Store) {
        let dir = tempfile::tempdir().unwrap();
        let options = crate::StoreOptions { fsync: false, ..crate::StoreOptions::default() };
        let store = crate::Store::open(dir.path(), &options).unwrap();
        (dir, store)
    }

    /// A store on a fresh database of a private PostgreSQL server; `None` where PostgreSQL is not
    /// installed.
    pub(crate) fn fresh_postgres() -> Option<crate::Store> {
        let db = runguard_testpg::fresh_database()?;
        Some(crate::Store::open_postgres(&db.url, &crate::PgOptions::default()).unwrap())
    }
}
/// A test run once on a fresh sled store and once on a fresh PostgreSQL database (skipped, with a
/// message, where PostgreSQL is not installed): `name::sled` and `name::postgres`.
#[cfg(test)]
macro_rules! on_both_backends {
    (fn $name:ident($store:ident) $body:block) => {
        mod $name {
            #[allow(unused_imports, reason = "each test uses a different subset")]
            use super::*;

            #[test]
            fn sled() {
                let (_dir, $store) = crate::test_stores::fresh();
                $body
            }

            #[test]
            fn postgres() {
                let Some($store) = crate::test_stores::fresh_postgres() else { return };
                $body
            }
        }
    };
}
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_cluster;
#[cfg(test)]
mod tests_durability;

mod backend;
mod batch;
mod cluster_lock;
pub mod codec;
mod error;
mod group;
mod integrity;
mod keys;
mod legacy;
mod model;
mod offline;
mod postgres;
mod prepare;
mod query;
mod run_cache;
mod sled_backend;
mod watermark;

pub use backend::Store;
pub use batch::{
    CommitReceipt, RateBound, RecordAppend, RecordAuthority, TenantRateEvent, TenantRateUse, WriteBatch, WriteOp,
};
pub use cluster_lock::ClusterLock;
pub use error::{StoreError, StoreErrorKind};
pub use integrity::{IntegrityError, LoadedRun, RecordBreak, SnapshotBreak, StoredSnapshot, VerifyReport};
pub use model::{
    GraduationGates, GraduationState, LedgerCall, LedgerEntry, RunRollup, RunStart, ShadowStats, StoredRun,
};
pub use postgres::{
    PG_SCHEMA_VERSION, PgOptions, check_url as check_postgres_url, migrate, on_blocking_thread,
    redact as redact_postgres_url,
};
pub use query::{DEFAULT_PAGE_LIMIT, MAX_PAGE_LIMIT, Page, PageRequest, RecordQuery, all_pages};
#[cfg(feature = "floor")]
pub use sled_backend::SledFloor;
pub use sled_backend::{SCHEMA_VERSION, StoreOptions};
pub use watermark::WATERMARK_FILE;
