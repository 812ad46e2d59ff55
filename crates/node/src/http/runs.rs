//! Runs: create, read, steps, end, decisions.

use std::collections::BTreeMap;
use std::time::Duration;

use actix::MailboxError;
use actix_web::http::header::ContentType;
use actix_web::web::{Path, Payload};
use actix_web::{HttpRequest, HttpResponse};
use runguard_contract::{Outcome, RunId, StepCall, StepError, ValidationError};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

use crate::actors::registry::{Forget, Resolve, RunKey};
use crate::actors::run::{Adopt, CreateRun, EndRun, RunActor, RunRequest, Step, Ticketed};
use crate::auth::Role;
use crate::config::Limits;
use crate::error::ApiError;
use crate::http::errors::store_error;
use crate::http::views::{RunEnded, RunView, shown_status, sorted};
use crate::http::{PageQuery, State, list_page, query};
use crate::node_error::NodeError;
use crate::shared::now;
use crate::ticket::Ticket;

/// The body of `POST /v1/runs`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    /// The run's id; generated (`run_…`) when absent. Sending it again makes the creation idempotent.
    #[serde(default)]
    #[schemars(with = "Option<RunId>")]
    run_id: Option<String>,
    /// Caller labels (`CEL: run.labels`): at most 64, keys 1–256 bytes, values at most 256 (default limits).
    #[serde(default)]
    #[schemars(extend(
        "maxProperties" = 64,
        "propertyNames" = { "minLength": 1, "maxLength": 256 },
        "additionalProperties" = { "type": "string", "maxLength": 256 },
    ))]
    labels: BTreeMap<String, String>,
    /// The endpoint the run calls (pattern policies compare it).
    #[serde(default)]
    api_endpoint: Option<String>,
    /// The run that spawns this one (`docs/api.md`, "Parent and child runs"): a `running` run of the caller's tenant (404 if unknown,
    /// 409 `parent_not_running` if it is not running, 409 `run_depth_exceeded` past `max_run_depth`).
    #[serde(default)]
    #[schemars(with = "Option<RunId>")]
    parent_run_id: Option<String>,
}

/// The body of `POST /v1/runs/{id}/end`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EndBody {
    /// How the run ended.
    outcome: Outcome,
    /// How it failed (a failed run with an error creates an incident).
    #[serde(default)]
    error: Option<StepError>,
}

fn run_id(raw: &str) -> Result<RunId, ApiError> {
    RunId::new(raw).map_err(|_| ApiError::not_found("run", raw))
}

/// Sends `msg` to the run's actor: found in the shared run table, or resolved (spawned and rehydrated)
/// by the registry. A run with as many calls in flight as its mailbox holds is answered 429 at once
/// rather than after the call timeout. A handle that was evicted or replaced between the lookup and the
/// count is resolved again, so a run never has two actors.
async fn call_run<M>(
    state: &State,
    key: RunKey,
    mut msg: impl FnMut() -> Result<M, ApiError>,
) -> Result<M::Answer, ApiError>
where
    M: RunRequest,
    RunActor: actix::Handler<Ticketed<M>>,
{
    let timeout = state.shared.call_timeout();
    let limit = state.shared.config.limits.run_mailbox;
    let mut closed_once = false;
    for _ in 0..4 {
        let run = match state.runs.get(&key) {
            Some(run) => run,
            None if !M::CREATES && !run_exists(state, &key).await? => {
                return Err(ApiError::not_found("run", key.run_id.as_str()));
            }
            None => match state.registry.send(Resolve::from_here(key.clone())).timeout(timeout).await {
                Ok(resolved) => resolved?,
                Err(_) => {
                    return Err(ApiError::unavailable("the run registry is overloaded; treat the call as a block", 1));
                }
            },
        };
        let Some(in_flight) = run.enter(limit) else {
            metrics::counter!("runguard_refused_calls_total", "reason" => "run_busy").increment(1);
            return Err(ApiError::overloaded(
                "the run has too many calls in flight; treat the call as a block and retry",
                1,
            ));
        };
        if !state.runs.is_current(&key, run.generation) {
            drop(in_flight);
            continue;
        }
        // The run takes the ticket before it starts the call; a caller that times out first abandons it
        // and answers 503, one that times out after waits for the outcome (`docs/reliability.md`).
        let ticket = Ticket::new();
        let mut sent = std::pin::pin!(run.addr.send(Ticketed { msg: msg()?, ticket: ticket.clone() }));
        let answer = match tokio::time::timeout(timeout, &mut sent).await {
            Ok(answer) => answer,
            Err(_) if ticket.abandon() => Err(MailboxError::Timeout),
            Err(_) => sent.await,
        };
        match answer {
            Ok(reply) => {
                if holds_no_run::<M>(&reply) {
                    // Counted out first: the registry drops only an actor with no call in flight.
                    drop(in_flight);
                    state.registry.do_send(Forget { key, generation: run.generation });
                }
                return Ok(reply?);
            }
            Err(MailboxError::Closed) if !closed_once => {
                closed_once = true;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(MailboxError::Timeout) => {
                metrics::counter!("runguard_refused_calls_total", "reason" => "timeout").increment(1);
                return Err(ApiError::unavailable("the run is busy; treat the call as a block and retry", 1));
            }
            Err(MailboxError::Closed) => break,
        }
    }
    Err(ApiError::unavailable("the run is restarting; treat the call as a block and retry", 1))
}

/// Whether the actor that gave `reply` to an `M` is left without a run: a creation that failed (an
/// existing run answers its creation again) or a call that found no run.
fn holds_no_run<M: RunRequest>(reply: &Result<M::Answer, NodeError>) -> bool {
    match reply {
        Err(_) if M::CREATES => true,
        Err(err) => matches!(err, NodeError::NotFound { .. }),
        Ok(_) => false,
    }
}

/// Whether the run is stored. Asked before a call other than creation spawns an actor for a run that is
/// not live, so that calls naming runs that do not exist take no live-run slot.
async fn run_exists(state: &State, key: &RunKey) -> Result<bool, ApiError> {
    let (tenant, run_id) = (key.tenant.clone(), key.run_id.clone());
    Ok(state.shared.read(move |store| store.get_run(&tenant, &run_id).map(|run| run.is_some())).await?)
}

fn check_labels(labels: &BTreeMap<String, String>, limits: &Limits) -> Result<(), ValidationError> {
    let (most, longest) = (limits.labels_per_run, limits.label_len);
    if labels.len() > most {
        return Err(ValidationError::new("labels", format!("has {} entries, the limit is {most}", labels.len())));
    }
    for (key, value) in labels {
        if key.is_empty() || key.len() > longest || value.len() > longest {
            return Err(ValidationError::new(
                format!("labels.{key}"),
                format!("keys are 1–{longest} bytes, values at most {longest}"),
            ));
        }
    }
    Ok(())
}

/// `POST /v1/runs`.
pub async fn create(state: State, req: HttpRequest, payload: Payload) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Worker)?;
    let body: CreateBody = state.json(&req, payload).await?;
    check_labels(&body.labels, &state.shared.config.limits)?;
    if let Some(endpoint) = &body.api_endpoint
        && endpoint.len() > state.shared.config.limits.step.max_field_len
    {
        return Err(ApiError::bad_request("api_endpoint", "is too long"));
    }
    let run_id = match body.run_id {
        Some(raw) => RunId::new(raw).map_err(|e| ApiError::bad_request("run_id", e.message()))?,
        None => RunId::from_u128(uuid::Uuid::now_v7().as_u128()),
    };
    let parent = match body.parent_run_id {
        Some(raw) => Some(RunId::new(raw).map_err(|e| ApiError::bad_request("parent_run_id", e.message()))?),
        None => None,
    };
    let key = RunKey { tenant: caller.tenant, run_id };
    let ancestors = match &parent {
        Some(parent) if !run_exists(&state, &key).await? => adopt(&state, &key, parent).await?,
        _ => Vec::new(),
    };
    let request = CreateRun { labels: body.labels, api_endpoint: body.api_endpoint, ancestors };
    let created = call_run(&state, key.clone(), || Ok(request.clone())).await?;
    if created.created {
        return Ok(HttpResponse::Created().json(created.answer));
    }
    same_creation(&state, key, request, parent).await?;
    Ok(HttpResponse::Ok().json(created.answer))
}

/// Asks the parent of a run about to be created to take it as a child: the parent must be running (its
/// actor answers, so that a run that just left `running` takes no child), and the chain must stay within
/// `max_run_depth`. Answers the child's ancestors.
async fn adopt(state: &State, child: &RunKey, parent: &RunId) -> Result<Vec<RunId>, ApiError> {
    let key = RunKey { tenant: child.tenant.clone(), run_id: parent.clone() };
    let lineage = call_run(state, key, || Ok(Adopt)).await?;
    let most = state.shared.config.limits.max_run_depth;
    // The chain from the root to the new child: its ancestors and itself.
    let depth = lineage.ancestors.len().saturating_add(1);
    if depth > most {
        return Err(ApiError::conflict(
            "run_depth_exceeded",
            format!("a child of run `{parent}` would be the {depth}th run of its chain; the limit is {most}"),
        )
        .with_details(json!({ "max_run_depth": most, "depth": depth })));
    }
    Ok(lineage.ancestors)
}

/// A re-sent creation must carry the body that created the run (`docs/api.md`): what a run was created with
/// never changes, so the stored run settles it without asking its actor.
async fn same_creation(state: &State, key: RunKey, request: CreateRun, parent: Option<RunId>) -> Result<(), ApiError> {
    let run = state.shared.read(move |store| store.get_run(&key.tenant, &key.run_id)).await?;
    let run = run.ok_or_else(ApiError::internal)?;
    let mut differing = Vec::new();
    if run.labels != request.labels {
        differing.push("labels");
    }
    if run.api_endpoint != request.api_endpoint {
        differing.push("api_endpoint");
    }
    if run.parent_run_id != parent {
        differing.push("parent_run_id");
    }
    if differing.is_empty() {
        return Ok(());
    }
    Err(ApiError::conflict(
        "idempotency_mismatch",
        format!("run `{}` exists and was created with different `{}`", run.run_id, differing.join("`, `")),
    )
    .with_details(json!({ "fields": differing })))
}

/// `GET /v1/runs/{id}`.
pub async fn get(state: State, req: HttpRequest, id: Path<String>) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Worker)?;
    let run_id = run_id(&id)?;
    let tenant = caller.tenant.clone();
    let lookup = run_id.clone();
    let run = state
        .shared
        .read(move |store| {
            let Some(run) = store.get_run(&tenant, &lookup)? else { return Ok(None) };
            let rollup = store.run_rollup(&tenant, &lookup)?;
            Ok(Some((run, rollup)))
        })
        .await?;
    let (mut run, rollup) = run.ok_or_else(|| ApiError::not_found("run", run_id.as_str()))?;
    run.status = shown_status(&run, &state.shared.config.run_limits(), now());
    let steps_seen = run.next.index;
    Ok(HttpResponse::Ok().json(sorted(&RunView::new(run, Some(steps_seen)).with_rollup(rollup))?))
}

/// `POST /v1/runs/{id}/steps`.
pub async fn step(
    state: State,
    req: HttpRequest,
    id: Path<String>,
    payload: Payload,
) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Worker)?;
    let run_id = run_id(&id)?;
    let body = state.body(&req, payload).await?;
    let limits = &state.shared.config.limits.step;
    let mut parsed = Some(StepCall::from_json(&body, limits)?);
    let key = RunKey { tenant: caller.tenant, run_id };
    // The parsed call goes to the run as it is; only a retry after a closed mailbox (rare) parses it again.
    let step = || match parsed.take() {
        Some(call) => Ok(Step(Box::new(call))),
        None => Ok(Step(Box::new(StepCall::from_json(&body, limits)?))),
    };
    let decided = call_run(&state, key, step).await?;
    crate::http::access_log::decided(&req, decided.decision_id.as_str());
    Ok(HttpResponse::Ok().insert_header(ContentType::json()).body(decided.json))
}

/// `POST /v1/runs/{id}/end`.
pub async fn end(state: State, req: HttpRequest, id: Path<String>, payload: Payload) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Worker)?;
    let run_id = run_id(&id)?;
    let body: EndBody = state.json(&req, payload).await?;
    if let Some(error) = &body.error {
        error.validate(&state.shared.config.limits.step)?;
    }
    let key = RunKey { tenant: caller.tenant, run_id };
    let (outcome, error) = (body.outcome, body.error);
    let ended = call_run(&state, key.clone(), || Ok(EndRun { outcome, error: error.clone() })).await?;
    let rollup = match ended.rollup {
        Some(rollup) => rollup,
        None => state.shared.read(move |store| store.run_rollup(&key.tenant, &key.run_id)).await?,
    };
    let view = RunEnded { run: RunView::new(*ended.run, None).with_rollup(rollup), incident_id: ended.incident_id };
    Ok(HttpResponse::Ok().json(sorted(&view)?))
}

/// `GET /v1/runs/{id}/decisions`.
pub async fn decisions(state: State, req: HttpRequest, id: Path<String>) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Operator)?;
    let run_id = run_id(&id)?;
    let page = query::<PageQuery>(&req)?.page()?;
    let tenant = caller.tenant.clone();
    let lookup = run_id.clone();
    list_page(&state, &caller.tenant, move |store| {
        if store.get_run(&tenant, &lookup).map_err(store_error)?.is_none() {
            return Err(ApiError::not_found("run", lookup.as_str()));
        }
        let ledger = store.ledger(&tenant, &lookup, &page).map_err(store_error)?;
        let decisions = ledger.items.into_iter().map(|entry| entry.decision).collect();
        Ok(runguard_store::Page { items: decisions, next_cursor: ledger.next_cursor })
    })
    .await
}
