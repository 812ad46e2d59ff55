//! The learning actor: one per node, on its own arbiter, so that every read-modify-write of the learning
//! loop (incident → pattern, proposal, confirmation, regret → demotion, tenant graduation) happens one
//! at a time. Its reads block only its own thread; its writes go through the writer.

use std::sync::Arc;

use actix::prelude::*;
use runguard_contract::canonical::domain_hash;
use runguard_contract::{
    ApprovalPath, AuditEntry, Incident, IncidentId, Mode, Pattern, PatternId, PatternRule, Policy, PolicyAction,
    PolicyDocument, PolicyId, RecordId, Regret, Rule, Scope, Signature, StepError, TenantId, Timestamp,
};
use runguard_engine::learning::{self, Level, TenantEvidence};
use runguard_store::{GraduationGates, GraduationState, RecordQuery, Store, StoreError, WriteBatch, all_pages};
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::shared::{Shared, now, store_error};

/// Examples kept per pattern.
const PATTERN_EXAMPLES: usize = 10;

/// What a failed run's incident is made of.
#[derive(Clone, Debug)]
pub struct IncidentDraft {
    /// The run's tenant.
    pub tenant: TenantId,
    /// The run.
    pub run_id: runguard_contract::RunId,
    /// The failing step's signature.
    pub signature: Signature,
    /// Its error.
    pub error: StepError,
}

/// Commits a run's end, with its incident and pattern update when the run failed.
#[derive(Debug, Message)]
#[rtype(result = "Result<Option<IncidentId>, ApiError>")]
pub struct EndRun {
    /// The run-end writes (ledger entry, run, any record).
    pub batch: WriteBatch,
    /// The incident to create, if any.
    pub incident: Option<IncidentDraft>,
}

/// Proposes a pattern's shadow policy.
#[derive(Debug, Message)]
#[rtype(result = "Result<Policy, ApiError>")]
pub struct Propose {
    /// The tenant.
    pub tenant: TenantId,
    /// The pattern.
    pub pattern_id: PatternId,
    /// The caller's token name.
    pub caller: String,
}

/// An operator confirms a policy.
#[derive(Debug, Message)]
#[rtype(result = "Result<Value, ApiError>")]
pub struct Confirm {
    /// The tenant.
    pub tenant: TenantId,
    /// The policy.
    pub policy_id: PolicyId,
    /// The caller's token name.
    pub caller: String,
    /// Whether the caller may change global policies.
    pub admin: bool,
}

/// An operator regrets a prevention record.
#[derive(Debug, Message)]
#[rtype(result = "Result<Value, ApiError>")]
pub struct RegretRecord {
    /// The tenant.
    pub tenant: TenantId,
    /// The record.
    pub record_id: RecordId,
    /// 1–10.
    pub severity: u8,
    /// Free text.
    pub note: Option<String>,
    /// The caller's token name.
    pub caller: String,
}

/// Computes (and persists, when it changed) a tenant's graduation level.
#[derive(Debug, Message)]
#[rtype(result = "Result<Value, ApiError>")]
pub struct TenantGraduation {
    /// The tenant.
    pub tenant: TenantId,
}

/// The actor.
pub struct Learning {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Learning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Learning").finish_non_exhaustive()
    }
}

impl Actor for Learning {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(1024);
    }
}

impl Learning {
    /// Starts the actor on its own arbiter.
    pub fn start_dedicated(shared: Arc<Shared>) -> (Addr<Learning>, Arbiter) {
        let arbiter = Arbiter::new();
        let addr = Learning::start_in_arbiter(&arbiter.handle(), move |_| Learning { shared });
        (addr, arbiter)
    }

    fn store(&self) -> &Store {
        &self.shared.store
    }
}

type Answer<T> = AtomicResponse<Learning, Result<T, ApiError>>;

fn commit_then<T: 'static>(actor: &Learning, batch: Result<(WriteBatch, T), ApiError>) -> Answer<T> {
    let shared = Arc::clone(&actor.shared);
    AtomicResponse::new(Box::pin(
        async move {
            let (batch, value) = batch?;
            if !batch.is_empty() {
                shared.commit(batch).await?;
            }
            Ok(value)
        }
        .into_actor(actor),
    ))
}

fn generated<T>(make: impl Fn([u8; 32]) -> T, domain: &str, parts: &[&str]) -> T {
    make(domain_hash(domain, parts.join("\n").as_bytes()))
}

impl Handler<EndRun> for Learning {
    type Result = Answer<Option<IncidentId>>;

    fn handle(&mut self, msg: EndRun, _: &mut Self::Context) -> Self::Result {
        let planned = (|| {
            let mut batch = msg.batch;
            let Some(draft) = msg.incident else { return Ok((batch, None)) };
            let at = now();
            let signature_hash = draft.signature.hash();
            let error_type = runguard_contract::ErrorClass::of(&draft.error).error_type;
            let incident_id = IncidentId::from_u128(uuid::Uuid::now_v7().as_u128());
            let existing =
                self.store().find_pattern(&draft.tenant, &signature_hash, &error_type).map_err(store_error)?;
            let pattern = match existing {
                Some(mut pattern) => {
                    pattern.occurrences = pattern.occurrences.saturating_add(1);
                    pattern.last_seen = at;
                    pattern.incident_ids.push(incident_id.clone());
                    let excess = pattern.incident_ids.len().saturating_sub(PATTERN_EXAMPLES);
                    pattern.incident_ids.drain(..excess);
                    pattern
                }
                None => Pattern {
                    id: generated(
                        |d| PatternId::from_digest(&d),
                        "runguard/pattern-id/v1",
                        &[draft.tenant.as_str(), signature_hash.as_str(), &error_type],
                    ),
                    tenant_id: draft.tenant.clone(),
                    signature_hash: signature_hash.clone(),
                    signature: draft.signature.clone(),
                    error_type: error_type.clone(),
                    occurrences: 1,
                    first_seen: at,
                    last_seen: at,
                    incident_ids: vec![incident_id.clone()],
                    policy_id: None,
                },
            };
            let incident = Incident {
                id: incident_id.clone(),
                tenant_id: draft.tenant.clone(),
                run_id: draft.run_id.clone(),
                signature_hash,
                signature: draft.signature,
                error: draft.error,
                pattern_id: pattern.id.clone(),
                created_at: at,
            };
            tracing::info!(run_id = %incident.run_id, incident_id = %incident.id, pattern_id = %pattern.id, occurrences = pattern.occurrences, "incident created");
            batch.put_incident(incident);
            batch.put_pattern(pattern);
            Ok((batch, Some(incident_id)))
        })();
        commit_then(self, planned)
    }
}

impl Handler<Propose> for Learning {
    type Result = Answer<Policy>;

    fn handle(&mut self, msg: Propose, _: &mut Self::Context) -> Self::Result {
        let required = self.shared.config.proposal_min_occurrences;
        let planned = (|| {
            let pattern = self
                .store()
                .get_pattern(&msg.tenant, &msg.pattern_id)
                .map_err(store_error)?
                .ok_or_else(|| ApiError::not_found("pattern", msg.pattern_id.as_str()))?;
            if let Some(policy_id) = &pattern.policy_id {
                return Err(ApiError::conflict(
                    "already_proposed",
                    format!("pattern already proposed as policy `{policy_id}`"),
                ));
            }
            if pattern.occurrences < required {
                return Err(ApiError::conflict(
                    "too_few_occurrences",
                    format!("the pattern has {} occurrences; {required} are needed to propose it", pattern.occurrences),
                ));
            }
            let at = now();
            let id = generated(
                |d| PolicyId::from_digest(&d),
                "runguard/pattern-policy-id/v1",
                &[msg.tenant.as_str(), pattern.id.as_str()],
            );
            let sig = &pattern.signature;
            let doc = PolicyDocument {
                id: Some(id.clone()),
                name: format!("pattern {}: {} {} ({})", pattern.id, sig.skill, sig.api_endpoint, pattern.error_type),
                scope: Scope::Tenant,
                mode: Mode::Shadow,
                action: PolicyAction::Block,
                precedence: runguard_contract::policy::DEFAULT_PRECEDENCE,
                on_error: Default::default(),
                bind_at: None,
                rule: Rule::Pattern(PatternRule {
                    pattern_id: pattern.id.clone(),
                    signature_hash: pattern.signature_hash.clone(),
                    api_endpoint: None,
                }),
            };
            let policy = Policy::create(doc, id, Some(msg.tenant.clone()), at);
            let mut proposed = pattern;
            proposed.policy_id = Some(policy.id.clone());
            let mut batch = WriteBatch::new();
            batch.put_policy_version(policy.clone());
            batch.append_audit(
                Some(msg.tenant.clone()),
                AuditEntry {
                    policy_id: policy.id.clone(),
                    from: None,
                    to: Mode::Shadow,
                    at,
                    caller: msg.caller.clone(),
                    reason: Some(format!("proposed from pattern {}", proposed.id)),
                    approval_path: ApprovalPath::Manual,
                },
            );
            batch.put_pattern(proposed);
            Ok((batch, policy))
        })();
        commit_then(self, planned)
    }
}

/// Confirmations since the policy's latest mode change, by distinct callers.
fn confirmations(store: &Store, owner: Option<&TenantId>, policy: &Policy) -> Result<Vec<String>, StoreError> {
    let audit = all_pages(|page| store.policy_audit(owner, &policy.id, page))?;
    let mut callers: Vec<String> = Vec::new();
    for entry in audit {
        if entry.from != Some(entry.to) {
            callers.clear();
        } else if entry.approval_path == ApprovalPath::Confirmations && !callers.contains(&entry.caller) {
            callers.push(entry.caller);
        }
    }
    Ok(callers)
}

impl Handler<Confirm> for Learning {
    type Result = Answer<Value>;

    fn handle(&mut self, msg: Confirm, _: &mut Self::Context) -> Self::Result {
        let required = self.shared.config.confirmations_required;
        let planned = (|| {
            let policy = self
                .store()
                .find_policy(&msg.tenant, &msg.policy_id, None)
                .map_err(store_error)?
                .ok_or_else(|| ApiError::not_found("policy", msg.policy_id.as_str()))?;
            if policy.scope == Scope::Global && !msg.admin {
                return Err(ApiError::forbidden("only admins confirm global policies"));
            }
            if policy.mode == Mode::Disabled {
                return Err(ApiError::conflict(
                    "policy_disabled",
                    "confirmations never revive a disabled policy; set its mode explicitly",
                ));
            }
            let owner = policy.tenant_id.clone();
            let mut callers = confirmations(self.store(), owner.as_ref(), &policy).map_err(store_error)?;
            let mut batch = WriteBatch::new();
            if policy.mode == Mode::Active {
                let count = callers.len();
                return Ok((batch, json!({ "confirmations": count, "required": required, "policy": policy })));
            }
            let at = now();
            let new_confirmation = !callers.contains(&msg.caller);
            if new_confirmation {
                callers.push(msg.caller.clone());
                batch.append_audit(
                    owner.clone(),
                    AuditEntry {
                        policy_id: policy.id.clone(),
                        from: Some(policy.mode),
                        to: policy.mode,
                        at,
                        caller: msg.caller.clone(),
                        reason: Some(format!("confirmation {}/{required}", callers.len())),
                        approval_path: ApprovalPath::Confirmations,
                    },
                );
            }
            let count = callers.len();
            let policy = if u32::try_from(count).unwrap_or(u32::MAX) >= required {
                let next = policy.with_mode(Mode::Active, at);
                batch.put_policy_version(next.clone());
                batch.append_audit(
                    owner,
                    AuditEntry {
                        policy_id: next.id.clone(),
                        from: Some(policy.mode),
                        to: Mode::Active,
                        at,
                        caller: msg.caller.clone(),
                        reason: Some(format!("{count} confirmations")),
                        approval_path: ApprovalPath::Confirmations,
                    },
                );
                tracing::info!(policy_id = %next.id, confirmations = count, "policy activated by confirmations");
                next
            } else {
                policy
            };
            Ok((batch, json!({ "confirmations": count, "required": required, "policy": policy })))
        })();
        commit_then(self, planned)
    }
}

impl Handler<RegretRecord> for Learning {
    type Result = Answer<Value>;

    fn handle(&mut self, msg: RegretRecord, _: &mut Self::Context) -> Self::Result {
        let planned = (|| {
            let record = self
                .store()
                .get_record(&msg.tenant, &msg.record_id)
                .map_err(store_error)?
                .ok_or_else(|| ApiError::not_found("prevention record", msg.record_id.as_str()))?;
            if self.store().get_regret(&record.id).map_err(store_error)?.is_some() {
                return Err(ApiError::conflict("already_regretted", "this record was already marked a false positive"));
            }
            let at = now();
            let regret = Regret {
                record_id: record.id.clone(),
                policy_id: record.policy_id.clone(),
                severity: msg.severity,
                note: msg.note,
                caller: msg.caller.clone(),
                at,
            };
            let mut batch = WriteBatch::new();
            batch.put_regret(msg.tenant.clone(), regret.clone());
            // Only the tenant's own policies are demoted by its regrets; global ones are reported only.
            let policy = self.store().get_policy(Some(&msg.tenant), &record.policy_id, None).map_err(store_error)?;
            let mut summary = json!({ "policy_id": record.policy_id, "demoted": false });
            if let Some(policy) = policy {
                let mut regrets = self
                    .store()
                    .regrets_for_policy(&msg.tenant, &policy.id, policy.activated_at)
                    .map_err(store_error)?;
                regrets.push(regret.clone());
                let (score, count) = learning::regret_score(&regrets, policy.activated_at, at);
                let demote = policy.mode == Mode::Active && learning::should_demote(score, count);
                if demote {
                    let next = policy.with_mode(Mode::Disabled, at);
                    batch.put_policy_version(next.clone());
                    batch.append_audit(
                        Some(msg.tenant.clone()),
                        AuditEntry {
                            policy_id: next.id.clone(),
                            from: Some(policy.mode),
                            to: Mode::Disabled,
                            at,
                            caller: msg.caller.clone(),
                            reason: Some(format!("regret score {score:.2} from {count} regrets")),
                            approval_path: ApprovalPath::AutoRegret,
                        },
                    );
                    tracing::warn!(policy_id = %next.id, score, count, "policy demoted by regret");
                }
                summary = json!({
                    "policy_id": policy.id,
                    "regret_score": score,
                    "regrets_since_activation": count,
                    "demoted": demote,
                });
            }
            Ok((batch, json!({ "regret": regret, "policy": summary })))
        })();
        commit_then(self, planned)
    }
}

fn ppm(rate: f64) -> u32 {
    // Rates are in [0, 1]; the cast cannot overflow after clamping.
    (rate.clamp(0.0, 1.0) * 1_000_000.0).round() as u32
}

/// Everything a tenant's graduation is computed from.
struct Gathered {
    policies: Vec<Policy>,
    records: Vec<runguard_contract::PreventionRecord>,
    incidents: Vec<Incident>,
    regrets: Vec<Regret>,
    demotions: Vec<Timestamp>,
}

fn gather(store: &Store, tenant: &TenantId) -> Result<Gathered, StoreError> {
    let policies: Vec<Policy> = all_pages(|page| store.list_policies(tenant, None, page))?
        .into_iter()
        .filter(|p| p.tenant_id.as_ref() == Some(tenant))
        .collect();
    let records = all_pages(|page| {
        let mut query = RecordQuery::tenant(tenant.clone());
        query.since = Some(now().plus_millis(-learning::GRADUATION_WINDOW_MS));
        query.page = page.clone();
        store.list_records(&query)
    })?;
    let incidents = all_pages(|page| store.list_incidents(tenant, page))?;
    let mut regrets = Vec::new();
    let mut demotions = Vec::new();
    for policy in &policies {
        regrets.extend(store.regrets_for_policy(tenant, &policy.id, None)?);
        for entry in all_pages(|page| store.policy_audit(Some(tenant), &policy.id, page))? {
            if entry.approval_path == runguard_contract::ApprovalPath::AutoRegret {
                demotions.push(entry.at);
            }
        }
    }
    Ok(Gathered { policies, records, incidents, regrets, demotions })
}

impl Handler<TenantGraduation> for Learning {
    type Result = Answer<Value>;

    fn handle(&mut self, msg: TenantGraduation, _: &mut Self::Context) -> Self::Result {
        let planned = (|| {
            let at = now();
            let g = gather(self.store(), &msg.tenant).map_err(store_error)?;
            let evidence = TenantEvidence {
                records: &g.records,
                policies: &g.policies,
                incidents: &g.incidents,
                regrets: &g.regrets,
                demotions: &g.demotions,
            };
            let gates = learning::tenant_gates(&evidence, at);
            let stored = self.store().graduation(&msg.tenant).map_err(store_error)?;
            let previous = stored.as_ref().and_then(|s| {
                Level::parse(&s.level).map(|level| (level, s.degraded_from.as_deref().and_then(Level::parse)))
            });
            let level = learning::tenant_level(previous, &gates, at);
            let state = GraduationState {
                level: level.level.as_str().to_owned(),
                degraded_from: level.degraded_from.map(|l| l.as_str().to_owned()),
                reason: level.reason.clone(),
                at,
                gates: GraduationGates {
                    prevention_passed: gates.prevention_passed,
                    counted_preventions: gates.counted_preventions,
                    missed_recurrences: gates.missed_recurrences,
                    prevention_rate_ppm: ppm(gates.prevention_rate),
                    rollback_passed: gates.rollback_passed,
                    demotions: gates.demotions,
                    regrets: gates.regrets,
                    regret_rate_ppm: ppm(gates.regret_rate),
                    last_prevention_at: gates.last_prevention_at,
                },
            };
            let changed = stored.as_ref().is_none_or(|s| {
                s.level != state.level || s.degraded_from != state.degraded_from || s.reason != state.reason
            });
            let mut batch = WriteBatch::new();
            let mut history =
                all_pages(|page| self.store().graduation_history(&msg.tenant, page)).map_err(store_error)?;
            if changed {
                batch.set_graduation(msg.tenant.clone(), state.clone());
                history.push(state.clone());
            }
            let history: Vec<Value> = history
                .iter()
                .map(|h| json!({ "level": h.level, "degraded_from": h.degraded_from, "reason": h.reason, "at": h.at }))
                .collect();
            let view = json!({
                "tenant_id": msg.tenant,
                "level": state.level,
                "degraded_from": state.degraded_from,
                "reason": state.reason,
                "evaluated_at": at,
                "gates": {
                    "prevention": {
                        "passed": gates.prevention_passed,
                        "counted_preventions": gates.counted_preventions,
                        "missed_recurrences": gates.missed_recurrences,
                        "prevention_rate": gates.prevention_rate,
                        "last_prevention_at": gates.last_prevention_at,
                    },
                    "rollback": {
                        "passed": gates.rollback_passed,
                        "demotions": gates.demotions,
                        "regrets": gates.regrets,
                        "regret_rate": gates.regret_rate,
                    },
                },
                "history": history,
            });
            Ok((batch, view))
        })();
        commit_then(self, planned)
    }
}
