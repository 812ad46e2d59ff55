//! The learning loop over HTTP: incidents, patterns, proposals, tenant graduation and simulation.

use actix_web::web::{Path, Payload};
use actix_web::{HttpRequest, HttpResponse};
use std::collections::HashMap;

use runguard_contract::{IncidentId, PatternId, PreventionRecord, RecordId, RunId, Snapshot};
use runguard_engine::CompiledSnapshot;
use runguard_store::WriteBatch;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;

use crate::actors::learning::{Propose, TenantGraduation};
use crate::auth::Role;
use crate::error::ApiError;
use crate::http::errors::store_error;
use crate::http::views::{Simulation, sorted};
use crate::http::{PageQuery, State, list_page, query};
use crate::shared::now;
use crate::simulation;

/// Most runs and candidate policies in one simulation.
const MAX_SIMULATED_RUNS: usize = 100;
const MAX_CANDIDATES: usize = 100;

/// `GET /v1/incidents`.
pub async fn incidents(state: State, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Operator)?;
    let page = query::<PageQuery>(&req)?.page()?;
    let tenant = caller.tenant.clone();
    list_page(&state, &caller.tenant, move |store| store.list_incidents(&tenant, &page).map_err(store_error)).await
}

/// `GET /v1/patterns`.
pub async fn patterns(state: State, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Operator)?;
    let page = query::<PageQuery>(&req)?.page()?;
    let tenant = caller.tenant.clone();
    list_page(&state, &caller.tenant, move |store| store.list_patterns(&tenant, &page).map_err(store_error)).await
}

fn pattern_id(raw: &str) -> Result<PatternId, ApiError> {
    PatternId::new(raw).map_err(|_| ApiError::not_found("pattern", raw))
}

/// `GET /v1/incidents/{id}`: the incident a failed run's end named.
pub async fn incident(state: State, req: HttpRequest, id: Path<String>) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Operator)?;
    let incident_id = IncidentId::new(id.as_str()).map_err(|_| ApiError::not_found("incident", &id))?;
    let found = state.shared.read(move |store| store.get_incident(&caller.tenant, &incident_id)).await?;
    Ok(HttpResponse::Ok().json(found.ok_or_else(|| ApiError::not_found("incident", &id))?))
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
    let policy = state.learn(Propose { tenant: caller.tenant, pattern_id, caller: caller.name }).await?;
    Ok(HttpResponse::Created().json(policy))
}

/// `GET /v1/graduation`: the tenant's level, gates and history.
pub async fn graduation(state: State, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Operator)?;
    let view = state.learn(TenantGraduation { tenant: caller.tenant }).await?;
    Ok(HttpResponse::Ok().json(view))
}

/// The body of `POST /v1/simulate`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SimulateBody {
    /// Candidate policy documents (tenant scope; at most 100).
    #[schemars(schema_with = "candidate_documents")]
    policies: Vec<Value>,
    /// The runs to replay (1–100, no repeats).
    #[schemars(with = "Vec<RunId>", length(min = 1, max = 100), extend("uniqueItems" = true))]
    run_ids: Vec<String>,
    /// Store the simulated records (`is_simulated: true`).
    #[serde(default)]
    persist: bool,
}

/// Candidates are tenant policies: documents whose `scope` can only be `tenant`.
fn candidate_documents(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut document = generator.subschema_for::<runguard_contract::PolicyDocument>();
    if let Some(scope) = document.get_mut("properties").and_then(Value::as_object_mut) {
        scope.insert("scope".into(), serde_json::json!({ "const": "tenant", "default": "tenant" }));
    }
    schemars::json_schema!({ "type": "array", "maxItems": MAX_CANDIDATES, "items": document })
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
    let mut run_ids: Vec<RunId> = Vec::with_capacity(body.run_ids.len());
    for (i, raw) in body.run_ids.iter().enumerate() {
        let run_id =
            RunId::new(raw.as_str()).map_err(|e| ApiError::bad_request(&format!("run_ids[{i}]"), e.message()))?;
        // A run replayed twice would answer (and persist) the same simulated records twice.
        if run_ids.contains(&run_id) {
            return Err(ApiError::bad_request(&format!("run_ids[{i}]"), format!("repeats run `{run_id}`")));
        }
        run_ids.push(run_id);
    }
    let (tenant, persist, docs) = (caller.tenant.clone(), body.persist, body.policies);
    // Validating and compiling the candidates, reading the runs and replaying them is blocking and CPU
    // work: all of it on the blocking pool, in the tenant's lane.
    let (hash, mut results, batch) = state
        .shared
        .heavy(&caller.tenant, move |shared| {
            let limits = &shared.config.limits.policy;
            let policies = simulation::candidates(docs, &tenant, limits, now())?;
            let snapshot = Snapshot::capture(&tenant, &policies);
            let candidate =
                std::sync::Arc::new(CompiledSnapshot::compile(&snapshot, limits).map_err(|_| ApiError::internal())?);
            let mut results = Vec::with_capacity(run_ids.len());
            let mut batch = WriteBatch::new();
            for run_id in &run_ids {
                let run = shared
                    .store
                    .get_run(&tenant, run_id)
                    .map_err(store_error)?
                    .ok_or_else(|| ApiError::not_found("run", run_id.as_str()))?;
                let ledger = shared.store.full_ledger(&tenant, run_id).map_err(store_error)?;
                let (result, records) =
                    simulation::simulate(&candidate, &simulation::RecordedRun::from_ledger(&run, &ledger));
                if persist {
                    for record in records {
                        batch.append_simulated_record(record);
                    }
                }
                results.push(result);
            }
            Ok::<_, ApiError>((candidate.hash().clone(), results, batch))
        })
        .await?;
    if persist && !batch.is_empty() {
        let receipt = state.shared.commit(batch).await?;
        let sealed: HashMap<RecordId, PreventionRecord> =
            receipt.records.into_iter().map(|record| (record.id.clone(), record)).collect();
        // Answer the records as stored: sealed into the chain with their `seq`, `prev_hash` and `hash`.
        for result in &mut results {
            if let Some(records) = result.get_mut("records").and_then(Value::as_array_mut) {
                for record in records.iter_mut() {
                    let id = record.get("id").and_then(Value::as_str).unwrap_or_default();
                    if let Some(stored) = RecordId::new(id).ok().and_then(|id| sealed.get(&id)) {
                        *record = serde_json::to_value(stored).map_err(|_| ApiError::internal())?;
                    }
                }
            }
        }
    }
    Ok(HttpResponse::Ok().json(sorted(&Simulation { candidate_snapshot_hash: hash, results })?))
}
