//! The learning loop over HTTP: incidents, patterns, proposals, tenant graduation and simulation.

use actix_web::web::{Path, Payload};
use actix_web::{HttpRequest, HttpResponse};
use runguard_contract::{PatternId, RunId, Snapshot};
use runguard_engine::CompiledSnapshot;
use runguard_store::{LedgerEntry, StoredRun, WriteBatch};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::actors::learning::{Propose, TenantGraduation};
use crate::auth::Role;
use crate::error::ApiError;
use crate::http::{PageQuery, State, page_of, query};
use crate::shared::now;
use crate::simulation;

/// Most runs and candidate policies in one simulation.
const MAX_SIMULATED_RUNS: usize = 100;
const MAX_CANDIDATES: usize = 100;

/// `GET /v1/incidents`.
pub async fn incidents(state: State, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Operator)?;
    let page = query::<PageQuery>(&req)?.page()?;
    let found = state.shared.read(move |store| store.list_incidents(&caller.tenant, &page)).await?;
    Ok(page_of(&found.items, found.next_cursor))
}

/// `GET /v1/patterns`.
pub async fn patterns(state: State, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Operator)?;
    let page = query::<PageQuery>(&req)?.page()?;
    let found = state.shared.read(move |store| store.list_patterns(&caller.tenant, &page)).await?;
    Ok(page_of(&found.items, found.next_cursor))
}

fn pattern_id(raw: &str) -> Result<PatternId, ApiError> {
    PatternId::new(raw).map_err(|_| ApiError::not_found("pattern", raw))
}

/// `GET /v1/patterns/{id}`.
pub async fn pattern(state: State, req: HttpRequest, id: Path<String>) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Operator)?;
    let pattern_id = pattern_id(&id)?;
    let found = state.shared.read(move |store| store.get_pattern(&caller.tenant, &pattern_id)).await?;
    Ok(HttpResponse::Ok().json(found.ok_or_else(|| ApiError::not_found("pattern", &id))?))
}

/// `POST /v1/patterns/{id}/propose`: creates the pattern's policy in shadow mode.
pub async fn propose(state: State, req: HttpRequest, id: Path<String>) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Operator)?;
    let pattern_id = pattern_id(&id)?;
    let policy = state.shared.learn(Propose { tenant: caller.tenant, pattern_id, caller: caller.name }).await??;
    Ok(HttpResponse::Created().json(policy))
}

/// `GET /v1/graduation`: the tenant's level, gates and history.
pub async fn graduation(state: State, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Operator)?;
    let view = state.shared.learn(TenantGraduation { tenant: caller.tenant }).await??;
    Ok(HttpResponse::Ok().json(view))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SimulateBody {
    policies: Vec<Value>,
    run_ids: Vec<String>,
    #[serde(default)]
    persist: bool,
}

/// `POST /v1/simulate`.
pub async fn simulate(state: State, req: HttpRequest, payload: Payload) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Operator)?;
    let body: SimulateBody = state.json(&req, payload).await?;
    if body.policies.len() > MAX_CANDIDATES {
        return Err(ApiError::bad_request("policies", format!("at most {MAX_CANDIDATES} candidate policies")));
    }
    if body.run_ids.is_empty() || body.run_ids.len() > MAX_SIMULATED_RUNS {
        return Err(ApiError::bad_request("run_ids", format!("give 1–{MAX_SIMULATED_RUNS} run ids")));
    }
    let limits = state.shared.config.limits.policy.clone();
    let policies = simulation::candidates(body.policies, &caller.tenant, &limits, now())?;
    let snapshot = Snapshot::capture(&caller.tenant, &policies);
    let candidate = CompiledSnapshot::compile(&snapshot, &limits).map_err(|_| ApiError::internal())?;
    let mut run_ids = Vec::with_capacity(body.run_ids.len());
    for (i, raw) in body.run_ids.iter().enumerate() {
        run_ids
            .push(RunId::new(raw.as_str()).map_err(|e| ApiError::bad_request(&format!("run_ids[{i}]"), e.message()))?);
    }
    let tenant = caller.tenant.clone();
    let runs: Vec<(StoredRun, Vec<LedgerEntry>)> = state
        .shared
        .read(move |store| {
            let mut out = Vec::new();
            for run_id in &run_ids {
                let Some(run) = store.get_run(&tenant, run_id)? else { continue };
                let ledger = store.full_ledger(&tenant, run_id)?;
                out.push((run, ledger));
            }
            Ok(out)
        })
        .await?;
    if runs.len() != body.run_ids.len() {
        let missing = body.run_ids.iter().find(|id| !runs.iter().any(|(r, _)| r.run_id.as_str() == id.as_str()));
        return Err(ApiError::not_found("run", missing.map_or("", String::as_str)));
    }
    let mut results = Vec::new();
    let mut batch = WriteBatch::new();
    for (run, ledger) in runs {
        let recorded = simulation::RecordedRun::from_ledger(&run, &ledger);
        let (result, records) = simulation::simulate(&candidate, &recorded);
        if body.persist {
            for record in records {
                batch.append_simulated_record(record);
            }
        }
        results.push(result);
    }
    if body.persist && !batch.is_empty() {
        state.shared.commit(batch).await?;
    }
    Ok(HttpResponse::Ok().json(json!({ "candidate_snapshot_hash": candidate.hash(), "results": results })))
}
