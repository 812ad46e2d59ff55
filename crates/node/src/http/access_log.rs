//! The access log: one INFO line per answered request, with the route template (never the raw path, so
//! ids do not make every line unique), the status, the latency, who called — the tenant and the token's
//! configured name, never the token — and the run and decision where there are. Its target is `access`, so an operator can silence it
//! alone (`RUST_LOG=info,access=off`).

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{HttpMessage, HttpRequest};

use crate::auth::Caller;

/// Who a request was authenticated as, kept on the request for its access-log line.
/// Whether access lines are written at all: when they are off (`RUST_LOG=…,access=off`) a request pays
/// nothing for them.
fn enabled() -> bool {
    tracing::enabled!(target: "access", tracing::Level::INFO)
}

#[derive(Clone, Debug)]
struct Identified {
    tenant: String,
    token: String,
}

/// Notes the caller of `req` for its access-log line (called wherever a request is authenticated).
pub fn identify(req: &HttpRequest, caller: &Caller) {
    if !enabled() {
        return;
    }
    req.extensions_mut().insert(Identified { tenant: caller.tenant.to_string(), token: caller.name.clone() });
}

/// The decision a request answered, kept on the request for its access-log line.
#[derive(Clone, Debug)]
struct Decided(String);

/// Notes the decision `req` answered (step calls), so its access-log line can be joined to the decision's.
pub fn decided(req: &HttpRequest, decision_id: &str) {
    if !enabled() {
        return;
    }
    req.extensions_mut().insert(Decided(decision_id.to_owned()));
}

/// The middleware (`actix_web::middleware::from_fn(access_log::log)`).
pub async fn log(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    if !enabled() {
        return next.call(req).await;
    }
    let started = Instant::now();
    let method = req.method().clone();
    let answer = next.call(req).await?;
    let request = answer.request();
    let route = request.match_pattern();
    let run_id = match route.as_deref() {
        Some(route) if route.starts_with("/v1/runs/{id}") => request.match_info().get("id"),
        _ => None,
    };
    let who = request.extensions_mut().remove::<Identified>();
    let decided = request.extensions_mut().remove::<Decided>();
    tracing::info!(
        target: "access",
        method = method.as_str(),
        route = route.as_deref().unwrap_or("unmatched"),
        status = answer.status().as_u16(),
        latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        tenant = who.as_ref().map(|w| w.tenant.as_str()),
        token_name = who.as_ref().map(|w| w.token.as_str()),
        run_id,
        decision_id = decided.as_ref().map(|d| d.0.as_str()),
        "request"
    );
    Ok(answer)
}
