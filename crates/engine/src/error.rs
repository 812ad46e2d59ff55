//! The engine's error type, for what can fail outside a run (a run's own failures are decisions or
//! [`Refusal`](crate::Refusal)s).

use runguard_contract::canonical::CanonicalError;

/// Why the engine could not do what a host asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A snapshot could not be put in canonical form, so it has no hash to bind runs to.
    #[error("snapshot cannot be hashed: {0}")]
    Snapshot(#[source] CanonicalError),
}
