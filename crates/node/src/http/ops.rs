//! Operations endpoints: health, readiness, Prometheus metrics and the OpenAPI document.

use actix_web::web::Payload;
use actix_web::{HttpRequest, HttpResponse, http::header::ContentType};
use serde::Deserialize;
use serde_json::json;

use crate::auth::Role;
use crate::error::ApiError;
use crate::http::State;
use crate::openapi;

/// `GET /healthz`: the process answers.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

/// `GET /readyz`: the store is open and the writer accepts commits.
pub async fn readyz(state: State) -> Result<HttpResponse, ApiError> {
    if state.is_ready() {
        Ok(HttpResponse::Ok().json(json!({ "status": "ready" })))
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
pub async fn openapi() -> HttpResponse {
    HttpResponse::Ok().insert_header(ContentType::json()).body(openapi::document().to_string())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFault {
    commit_failure: bool,
}

/// `POST /v1/faults/store` `{"commit_failure": bool}` (admin): while set, every store commit fails and
/// writes nothing, so step calls answer 503. Served only with `fault_injection = true` (tests and drills);
/// otherwise the path does not exist (404). Not part of the documented API.
pub async fn store_fault(state: State, req: HttpRequest, payload: Payload) -> Result<HttpResponse, ApiError> {
    if !state.shared.config.fault_injection {
        return Err(ApiError::no_route(req.path()));
    }
    let caller = state.caller(&req, Role::Admin)?;
    let body: StoreFault = state.json(&req, payload).await?;
    state.shared.store.inject_commit_failure(body.commit_failure);
    tracing::warn!(caller = %caller.name, commit_failure = body.commit_failure, "store fault injection changed");
    Ok(HttpResponse::Ok().json(json!({ "commit_failure": body.commit_failure })))
}
