//! `GET /v1/policies/{id}/usage`: the caller's tenant's usage of a tenant-period budget in the current
//! period (`docs/api.md`).

use actix_web::web::Path;
use actix_web::{HttpRequest, HttpResponse};
use runguard_contract::{BudgetPeriod, PolicyId, Timestamp};
use schemars::JsonSchema;
use serde::Serialize;

use crate::auth::Role;
use crate::error::ApiError;
use crate::http::State;
use crate::http::views::sorted;
use crate::shared::now;

/// A tenant-period budget's usage by the caller's tenant.
#[derive(Debug, Serialize, JsonSchema)]
#[schemars(rename = "PolicyUsage")]
pub struct PolicyUsageView {
    /// The budget's limit (inclusive).
    pub max: u64,
    /// `day` or `month` (UTC calendar).
    pub period: BudgetPeriod,
    /// The start of the current period.
    pub period_start: Timestamp,
    /// What the tenant used in it: tokens, micro-USD or steps, as the budget counts.
    pub used: u64,
}

/// `GET /v1/policies/{id}/usage`: 404 for a policy the caller cannot see (unknown, or another tenant's),
/// 409 `not_a_tenant_budget` for a policy that is not a `per: "tenant"` budget.
pub async fn usage(state: State, req: HttpRequest, id: Path<String>) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Worker)?;
    let id = PolicyId::new(id.as_str()).map_err(|_| ApiError::not_found("policy", id.as_str()))?;
    let (tenant, lookup) = (caller.tenant.clone(), id.clone());
    let at = now();
    let found = state
        .shared
        .read(move |store| {
            let Some(policy) = store.find_policy(&tenant, &lookup, None)? else { return Ok(None) };
            // A global policy's usage is the caller's tenant's own (each tenant counts separately).
            crate::tenant_state::usage(store, &tenant, &policy, at).map(|usage| Some(usage.ok_or(policy.id)))
        })
        .await?;
    match found {
        None => Err(ApiError::not_found("policy", id.as_str())),
        Some(Err(policy)) => Err(ApiError::conflict(
            "not_a_tenant_budget",
            format!("policy `{policy}` is not a tenant-period budget (`per: \"tenant\"` with a `period`)"),
        )),
        Some(Ok(usage)) => Ok(HttpResponse::Ok().json(sorted(&PolicyUsageView {
            max: usage.max,
            period: usage.period,
            period_start: usage.period_start,
            used: usage.used,
        })?)),
    }
}
