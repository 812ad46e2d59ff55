//! Operations endpoints: health, readiness, Prometheus metrics and the OpenAPI document.

use actix_web::{HttpResponse, http::header::ContentType};
use serde_json::json;

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
