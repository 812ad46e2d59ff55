//! Operations endpoints: health, readiness, Prometheus metrics and the OpenAPI document.

use actix_web::web::Payload;
use actix_web::{HttpRequest, HttpResponse, http::header::ContentType};
use serde::Deserialize;
use serde_json::json;

use crate::auth::Role;
use crate::error::ApiError;
use crate::http::State;
use crate::http::views::Health;

/// `GET /healthz`: the process answers.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Health { status: "ok" })
}

/// `GET /readyz`: the store is open, the writer accepts commits and the latest commit attempt (or the
/// writer's probe while unhealthy, about once a second) could write (`docs/operations.md`).
pub async fn readyz(state: State) -> Result<HttpResponse, ApiError> {
    if state.is_ready() && state.shared.store.is_healthy() {
        Ok(HttpResponse::Ok().json(Health { status: "ready" }))
    } else {
        Err(ApiError::unavailable("not ready", 1))
    }
}

/// `GET /metrics`.
pub async fn metrics(state: State) -> HttpResponse {
    let body = state.metrics.as_ref().map(|handle| handle.render()).unwrap_or_default();
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(body)
}

/// `GET /openapi.json`.
pub async fn openapi(state: State) -> HttpResponse {
    HttpResponse::Ok().insert_header(ContentType::json()).body(state.openapi)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFault {
    commit_failure: Option<bool>,
    durability_failure: Option<bool>,
    commit_delay_ms: Option<u64>,
}

/// `POST /v1/faults/store` (admin), with any of:
/// - `commit_failure: bool` — every store commit fails inside its transaction and writes nothing;
/// - `durability_failure: bool` — every commit's flush fails after its transaction applied in memory, as
///   on a full or read-only disk (the store must then forget the refused writes and reopen itself);
/// - `commit_delay_ms: int` — every commit waits this long first (0: off), so that commits outlive the
///   call timeout.
///
/// Served only with `fault_injection = true` (tests and drills); otherwise the path does not exist (404).
/// Not part of the documented API.
pub async fn store_fault(state: State, req: HttpRequest, payload: Payload) -> Result<HttpResponse, ApiError> {
    if !state.shared.config.fault_injection {
        return Err(ApiError::no_route(req.path()));
    }
    let caller = state.caller(&req, Role::Admin)?;
    let body: StoreFault = state.json(&req, payload).await?;
    let store = &state.shared.store;
    if let Some(fail) = body.commit_failure {
        store.inject_commit_failure(fail);
    }
    if let Some(fail) = body.durability_failure {
        store.inject_durability_failure(fail);
    }
    if let Some(ms) = body.commit_delay_ms {
        store.inject_commit_delay(std::time::Duration::from_millis(ms));
    }
    tracing::warn!(
        caller = %caller.name,
        commit_failure = ?body.commit_failure,
        durability_failure = ?body.durability_failure,
        commit_delay_ms = ?body.commit_delay_ms,
        "store fault injection changed"
    );
    Ok(HttpResponse::Ok().json(json!({
        "commit_failure": body.commit_failure,
        "durability_failure": body.durability_failure,
        "commit_delay_ms": body.commit_delay_ms,
    })))
}
