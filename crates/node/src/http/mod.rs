//! The HTTP API (actix-web 4), documented in `docs/api.md`.

pub mod access_log;
pub mod body;
pub mod errors;
pub mod learning;
pub mod metered;
pub mod ops;
pub mod policies;
pub mod query_params;
pub mod records;
pub mod run_list;
pub mod runs;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix::Addr;
use actix_web::http::header::{ALLOW, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, Resource, ResponseError, Route, guard, web};
use metrics_exporter_prometheus::PrometheusHandle;
use runguard_contract::TenantId;
use runguard_store::{DEFAULT_PAGE_LIMIT, MAX_PAGE_LIMIT, Page, PageRequest, Store};
use serde::Deserialize;
use serde_json::json;

use crate::actors::learning::Learning;
use crate::actors::registry::{Registry, RunTable};
use crate::auth::{Authenticator, Caller, Role};
use crate::error::ApiError;
use crate::node_error::NodeError;
use crate::shared::Shared;

/// What every handler can reach.
pub struct AppState {
    /// Store, writer and configuration.
    pub shared: Arc<Shared>,
    /// The run registry.
    pub registry: Addr<Registry>,
    /// The live runs (looked up by every call; changed only by the registry).
    pub runs: Arc<RunTable>,
    /// The learning loop.
    pub learning: Addr<Learning>,
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
        access_log::identify(req, &caller);
        caller.require(role)?;
        Ok(caller)
    }

    /// The request body, refused above the configured size (413) or when it does not arrive within the
    /// configured time (408), so that a client trickling a body cannot hold a worker's attention forever.
    pub async fn body(&self, req: &HttpRequest, payload: web::Payload) -> Result<web::Bytes, ApiError> {
        let limit_ms = self.shared.config.http.body_timeout_ms;
        let read = body::read_body(req, payload, self.shared.config.limits.body_bytes);
        match tokio::time::timeout(Duration::from_millis(limit_ms), read).await {
            Ok(body) => body,
            Err(_) => {
                metrics::counter!("runguard_refused_calls_total", "reason" => "body_timeout").increment(1);
                tracing::debug!(path = req.path(), limit_ms, "request body timed out");
                Err(ApiError::request_timeout(limit_ms))
            }
        }
    }

    /// The request body parsed as JSON into `T`, with the contract's path-naming errors.
    pub async fn json<T: serde::de::DeserializeOwned>(
        &self,
        req: &HttpRequest,
        payload: web::Payload,
    ) -> Result<T, ApiError> {
        body::parse_json(&self.body(req, payload).await?)
    }

    /// Sends a request to the learning actor and waits for its answer (503 if it is unavailable).
    pub async fn learn<M, T>(&self, msg: M) -> Result<T, ApiError>
    where
        M: actix::Message<Result = Result<T, NodeError>> + Send + 'static,
        T: Send + 'static,
        Learning: actix::Handler<M>,
    {
        // No timeout here: the actor answers at once with a future that bounds its own waiting and whose
        // commit must not be abandoned once the writer holds it (a timeout here could answer 503 for a
        // request that is applied afterwards).
        let answer = self.learning.send(msg).await.map_err(|err| {
            tracing::error!(error = %err, "learning actor unavailable");
            ApiError::unavailable("the learning loop is overloaded or stopped; retry", 1)
        })?;
        Ok(answer?)
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
    query_params::parse(req.query_string())
}

/// Reads one page of a tenant's list and encodes it as `{"items", "next_cursor"}` in the tenant's lane
/// (`Shared::heavy`): pages of up to 1,000 items are the most expensive reads, and one tenant paging as
/// fast as it can must wait for its own reads rather than take every core from the others.
pub async fn list_page<T, F>(state: &State, tenant: &TenantId, read: F) -> Result<HttpResponse, ApiError>
where
    T: serde::Serialize + Send + 'static,
    F: FnOnce(&Store) -> Result<Page<T>, ApiError> + Send + 'static,
{
    let body = state
        .shared
        .heavy(tenant, move |shared| {
            let page = read(&shared.store)?;
            serde_json::to_vec(&json!({ "items": page.items, "next_cursor": page.next_cursor }))
                .map_err(|_| ApiError::internal())
        })
        .await?;
    Ok(HttpResponse::Ok().content_type("application/json").body(body))
}

async fn unknown_route(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::no_route(req.path()))
}

/// 405 with `Allow` naming the methods the path serves.
fn wrong_method(req: &HttpRequest, allow: &'static str) -> HttpResponse {
    let mut response = ApiError::method_not_allowed(req.method().as_str(), req.path()).error_response();
    response.headers_mut().insert(ALLOW, HeaderValue::from_static(allow));
    response
}

/// A resource answering methods other than `allow` with 405.
fn endpoint(path: &str, allow: &'static str) -> Resource {
    web::resource(path.to_owned())
        .default_service(web::to(move |req: HttpRequest| async move { wrong_method(&req, allow) }))
}

/// A route for `GET` that answers `HEAD` too (health probes send it); actix-web sends no body to `HEAD`.
fn read() -> Route {
    web::route().guard(guard::Any(guard::Get()).or(guard::Head()))
}

/// Registers every route.
pub fn configure(cfg: &mut web::ServiceConfig) {
    const READ: &str = "GET, HEAD";
    const WRITE: &str = "POST";
    cfg.service(endpoint("/healthz", READ).route(read().to(ops::healthz)))
        .service(endpoint("/readyz", READ).route(read().to(ops::readyz)))
        .service(endpoint("/metrics", READ).route(read().to(ops::metrics)))
        .service(endpoint("/openapi.json", READ).route(read().to(ops::openapi)))
        .service(
            endpoint("/v1/policies", "GET, HEAD, POST")
                .route(web::post().to(policies::create))
                .route(read().to(policies::list)),
        )
        .service(
            endpoint("/v1/policies/{id}", "GET, HEAD, PUT")
                .route(read().to(policies::get))
                .route(web::put().to(policies::update)),
        )
        .service(endpoint("/v1/policies/{id}/mode", WRITE).route(web::post().to(policies::set_mode)))
        .service(endpoint("/v1/policies/{id}/confirm", WRITE).route(web::post().to(policies::confirm)))
        .service(endpoint("/v1/policies/{id}/audit", READ).route(read().to(policies::audit)))
        .service(endpoint("/v1/policies/{id}/versions", READ).route(read().to(policies::versions)))
        .service(endpoint("/v1/policies/{id}/shadow-stats", READ).route(read().to(policies::shadow_stats)))
        .service(endpoint("/v1/policies/{id}/graduation", READ).route(read().to(policies::graduation)))
        .service(
            endpoint("/v1/runs", "GET, HEAD, POST")
                .route(web::post().to(runs::create))
                .route(read().to(run_list::list)),
        )
        .service(endpoint("/v1/runs/{id}", READ).route(read().to(runs::get)))
        .service(endpoint("/v1/runs/{id}/steps", WRITE).route(web::post().to(runs::step)))
        .service(endpoint("/v1/runs/{id}/end", WRITE).route(web::post().to(runs::end)))
        .service(endpoint("/v1/runs/{id}/decisions", READ).route(read().to(runs::decisions)))
        .service(endpoint("/v1/snapshots/{id}", READ).route(read().to(records::snapshot)))
        .service(endpoint("/v1/prevention-records", READ).route(read().to(records::list)))
        .service(endpoint("/v1/prevention-records/{id}", READ).route(read().to(records::get)))
        .service(endpoint("/v1/prevention-records/{id}/regret", WRITE).route(web::post().to(records::regret)))
        .service(endpoint("/v1/incidents", READ).route(read().to(learning::incidents)))
        .service(endpoint("/v1/incidents/{id}", READ).route(read().to(learning::incident)))
        .service(endpoint("/v1/patterns", READ).route(read().to(learning::patterns)))
        .service(endpoint("/v1/patterns/{id}", READ).route(read().to(learning::pattern)))
        .service(endpoint("/v1/patterns/{id}/propose", WRITE).route(web::post().to(learning::propose)))
        .service(endpoint("/v1/graduation", READ).route(read().to(learning::graduation)))
        .service(endpoint("/v1/simulate", WRITE).route(web::post().to(learning::simulate)))
        .service(endpoint("/v1/faults/store", WRITE).route(web::post().to(ops::store_fault)))
        .default_service(web::to(unknown_route));
}
