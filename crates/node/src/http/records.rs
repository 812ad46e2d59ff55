//! Prevention records, snapshots, and the learning-loop endpoints of a later milestone.

use actix_web::web::Path;
use actix_web::{HttpRequest, HttpResponse};
use runguard_contract::{RecordId, Scope, SnapshotId, Timestamp};
use runguard_store::RecordQuery;
use serde::Deserialize;
use serde_json::json;

use crate::auth::Role;
use crate::error::ApiError;
use crate::http::{PageQuery, State, page_of, query};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordsQuery {
    policy_id: Option<String>,
    run_id: Option<String>,
    since: Option<String>,
    until: Option<String>,
    simulated: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

fn time(field: &str, text: Option<String>) -> Result<Option<Timestamp>, ApiError> {
    text.map(|t| Timestamp::parse(&t).map_err(|e| ApiError::bad_request(field, e.message()))).transpose()
}

/// `GET /v1/prevention-records`.
pub async fn list(state: State, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Operator)?;
    let q: RecordsQuery = query(&req)?;
    let mut records = RecordQuery::tenant(caller.tenant.clone());
    records.page = PageQuery { limit: q.limit, cursor: q.cursor }.page()?;
    records.policy_id = q
        .policy_id
        .map(|p| runguard_contract::PolicyId::new(p).map_err(|e| ApiError::bad_request("policy_id", e.message())))
        .transpose()?;
    records.run_id = q
        .run_id
        .map(|r| runguard_contract::RunId::new(r).map_err(|e| ApiError::bad_request("run_id", e.message())))
        .transpose()?;
    records.since = time("since", q.since)?;
    records.until = time("until", q.until)?;
    records.simulated = match q.simulated.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => return Err(ApiError::bad_request("simulated", format!("`{other}` is not `true` or `false`"))),
    };
    let found = state.shared.read(move |store| store.list_records(&records)).await?;
    Ok(page_of(&found.items, found.next_cursor))
}

/// `GET /v1/prevention-records/{id}`.
pub async fn get(state: State, req: HttpRequest, id: Path<String>) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Operator)?;
    let record_id = RecordId::new(id.as_str()).map_err(|_| ApiError::not_found("prevention record", &id))?;
    let tenant = caller.tenant.clone();
    let found = state.shared.read(move |store| store.get_record(&tenant, &record_id)).await?;
    Ok(HttpResponse::Ok().json(found.ok_or_else(|| ApiError::not_found("prevention record", &id))?))
}

/// `POST /v1/prevention-records/{id}/regret` (learning loop).
pub async fn regret(state: State, req: HttpRequest, id: Path<String>) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Operator)?;
    let record_id = RecordId::new(id.as_str()).map_err(|_| ApiError::not_found("prevention record", &id))?;
    let tenant = caller.tenant.clone();
    if state.shared.read(move |store| store.get_record(&tenant, &record_id)).await?.is_none() {
        return Err(ApiError::not_found("prevention record", &id));
    }
    Err(ApiError::not_implemented("regrets (learning loop)"))
}

/// `GET /v1/snapshots/{id}`: readable when every tenant-scoped policy in it is the caller's (a snapshot
/// of only global policies reveals nothing an operator cannot read anyway); admins read any.
pub async fn snapshot(state: State, req: HttpRequest, id: Path<String>) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Operator)?;
    let snapshot_id = SnapshotId::new(id.as_str()).map_err(|_| ApiError::not_found("snapshot", &id))?;
    let found = state.shared.read(move |store| store.snapshot_by_id(&snapshot_id)).await?;
    let stored = found.ok_or_else(|| ApiError::not_found("snapshot", &id))?;
    match &stored.snapshot {
        Ok(snapshot) => {
            let foreign = snapshot
                .policies
                .iter()
                .any(|p| p.scope == Scope::Tenant && p.tenant_id.as_ref() != Some(&caller.tenant));
            if foreign && caller.role != Role::Admin {
                return Err(ApiError::not_found("snapshot", &id));
            }
            Ok(HttpResponse::Ok().json(json!({
                "id": id.as_str(),
                "hash": stored.hash,
                "verified": true,
                "policy_count": snapshot.policies.len(),
                "policies": snapshot.policies,
            })))
        }
        Err(err) => {
            if caller.role != Role::Admin {
                // Ownership cannot be established for a snapshot that does not verify.
                return Err(ApiError::not_found("snapshot", &id));
            }
            Ok(HttpResponse::Ok().json(json!({
                "id": id.as_str(), "hash": stored.hash, "verified": false, "problem": err.to_string(),
            })))
        }
    }
}

/// Incidents, patterns, proposals, tenant graduation and simulation: the learning-loop milestone.
pub async fn learning_loop(state: State, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    state.caller(&req, Role::Operator)?;
    Err(ApiError::not_implemented(&format!("`{}` (learning loop)", req.path())))
}
