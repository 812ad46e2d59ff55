//! The node's domain error: what the actors, the shared context and the policy rules answer when a call
//! cannot be done. It names what went wrong, never how HTTP says it: `http/errors.rs` maps each variant
//! to its status, code and body, in one place.

use runguard_engine::Refusal;
use runguard_store::StoreError;

/// Why the node did not do a call.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Nothing was acknowledged; the caller treats the call as a block and may retry after
    /// `retry_after_s` seconds (the writer, a run or the learning loop is overloaded or stopped).
    #[error("{message}")]
    Unavailable {
        /// What is unavailable, for the caller.
        message: &'static str,
        /// Seconds to wait before retrying.
        retry_after_s: u64,
    },
    /// The caller (a tenant) has too much work queued; it retries later.
    #[error("{message}")]
    Overloaded {
        /// What is full, for the caller.
        message: &'static str,
        /// Seconds to wait before retrying.
        retry_after_s: u64,
    },
    /// The call contradicts the state it would change.
    #[error("{message}")]
    Conflict {
        /// The stable machine-readable code, e.g. `already_proposed`.
        code: &'static str,
        /// A sentence for humans.
        message: String,
    },
    /// The object does not exist (or belongs to another tenant).
    #[error("{what} `{id}` not found")]
    NotFound {
        /// The kind of object, e.g. `pattern`.
        what: &'static str,
        /// Its id as given.
        id: String,
    },
    /// The caller's role does not allow the change.
    #[error("{0}")]
    Forbidden(&'static str),
    /// The run refused a call (out of order, not running, over the step limit, a differing retry).
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The store refused or failed the read or write.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A broken invariant; the cause is logged where it happens.
    #[error("internal error")]
    Internal,
}

impl NodeError {
    /// An object that does not exist.
    pub fn not_found(what: &'static str, id: impl Into<String>) -> Self {
        Self::NotFound { what, id: id.into() }
    }

    /// A conflict with `code`.
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::Conflict { code, message: message.into() }
    }

    /// Unavailable for a second: the answer to every overloaded or stopped collaborator.
    pub fn unavailable(message: &'static str) -> Self {
        Self::Unavailable { message, retry_after_s: 1 }
    }
}
