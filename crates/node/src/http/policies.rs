//! Policies: create, list, get, update, mode, confirm, audit, shadow statistics, graduation.

use actix_web::web::{Path, Payload};
use actix_web::{HttpRequest, HttpResponse};
use runguard_contract::{Mode, Policy, PolicyDocument, PolicyId, Scope, TenantId};
use runguard_store::{StoreErrorKind, WriteBatch};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::actors::learning::{Confirm, preventions};
use crate::auth::{Caller, Role};
use crate::error::ApiError;
use crate::http::errors::store_error;
use crate::http::views::{PolicyGraduationView, ShadowStats, sorted};
use crate::http::{PageQuery, State, list_page, query};
use crate::node_error::NodeError;
use crate::policy_change::{Approval, PolicyChange, id_taken, id_taken_error};
use crate::shared::now;

fn policy_id(raw: &str) -> Result<PolicyId, ApiError> {
    PolicyId::new(raw).map_err(|_| ApiError::not_found("policy", raw))
}

/// The caller's view of a policy: its own, else a global one.
async fn current(state: &State, caller: &Caller, id: &PolicyId, version: Option<u32>) -> Result<Policy, ApiError> {
    let (tenant, lookup) = (caller.tenant.clone(), id.clone());
    state
        .shared
        .read(move |store| store.find_policy(&tenant, &lookup, version))
        .await?
        .ok_or_else(|| ApiError::not_found("policy", id.as_str()))
}

/// Changing a global policy needs an admin.
fn may_change(caller: &Caller, policy: &Policy) -> Result<(), ApiError> {
    if policy.scope == Scope::Global {
        caller.require(Role::Admin)?;
    }
    Ok(())
}

/// Compiles the document's regexes and CEL to validate it: CPU work, so off the HTTP worker.
async fn validated(doc: PolicyDocument, state: &State) -> Result<PolicyDocument, ApiError> {
    state
        .shared
        .blocking(move |shared| {
            runguard_engine::validate_document(&doc, &shared.config.limits.policy)?;
            Ok(doc)
        })
        .await
}

/// `POST /v1/policies`.
pub async fn create(state: State, req: HttpRequest, payload: Payload) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Operator)?;
    let body = state.body(&req, payload).await?;
    let doc = validated(PolicyDocument::from_json(&body, &state.shared.config.limits.policy)?, &state).await?;
    let owner: Option<TenantId> = match doc.scope {
        Scope::Global => {
            caller.require(Role::Admin).map_err(|_| ApiError::forbidden("only admins create global policies"))?;
            None
        }
        Scope::Tenant => Some(caller.tenant.clone()),
    };
    let id = doc.id.clone().unwrap_or_else(|| PolicyId::from_u128(uuid::Uuid::now_v7().as_u128()));
    let limit = state.shared.config.limits.policies_per_tenant;
    let (lookup_owner, lookup_id, tenant) = (owner.clone(), id.clone(), caller.tenant.clone());
    let (exists, taken, count) = state
        .shared
        .read(move |store| {
            let exists = store.get_policy(lookup_owner.as_ref(), &lookup_id, None)?.is_some();
            let taken = id_taken(store, lookup_owner.as_ref(), &lookup_id)?;
            // The tenant's own policies, across every page (global ones are listed with them but do not count).
            let own = runguard_store::all_pages(|page| store.list_policies(&tenant, None, page))?
                .into_iter()
                .filter(|p| p.tenant_id.as_ref() == Some(&tenant))
                .count();
            Ok((exists, taken, own))
        })
        .await?;
    if exists {
        return Err(ApiError::conflict("policy_exists", format!("policy `{id}` already exists; update it with PUT")));
    }
    if taken {
        return Err(id_taken_error(&id).into());
    }
    if owner.is_some() && count >= limit {
        return Err(ApiError::conflict("policy_limit", format!("a tenant may have at most {limit} policies")));
    }
    let approval = Approval::manual(caller.name.clone(), Some("created".into()));
    let mut batch = WriteBatch::new();
    let policy = PolicyChange::create(doc, id, owner.clone(), approval, now()).write(&mut batch);
    if let Err(err) = state.shared.commit(batch).await {
        // The store refuses a creation that lost a race to another policy with this id; name which.
        if let NodeError::Store(refusal) = &err
            && matches!(refusal.kind(), StoreErrorKind::Conflict | StoreErrorKind::NotFound)
        {
            let (lookup_owner, lookup_id) = (owner, policy.id.clone());
            let taken = state.shared.read(move |store| id_taken(store, lookup_owner.as_ref(), &lookup_id)).await?;
            if taken {
                return Err(id_taken_error(&policy.id).into());
            }
            return Err(ApiError::conflict(
                "policy_exists",
                format!("policy `{}` already exists; update it with PUT", policy.id),
            ));
        }
        return Err(err.into());
    }
    tracing::info!(policy_id = %policy.id, caller = %caller.name, mode = policy.mode.as_str(), "policy created");
    Ok(HttpResponse::Created().json(policy))
}

/// The query of `GET /v1/policies`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only policies in this mode.
    mode: Option<Mode>,
    /// At most this many (1–1000, default 100).
    #[schemars(with = "Option<u32>", range(min = 1, max = 1000))]
    limit: Option<String>,
    /// From a previous page's `next_cursor`; opaque: a cursor the list did not give is refused (400).
    #[schemars(length(min = 1))]
    cursor: Option<String>,
}

/// `GET /v1/policies`.
pub async fn list(state: State, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Operator)?;
    let q: ListQuery = query(&req)?;
    let page = PageQuery { limit: q.limit, cursor: q.cursor }.page()?;
    let tenant = caller.tenant.clone();
    list_page(&state, &caller.tenant, move |store| store.list_policies(&tenant, q.mode, &page).map_err(store_error))
        .await
}

/// The query of `GET /v1/policies/{id}`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VersionQuery {
    /// An older version than the current one.
    #[schemars(with = "Option<u32>", range(min = 1))]
    version: Option<String>,
}

/// `GET /v1/policies/{id}`.
pub async fn get(state: State, req: HttpRequest, id: Path<String>) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Operator)?;
    let id = policy_id(&id)?;
    let q: VersionQuery = query(&req)?;
    let version = match q.version {
        None => None,
        Some(text) => Some(
            text.parse::<u32>()
                .ok()
                .filter(|v| *v > 0)
                .ok_or_else(|| ApiError::bad_request("version", format!("`{text}` is not a positive whole number")))?,
        ),
    };
    Ok(HttpResponse::Ok().json(current(&state, &caller, &id, version).await?))
}

/// `PUT /v1/policies/{id}`: the body is a policy document plus `expected_version`.
pub async fn update(
    state: State,
    req: HttpRequest,
    id: Path<String>,
    payload: Payload,
) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Operator)?;
    let id = policy_id(&id)?;
    let mut body: Value = state.json(&req, payload).await?;
    let expected = match body.as_object_mut().and_then(|o| o.remove("expected_version")) {
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| ApiError::bad_request("expected_version", "must be a positive whole number"))?,
        Some(_) => return Err(ApiError::bad_request("expected_version", "must be a positive whole number")),
        None => return Err(ApiError::bad_request("expected_version", "is required: the version this update replaces")),
    };
    let doc = validated(PolicyDocument::from_value(body, &state.shared.config.limits.policy)?, &state).await?;
    let existing = current(&state, &caller, &id, None).await?;
    may_change(&caller, &existing)?;
    if doc.id.as_ref().is_some_and(|doc_id| doc_id != &id) {
        return Err(ApiError::bad_request("id", "does not match the policy in the path"));
    }
    if doc.scope != existing.scope {
        return Err(ApiError::bad_request("scope", "cannot change; create a new policy instead"));
    }
    if expected != existing.version {
        return Err(ApiError::conflict(
            "version_conflict",
            format!("the policy is at version {}, not {expected}", existing.version),
        )
        .with_details(json!({ "current_version": existing.version })));
    }
    let approval = Approval::manual(caller.name.clone(), Some("updated".into()));
    let mut batch = WriteBatch::new();
    let next = PolicyChange::update(&existing, doc, approval, now()).write(&mut batch);
    state.shared.commit(batch).await?;
    Ok(HttpResponse::Ok().json(next))
}

/// The body of `POST /v1/policies/{id}/mode`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModeBody {
    /// The new mode.
    mode: Mode,
    /// Why (kept in the audit).
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /v1/policies/{id}/mode`.
pub async fn set_mode(
    state: State,
    req: HttpRequest,
    id: Path<String>,
    payload: Payload,
) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Operator)?;
    let id = policy_id(&id)?;
    let body: ModeBody = state.json(&req, payload).await?;
    let longest = state.shared.config.limits.reason_len;
    if body.reason.as_ref().is_some_and(|r| r.len() > longest) {
        return Err(ApiError::bad_request("reason", format!("is longer than {longest} bytes")));
    }
    let existing = current(&state, &caller, &id, None).await?;
    may_change(&caller, &existing)?;
    if existing.mode == body.mode {
        return Ok(HttpResponse::Ok().json(existing));
    }
    let approval = Approval::manual(caller.name.clone(), body.reason);
    let mut batch = WriteBatch::new();
    let next = PolicyChange::mode(&existing, body.mode, approval, now()).write(&mut batch);
    state.shared.commit(batch).await?;
    tracing::info!(policy_id = %next.id, caller = %caller.name, from = existing.mode.as_str(), to = next.mode.as_str(), "policy mode changed");
    Ok(HttpResponse::Ok().json(next))
}

/// `POST /v1/policies/{id}/confirm`: one operator's confirmation; the required number (by distinct
/// callers) activates a shadow or pending policy. Never revives a disabled one (409).
pub async fn confirm(state: State, req: HttpRequest, id: Path<String>) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Operator)?;
    let policy_id = policy_id(&id)?;
    let msg = Confirm {
        tenant: caller.tenant.clone(),
        policy_id,
        caller: caller.name.clone(),
        admin: caller.role == Role::Admin,
    };
    Ok(HttpResponse::Ok().json(state.learn(msg).await?))
}

/// `GET /v1/policies/{id}/versions`: every version, oldest first; the cursor is the last version seen.
pub async fn versions(state: State, req: HttpRequest, id: Path<String>) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Operator)?;
    let id = policy_id(&id)?;
    let page = query::<PageQuery>(&req)?.page()?;
    let after = match page.cursor.as_deref() {
        None => 0,
        Some(raw) => raw
            .parse::<u32>()
            .map_err(|_| ApiError::bad_request("cursor", format!("`{raw}` is not a cursor this list gave")))?,
    };
    let policy = current(&state, &caller, &id, None).await?;
    let owner = policy.tenant_id.clone();
    list_page(&state, &caller.tenant, move |store| {
        let later = store.policy_versions(owner.as_ref(), &policy.id).map_err(store_error)?;
        let mut items: Vec<Policy> = later.into_iter().filter(|p| p.version > after).collect();
        let next_cursor = (items.len() > page.limit).then(|| {
            items.truncate(page.limit);
            items.last().map(|p| p.version.to_string())
        });
        Ok(runguard_store::Page { items, next_cursor: next_cursor.flatten() })
    })
    .await
}

/// `GET /v1/policies/{id}/audit`.
pub async fn audit(state: State, req: HttpRequest, id: Path<String>) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Operator)?;
    let id = policy_id(&id)?;
    let page = query::<PageQuery>(&req)?.page()?;
    let policy = current(&state, &caller, &id, None).await?;
    let owner = policy.tenant_id.clone();
    list_page(&state, &caller.tenant, move |store| {
        store.policy_audit(owner.as_ref(), &policy.id, &page).map_err(store_error)
    })
    .await
}

/// `GET /v1/policies/{id}/shadow-stats`.
pub async fn shadow_stats(state: State, req: HttpRequest, id: Path<String>) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Operator)?;
    let policy = current(&state, &caller, &policy_id(&id)?, None).await?;
    let (owner, pid, tenant) = (policy.tenant_id.clone(), policy.id.clone(), caller.tenant.clone());
    // A global policy's statistics count only the caller's tenant's runs (`docs/policies.md`).
    let stats = state.shared.read(move |store| store.shadow_stats(owner.as_ref(), &pid, &tenant)).await?;
    Ok(HttpResponse::Ok().json(sorted(&ShadowStats {
        evaluations: stats.evaluations,
        mode: policy.mode,
        policy_id: policy.id,
        would_block: stats.would_block,
        would_throttle: stats.would_throttle,
        would_warn: stats.would_warn,
    })?))
}

/// `GET /v1/policies/{id}/graduation`: the prevention gate for one policy (`docs/learning-loop.md`).
pub async fn graduation(state: State, req: HttpRequest, id: Path<String>) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Operator)?;
    let policy = current(&state, &caller, &policy_id(&id)?, None).await?;
    let mut query = runguard_store::RecordQuery::tenant(caller.tenant.clone());
    query.policy_id = Some(policy.id.clone());
    query.since = policy.activated_at;
    let records = state
        .shared
        .read(move |store| {
            let records = runguard_store::all_pages(|page| {
                query.page = page.clone();
                store.list_records(&query)
            })?;
            // A block by an evaluation error was a fault, not a prevention (`docs/learning-loop.md`).
            preventions(store, records)
        })
        .await?;
    Ok(HttpResponse::Ok()
        .json(PolicyGraduationView::from(runguard_engine::learning::policy_graduation(&policy, &records))))
}
