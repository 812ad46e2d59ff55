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
pub mod route;
pub mod routes;
pub mod run_list;
pub mod runs;
pub mod usage;
pub mod views;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix::Addr;
use actix_web::http::header::{ALLOW, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, ResponseError, guard, web};
use metrics_exporter_prometheus::PrometheusHandle;
use runguard_contract::TenantId;
use runguard_store::{DEFAULT_PAGE_LIMIT, MAX_PAGE_LIMIT, Page, PageRequest, Store};
use schemars::JsonSchema;
use serde::Deserialize;

use self::route::Method;
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
    /// The OpenAPI document, rendered from the route table once at start-up (passed in, so that the
    /// handlers the table names never reach the renderer that reads the table).
    pub openapi: &'static str,
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
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// At most this many (1–1000, default 100).
    #[schemars(with = "Option<u32>", range(min = 1, max = 1000))]
    pub limit: Option<String>,
    /// From a previous page's `next_cursor`; opaque: a cursor the list did not give is refused (400).
    #[schemars(length(min = 1))]
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
            serde_json::to_vec(&views::sorted(&views::Page { items: page.items, next_cursor: page.next_cursor })?)
                .map_err(|_| ApiError::internal())
        })
        .await?;
    Ok(HttpResponse::Ok().content_type("application/json").body(body))
}

async fn unknown_route(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::no_route(req.path()))
}

/// 405 with `Allow` naming the methods the path serves.
fn wrong_method(req: &HttpRequest, allow: &str) -> HttpResponse {
    let mut response = ApiError::method_not_allowed(req.method().as_str(), req.path()).error_response();
    if let Ok(allow) = HeaderValue::from_str(allow) {
        response.headers_mut().insert(ALLOW, allow);
    }
    response
}

/// The guard of a method: `GET` routes answer `HEAD` too (health probes send it); actix-web sends no
/// body to `HEAD`.
fn method_guard(method: Method) -> guard::AnyGuard {
    match method {
        Method::Get => guard::Any(guard::Get()).or(guard::Head()),
        Method::Post => guard::Any(guard::Post()),
        Method::Put => guard::Any(guard::Put()),
    }
}

/// Registers every route of the table ([`routes::ROUTES`]), one resource per path answering the other
/// methods with 405.
pub fn configure(cfg: &mut web::ServiceConfig) {
    let mut paths: Vec<&'static str> = Vec::new();
    for route in routes::ROUTES {
        if !paths.contains(&route.path) {
            paths.push(route.path);
        }
    }
    for path in paths {
        let mut methods: Vec<Method> =
            routes::ROUTES.iter().filter(|route| route.path == path).map(|route| route.method).collect();
        methods.sort();
        let allow = methods.iter().map(|method| method.allow()).collect::<Vec<_>>().join(", ");
        let mut resource = web::resource(path).default_service(web::to(move |req: HttpRequest| {
            let allow = allow.clone();
            async move { wrong_method(&req, &allow) }
        }));
        for route in routes::ROUTES.iter().filter(|route| route.path == path) {
            resource = resource.route((route.handler)().guard(method_guard(route.method)));
        }
        cfg.service(resource);
    }
    cfg.default_service(web::to(unknown_route));
}
