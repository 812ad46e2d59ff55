//! Locks that serialise read-modify-writes across every node of a store: the learning loop's (pattern
//! counts, confirmations, regrets and demotions, graduation), whose reads decide what the commit writes.
//!
//! A node serialises them per tenant in process; nodes sharing a PostgreSQL database also take a session
//! advisory lock per name on a connection of its own, held from before the reads until after the
//! commit: a second node's reads then start after the first one's commit and see it. Sled has one
//! writer process, so its lock holds nothing.

use crate::error::StoreError;

/// A held lock; released when dropped (on PostgreSQL the connection holding it is closed, which
/// releases every lock it held even when the node dies meanwhile).
#[derive(Default)]
pub struct ClusterLock {
    held: Option<postgres::Client>,
}

impl std::fmt::Debug for ClusterLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterLock").field("shared", &self.is_shared()).finish()
    }
}

impl ClusterLock {
    /// A lock that holds nothing (one node owns the store).
    pub(crate) fn none() -> Self {
        Self::default()
    }

    /// A lock held by the session of `client`.
    pub(crate) fn held_by(client: postgres::Client) -> Self {
        Self { held: Some(client) }
    }

    /// Whether the lock is held in a database shared with other nodes.
    pub fn is_shared(&self) -> bool {
        self.held.is_some()
    }
}

impl Drop for ClusterLock {
    fn drop(&mut self) {
        if let Some(client) = self.held.take() {
            // Closing the session releases its advisory locks; the sync client must not close on an
            // async runtime's thread.
            crate::postgres::off_runtime(move || drop(client));
        }
    }
}

/// Why a lock could not be taken.
pub(crate) fn lock_error(err: postgres::Error) -> StoreError {
    crate::postgres::pg_error("cannot take a cluster lock", err)
}
