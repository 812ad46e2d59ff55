//! The one place that knows how the node's refusals are answered over HTTP: each [`NodeError`] and
//! [`StoreError`] becomes its status, code, message and details here (`docs/api.md` lists the answers).

use runguard_contract::RunStatus;
use runguard_engine::Refusal;
use runguard_store::{StoreError, StoreErrorKind};
use serde_json::json;

use crate::error::ApiError;
use crate::node_error::NodeError;

impl From<NodeError> for ApiError {
    fn from(err: NodeError) -> Self {
        match err {
            NodeError::Unavailable { message, retry_after_s } => ApiError::unavailable(message, retry_after_s),
            NodeError::Overloaded { message, retry_after_s } => ApiError::overloaded(message, retry_after_s),
            NodeError::Conflict { code, message } => ApiError::conflict(code, message),
            NodeError::NotFound { what, id } => ApiError::not_found(what, &id),
            NodeError::Forbidden(message) => ApiError::forbidden(message),
            NodeError::Refused(refusal) => refused(refusal),
            NodeError::Store(err) => store_error(err),
            NodeError::Internal => ApiError::internal(),
        }
    }
}

/// Maps a store failure to the answer a client gets: 503 (treat as block) for IO and injected faults,
/// 409 for conflicts, 404 for missing objects, 400 for bad arguments, 500 for corruption.
pub fn store_error(err: StoreError) -> ApiError {
    match err.kind() {
        StoreErrorKind::Io | StoreErrorKind::Injected => {
            tracing::error!(error = %err, "store unavailable");
            ApiError::unavailable(
                "the store cannot commit; the call was not acknowledged and must be treated as a block",
                1,
            )
        }
        // A run another node kept changing while this one retried (`docs/architecture.md`, "Cluster").
        StoreErrorKind::Conflict | StoreErrorKind::Fenced => ApiError::conflict("conflict", err.message().to_owned()),
        StoreErrorKind::NotFound => ApiError::conflict("not_found", err.message().to_owned()),
        StoreErrorKind::InvalidArgument => ApiError::bad_request("cursor", err.message().to_owned()),
        StoreErrorKind::Contract | StoreErrorKind::Corrupt | StoreErrorKind::Schema => {
            tracing::error!(error = %err, "store refused or found corrupt data");
            ApiError::internal()
        }
    }
}

/// How a run that no longer runs came to stop, in words.
fn why_not_running(status: RunStatus) -> &'static str {
    match status {
        RunStatus::Stopped => "was stopped by a block",
        RunStatus::Succeeded => "has ended (`succeeded`)",
        RunStatus::Failed => "has ended (`failed`)",
        RunStatus::Expired => "has expired (its TTL passed before it ended)",
        RunStatus::Running => "is running",
    }
}

/// A run's refusal of a call: always a conflict, with what the client needs to get back in step.
fn refused(refusal: Refusal) -> ApiError {
    match refusal {
        Refusal::OutOfOrder { expected } => ApiError::conflict(
            "step_out_of_order",
            format!("expected step {} `{}` next", expected.index, expected.phase.as_str()),
        )
        .with_details(json!({ "expected": { "index": expected.index, "phase": expected.phase } })),
        Refusal::NotRunning { status, stopping_decision } => ApiError::conflict(
            "run_not_running",
            format!("the run {}; it accepts no more step calls", why_not_running(status)),
        )
        .with_details(json!({ "status": status, "decision": stopping_decision })),
        Refusal::StepLimit { max } => {
            ApiError::conflict("run_step_limit", format!("runs take at most {max} steps on this node"))
        }
        Refusal::RetryMismatch { index, phase } => ApiError::conflict(
            "idempotency_mismatch",
            format!("step {index} `{}` was already answered; a retry must send the identical body", phase.as_str()),
        ),
        // The engine's refusals may grow; one this node does not know yet is still a conflict.
        other => ApiError::conflict("run_refused", other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_errors_keep_their_answers() {
        let err = ApiError::from(NodeError::unavailable("the writer is overloaded; treat the call as a block"));
        assert_eq!((err.status, err.code, err.retry_after_s), (503, "unavailable", Some(1)));
        let err = ApiError::from(NodeError::not_found("pattern", "pat_1"));
        assert_eq!((err.status, err.code, err.message.as_str()), (404, "not_found", "pattern `pat_1` not found"));
        let err = ApiError::from(NodeError::conflict("already_proposed", "x"));
        assert_eq!((err.status, err.code), (409, "already_proposed"));
        let err = ApiError::from(NodeError::Forbidden("only admins confirm global policies"));
        assert_eq!(err.status, 403);
        let err = ApiError::from(NodeError::Refused(Refusal::StepLimit { max: 3 }));
        assert_eq!((err.status, err.code), (409, "run_step_limit"));
        let err = ApiError::from(NodeError::Store(StoreError::new(StoreErrorKind::NotFound, "gone")));
        assert_eq!((err.status, err.code), (409, "not_found"));
        let err = ApiError::from(NodeError::Store(StoreError::new(StoreErrorKind::InvalidArgument, "bad")));
        assert_eq!((err.status, err.code), (400, "invalid_request"));
    }
}
