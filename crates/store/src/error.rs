//! The store's error type: a kind to match on and a lowercase message to show.

use std::fmt;
use std::sync::Arc;

/// What went wrong, coarse enough to map onto an HTTP status or an exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StoreErrorKind {
    /// The disk or the database engine failed (the node answers 503).
    Io,
    /// Stored bytes do not decode or do not verify (fail closed).
    Corrupt,
    /// A write the prevention contract or the data model does not allow; nothing was written.
    Contract,
    /// An optimistic-concurrency or uniqueness check failed; nothing was written.
    Conflict,
    /// A run's fencing condition failed: another writer (another node) changed the run since the writer
    /// read it; nothing of the caller's batch was written.
    Fenced,
    /// A referenced object does not exist.
    NotFound,
    /// The database was written by an unknown schema version.
    Schema,
    /// A test asked this commit to fail; nothing was written.
    Injected,
    /// A caller-supplied argument (cursor, limit) is invalid.
    InvalidArgument,
}

impl StoreErrorKind {
    /// A short lowercase name.
    pub const fn as_str(self) -> &'static str {
        match self {
            StoreErrorKind::Io => "io",
            StoreErrorKind::Corrupt => "corrupt",
            StoreErrorKind::Contract => "contract",
            StoreErrorKind::Conflict => "conflict",
            StoreErrorKind::Fenced => "fenced",
            StoreErrorKind::NotFound => "not found",
            StoreErrorKind::Schema => "schema",
            StoreErrorKind::Injected => "injected",
            StoreErrorKind::InvalidArgument => "invalid argument",
        }
    }
}

impl fmt::Display for StoreErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A store failure: a [`StoreErrorKind`], a lowercase message, and the underlying error if any.
///
/// Cheap to clone, so one failed group commit can answer every caller of the batch.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct StoreError {
    kind: StoreErrorKind,
    message: String,
    #[source]
    source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

impl StoreError {
    /// An error of `kind` with `message`.
    pub fn new(kind: StoreErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), source: None }
    }

    /// An error of `kind` with `message`, caused by `source`.
    pub fn with_source(
        kind: StoreErrorKind,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self { kind, message: message.into(), source: Some(Arc::new(source)) }
    }

    /// What went wrong.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    /// The message, without the kind.
    pub fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn prepend(&mut self, context: String) {
        self.message = format!("{context}: {}", self.message);
    }

    pub(crate) fn io(message: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::with_source(StoreErrorKind::Io, message, source)
    }

    pub(crate) fn corrupt(message: impl Into<String>) -> Self {
        Self::new(StoreErrorKind::Corrupt, message)
    }

    pub(crate) fn contract(message: impl Into<String>) -> Self {
        Self::new(StoreErrorKind::Contract, message)
    }

    pub(crate) fn conflict(message: impl Into<String>) -> Self {
        Self::new(StoreErrorKind::Conflict, message)
    }

    pub(crate) fn fenced(message: impl Into<String>) -> Self {
        Self::new(StoreErrorKind::Fenced, message)
    }

    /// A conditional tenant-usage increment ([`WriteOp::AddTenantUsage`](crate::WriteOp::AddTenantUsage))
    /// refused because the stored total would exceed its bound: a conflict the caller answers by reading
    /// the total again and deciding once more ([`StoreError::is_tenant_limit`]).
    pub(crate) fn tenant_limit(message: impl Into<String>) -> Self {
        Self::with_source(StoreErrorKind::Conflict, message, TenantLimitReached)
    }

    /// A [`WriteOp::CheckRolledUp`](crate::WriteOp::CheckRolledUp) that no longer holds: the run's stored
    /// rolled-up total (its own plus its descendants', after this batch) passes the bound the decision was
    /// made within, because another node committed to the family meanwhile
    /// ([`StoreError::is_rolled_up_limit`]).
    pub(crate) fn rolled_up_limit(message: impl Into<String>) -> Self {
        Self::with_source(StoreErrorKind::Conflict, message, RolledUpLimitReached)
    }

    /// Whether this is a refused [`WriteOp::CheckRolledUp`]: the caller's view of the family was stale,
    /// nothing of its batch was written.
    pub fn is_rolled_up_limit(&self) -> bool {
        self.source.as_ref().is_some_and(|source| source.is::<RolledUpLimitReached>())
    }

    /// Whether this is a refused conditional tenant-usage increment: the caller's view of the tenant's
    /// total was stale, nothing of its batch was written.
    pub fn is_tenant_limit(&self) -> bool {
        self.source.as_ref().is_some_and(|source| source.is::<TenantLimitReached>())
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StoreErrorKind::NotFound, message)
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(StoreErrorKind::InvalidArgument, message)
    }
}

/// The marker of [`StoreError::rolled_up_limit`].
#[derive(Debug, thiserror::Error)]
#[error("the stored rolled-up total would exceed the bound the decision was made within")]
struct RolledUpLimitReached;

/// The marker of [`StoreError::tenant_limit`].
#[derive(Debug, thiserror::Error)]
#[error("the stored tenant total would exceed the bound the decision was made within")]
struct TenantLimitReached;

impl From<sled::Error> for StoreError {
    fn from(err: sled::Error) -> Self {
        match err {
            sled::Error::Corruption { .. } => {
                Self::with_source(StoreErrorKind::Corrupt, "the database engine reports corruption", err)
            }
            other => Self::io("the database engine failed", other),
        }
    }
}

impl From<std::io::Error> for StoreError {
    fn from(err: std::io::Error) -> Self {
        Self::io("disk access failed", err)
    }
}
