//! Prevention records (list, get, regret) and snapshots.

use actix_web::web::{Path, Payload};
use actix_web::{HttpRequest, HttpResponse};
use runguard_contract::{RecordId, SnapshotId, Timestamp};
use runguard_store::RecordQuery;
use schemars::JsonSchema;
use serde::Deserialize;

use crate::actors::learning::RegretRecord;
use crate::auth::Role;
use crate::error::ApiError;
use crate::http::errors::store_error;
use crate::http::views::{SnapshotView, sorted};
use crate::http::{PageQuery, State, list_page, query};

/// The query of `GET /v1/prevention-records`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RecordsQuery {
    /// Only this policy's records.
    #[schemars(with = "Option<runguard_contract::PolicyId>")]
    policy_id: Option<String>,
    /// Only this run's records.
    #[schemars(with = "Option<runguard_contract::RunId>")]
    run_id: Option<String>,
    /// Prevented at or after (RFC 3339).
    #[schemars(with = "Option<Timestamp>")]
    since: Option<String>,
    /// Prevented before (RFC 3339).
    #[schemars(with = "Option<Timestamp>")]
    until: Option<String>,
    /// Simulated records (`true`) instead of live ones (default `false`).
    #[schemars(with = "Option<bool>")]
    simulated: Option<String>,
    /// At most this many (1–1000, default 100).
    #[schemars(with = "Option<u32>", range(min = 1, max = 1000))]
    limit: Option<String>,
    /// From a previous page's `next_cursor`; opaque: a cursor the list did not give is refused (400).
    #[schemars(length(min = 1))]
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
    list_page(&state, &caller.tenant, move |store| store.list_records(&records).map_err(store_error)).await
}

/// `GET /v1/prevention-records/{id}`.
pub async fn get(state: State, req: HttpRequest, id: Path<String>) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Operator)?;
    let record_id = RecordId::new(id.as_str()).map_err(|_| ApiError::not_found("prevention record", &id))?;
    let tenant = caller.tenant.clone();
    let found = state.shared.read(move |store| store.get_record(&tenant, &record_id)).await?;
    Ok(HttpResponse::Ok().json(found.ok_or_else(|| ApiError::not_found("prevention record", &id))?))
}

/// The body of `POST /v1/prevention-records/{id}/regret`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RegretBody {
    /// How bad the false positive was.
    #[schemars(range(min = 1, max = 10))]
    severity: u8,
    /// Free text.
    #[serde(default)]
    note: Option<String>,
}

/// `POST /v1/prevention-records/{id}/regret`: marks the record a false positive (once).
pub async fn regret(
    state: State,
    req: HttpRequest,
    id: Path<String>,
    payload: Payload,
) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Operator)?;
    let record_id = RecordId::new(id.as_str()).map_err(|_| ApiError::not_found("prevention record", &id))?;
    let body: RegretBody = state.json(&req, payload).await?;
    if !(1..=10).contains(&body.severity) {
        return Err(ApiError::bad_request("severity", format!("is {}; severities are 1–10", body.severity)));
    }
    let longest = state.shared.config.limits.note_len;
    if body.note.as_ref().is_some_and(|n| n.len() > longest) {
        return Err(ApiError::bad_request("note", format!("is longer than {longest} bytes")));
    }
    let answer = state
        .learn(RegretRecord {
            tenant: caller.tenant,
            record_id,
            severity: body.severity,
            note: body.note,
            caller: caller.name,
        })
        .await?;
    Ok(HttpResponse::Created().json(answer))
}

/// `GET /v1/snapshots/{id}`: readable by a tenant one of whose runs is bound to it (`docs/api.md`); admins read
/// any. Access is settled from the (tenant, snapshot) binding index before the snapshot is loaded, so an
/// id bound only to other tenants answers 404 as fast as an unknown one.
pub async fn snapshot(state: State, req: HttpRequest, id: Path<String>) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Operator)?;
    let snapshot_id = SnapshotId::new(id.as_str()).map_err(|_| ApiError::not_found("snapshot", &id))?;
    let stored_id = snapshot_id.clone();
    let admin = caller.role == Role::Admin;
    let tenant = caller.tenant.clone();
    let found = state
        .shared
        .read(move |store| {
            if !admin && !store.snapshot_bound_to(&tenant, &snapshot_id)? {
                return Ok(None);
            }
            store.snapshot_by_id(&snapshot_id)
        })
        .await?;
    let stored = found.ok_or_else(|| ApiError::not_found("snapshot", &id))?;
    let view = match stored.snapshot {
        Ok(snapshot) => SnapshotView {
            hash: stored.hash,
            id: stored_id,
            policy_count: Some(u64::try_from(snapshot.policies.len()).unwrap_or(u64::MAX)),
            policies: Some(snapshot.policies),
            problem: None,
            verified: true,
        },
        Err(err) => SnapshotView {
            hash: stored.hash,
            id: stored_id,
            policies: None,
            policy_count: None,
            problem: Some(err.to_string()),
            verified: false,
        },
    };
    Ok(HttpResponse::Ok().json(sorted(&view)?))
}
