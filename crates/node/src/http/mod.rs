//! The HTTP API of SPEC §8 (actix-web 4).

pub mod body;
pub mod learning;
pub mod ops;
pub mod policies;
pub mod records;
pub mod runs;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use actix::Addr;
use actix_web::{HttpRequest, HttpResponse, web};
use metrics_exporter_prometheus::PrometheusHandle;
use runguard_store::{DEFAULT_PAGE_LIMIT, MAX_PAGE_LIMIT, PageRequest};
use serde::Deserialize;
use serde_json::json;

use crate::actors::registry::Registry;
use crate::auth::{Authenticator, Caller, Role};
use crate::error::ApiError;
use crate::shared::Shared;

/// What every handler can reach.
pub struct AppState {
    /// Store, writer and configuration.
    pub shared: Arc<Shared>,
    /// The run registry.
    pub registry: Addr<Registry>,
    /// Token checks.
    pub auth: Authenticator,
    /// Renders `/metrics`.
    pub metrics: Option<PrometheusHandle>,
    /// False once shutdown has begun.
    pub ready: AtomicBool,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

impl AppState {
    /// Authenticates the request and requires `role`.
    pub fn caller(&self, req: &HttpRequest, role: Role) -> Result<Caller, ApiError> {
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
        let caller = self.auth.authenticate(header("authorization"), header("x-tenant"))?;
        caller.require(role)?;
        Ok(caller)
    }

    /// The request body, refused above the configured size (413).
    pub async fn body(&self, req: &HttpRequest, payload: web::Payload) -> Result<web::Bytes, ApiError> {
        body::read_body(req, payload, self.shared.config.limits.body_bytes).await
    }

    /// The request body parsed as JSON into `T`, with the contract's path-naming errors.
    pub async fn json<T: serde::de::DeserializeOwned>(
        &self,
        req: &HttpRequest,
        payload: web::Payload,
    ) -> Result<T, ApiError> {
        body::parse_json(&self.body(req, payload).await?)
    }

    /// Whether the node accepts work.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && self.shared.writer.connected()
    }
}

/// Shared state as actix `Data`.
pub type State = web::Data<AppState>;

/// `limit` and `cursor` query parameters.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// At most 1000; default 100.
    pub limit: Option<String>,
    /// From a previous page's `next_cursor`.
    pub cursor: Option<String>,
}

impl PageQuery {
    /// Validates into a store page request.
    pub fn page(&self) -> Result<PageRequest, ApiError> {
        let limit = match &self.limit {
            None => DEFAULT_PAGE_LIMIT,
            Some(text) => {
                let limit: usize = text
                    .parse()
                    .map_err(|_| ApiError::bad_request("limit", format!("`{text}` is not a whole number")))?;
                if limit == 0 || limit > MAX_PAGE_LIMIT {
                    return Err(ApiError::bad_request("limit", format!("must be 1–{MAX_PAGE_LIMIT}")));
                }
                limit
            }
        };
        Ok(match &self.cursor {
            Some(cursor) => PageRequest::after(limit, cursor.clone()),
            None => PageRequest::first(limit),
        })
    }
}

/// Parses a query string strictly (unknown parameters are 400).
pub fn query<T: serde::de::DeserializeOwned>(req: &HttpRequest) -> Result<T, ApiError> {
    web::Query::<T>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .map_err(|err| ApiError::bad_request("query", err.to_string()))
}

/// `{"items": [...], "next_cursor": ...}`.
pub fn page_of<T: serde::Serialize>(items: &[T], next_cursor: Option<String>) -> HttpResponse {
    HttpResponse::Ok().json(json!({ "items": items, "next_cursor": next_cursor }))
}

async fn unknown_route(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::no_route(req.path()))
}

async fn wrong_method(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::method_not_allowed(req.method().as_str(), req.path()))
}

/// Registers every route.
pub fn configure(cfg: &mut web::ServiceConfig) {
    let resource = |path: &str| web::resource(path.to_owned()).default_service(web::to(wrong_method));
    cfg.service(resource("/healthz").route(web::get().to(ops::healthz)))
        .service(resource("/readyz").route(web::get().to(ops::readyz)))
        .service(resource("/metrics").route(web::get().to(ops::metrics)))
        .service(resource("/openapi.json").route(web::get().to(ops::openapi)))
        .service(resource("/v1/policies").route(web::post().to(policies::create)).route(web::get().to(policies::list)))
        .service(
            resource("/v1/policies/{id}").route(web::get().to(policies::get)).route(web::put().to(policies::update)),
        )
        .service(resource("/v1/policies/{id}/mode").route(web::post().to(policies::set_mode)))
        .service(resource("/v1/policies/{id}/confirm").route(web::post().to(policies::confirm)))
        .service(resource("/v1/policies/{id}/audit").route(web::get().to(policies::audit)))
        .service(resource("/v1/policies/{id}/shadow-stats").route(web::get().to(policies::shadow_stats)))
        .service(resource("/v1/policies/{id}/graduation").route(web::get().to(policies::graduation)))
        .service(resource("/v1/runs").route(web::post().to(runs::create)))
        .service(resource("/v1/runs/{id}").route(web::get().to(runs::get)))
        .service(resource("/v1/runs/{id}/steps").route(web::post().to(runs::step)))
        .service(resource("/v1/runs/{id}/end").route(web::post().to(runs::end)))
        .service(resource("/v1/runs/{id}/decisions").route(web::get().to(runs::decisions)))
        .service(resource("/v1/snapshots/{id}").route(web::get().to(records::snapshot)))
        .service(resource("/v1/prevention-records").route(web::get().to(records::list)))
        .service(resource("/v1/prevention-records/{id}").route(web::get().to(records::get)))
        .service(resource("/v1/prevention-records/{id}/regret").route(web::post().to(records::regret)))
        .service(resource("/v1/incidents").route(web::get().to(learning::incidents)))
        .service(resource("/v1/patterns").route(web::get().to(learning::patterns)))
        .service(resource("/v1/patterns/{id}").route(web::get().to(learning::pattern)))
        .service(resource("/v1/patterns/{id}/propose").route(web::post().to(learning::propose)))
        .service(resource("/v1/graduation").route(web::get().to(learning::graduation)))
        .service(resource("/v1/simulate").route(web::post().to(learning::simulate)))
        .service(resource("/v1/faults/store").route(web::post().to(ops::store_fault)))
        .default_service(web::to(unknown_route));
}
