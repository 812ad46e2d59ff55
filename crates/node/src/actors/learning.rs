//! The learning loop's read-modify-writes (incident → pattern, proposal, confirmation, regret → demotion,
//! tenant graduation), serialised per tenant: one tenant's requests happen one at a time, different
//! tenants' concurrently. Reads run on the blocking pool; writes go through the writer.

use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;
use runguard_contract::canonical::domain_hash;
use runguard_contract::{
    ApprovalPath, AuditEntry, Incident, IncidentId, Mode, Pattern, PatternId, PatternRule, Policy, PolicyAction,
    PolicyDocument, PolicyId, PreventionRecord, RecordId, Regret, Rule, Scope, Signature, Snapshot, SnapshotHash,
    StepError, TenantId, Timestamp,
};
use runguard_engine::learning::{self, Level, TenantEvidence};
use runguard_store::{GraduationGates, GraduationState, RecordQuery, Store, StoreError, WriteBatch, all_pages};
use serde_json::{Value, json};

use crate::error::ApiError;
use tokio::sync::Mutex as AsyncMutex;

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

/// A lock of the learning loop: one per tenant, and one (`None`) for the global policies' confirmations.
type LockKey = Option<TenantId>;

/// Lock map entries kept before unused ones are dropped.
const LOCKS_KEPT: usize = 1024;

/// Requests of one tenant waiting for (or holding) its lock at most; past it the tenant's next request is
/// answered 503 at once. A caller that times out leaves its request queued, so without a bound a tenant
/// retrying faster than its requests complete would grow the queue without limit (SPEC §9).
const WAITING_PER_TENANT: usize = 1024;

/// The actor. It only hands out locks: each request runs as a future that takes its tenant's lock, reads
/// on the blocking pool, commits through the writer and answers, so that one tenant's learning work
/// (a graduation over many incidents, say) never queues another tenant's run ends behind it.
pub struct Learning {
    shared: Arc<Shared>,
    locks: HashMap<LockKey, Arc<AsyncMutex<()>>>,
}

impl std::fmt::Debug for Learning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Learning").field("locks", &self.locks.len()).finish_non_exhaustive()
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
        let addr = Learning::start_in_arbiter(&arbiter.handle(), move |_| Learning { shared, locks: HashMap::new() });
        (addr, arbiter)
    }

    fn lock(&mut self, key: LockKey) -> Arc<AsyncMutex<()>> {
        if self.locks.len() >= LOCKS_KEPT {
            // Only this actor clones the locks out; one held by no request can go.
            self.locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        }
        Arc::clone(self.locks.entry(key).or_default())
    }

    /// Runs `plan` (blocking reads that decide what to write) and commits its batch while holding the
    /// locks of `keys`, taken in the order given: a tenant's before the global one, always.
    fn serialised<T: Send + 'static>(
        &mut self,
        keys: Vec<LockKey>,
        plan: impl FnOnce(&Shared) -> Result<(WriteBatch, T), ApiError> + Send + 'static,
    ) -> Answer<T> {
        self.serialised_as(keys, None, plan)
    }

    /// [`Self::serialised`], with the planning done as `heavy` tenant work (`Shared::heavy`) when given.
    fn serialised_as<T: Send + 'static>(
        &mut self,
        keys: Vec<LockKey>,
        heavy: Option<TenantId>,
        plan: impl FnOnce(&Shared) -> Result<(WriteBatch, T), ApiError> + Send + 'static,
    ) -> Answer<T> {
        let locks: Vec<Arc<AsyncMutex<()>>> = keys.into_iter().map(|key| self.lock(key)).collect();
        // Each waiting request holds a clone of its lock; the map holds one more.
        if locks.iter().any(|lock| Arc::strong_count(lock) > WAITING_PER_TENANT + 1) {
            return Box::pin(std::future::ready(Err(ApiError::unavailable(
                "too many learning-loop requests of this tenant are waiting; retry",
                1,
            ))));
        }
        let shared = Arc::clone(&self.shared);
        Box::pin(async move {
            // Waiting for the locks and planning change nothing, so they may give up at the call timeout;
            // the commit decides for itself (a 503 only when the writer never took the batch), so that a
            // request answered 503 is never applied (SPEC §12.10).
            let planned = actix_web::rt::time::timeout(shared.call_timeout(), async {
                let mut held = Vec::with_capacity(locks.len());
                for lock in locks {
                    held.push(lock.lock_owned().await);
                }
                let planned = match &heavy {
                    Some(tenant) => shared.heavy(tenant, plan).await?,
                    None => shared.blocking(plan).await?,
                };
                Ok::<_, ApiError>((held, planned))
            })
            .await;
            let (held, (batch, value)) = planned.map_err(|_| {
                ApiError::unavailable("the learning loop is busy for this tenant; nothing was changed, retry", 1)
            })??;
            if !batch.is_empty() {
                shared.commit(batch).await?;
            }
            drop(held);
            Ok(value)
        })
    }
}

type Answer<T> = ResponseFuture<Result<T, ApiError>>;

fn generated<T>(make: impl Fn([u8; 32]) -> T, domain: &str, parts: &[&str]) -> T {
    make(domain_hash(domain, parts.join("\n").as_bytes()))
}

impl Handler<EndRun> for Learning {
    type Result = Answer<Option<IncidentId>>;

    fn handle(&mut self, msg: EndRun, _: &mut Self::Context) -> Self::Result {
        let keys = msg.incident.iter().map(|draft| Some(draft.tenant.clone())).collect();
        self.serialised(keys, move |shared| plan_end(&shared.store, msg))
    }
}

fn plan_end(store: &Store, msg: EndRun) -> Result<(WriteBatch, Option<IncidentId>), ApiError> {
    let mut batch = msg.batch;
    let Some(draft) = msg.incident else { return Ok((batch, None)) };
    let at = now();
    let signature_hash = draft.signature.hash();
    let error_type = runguard_contract::ErrorClass::of(&draft.error).error_type;
    let incident_id = IncidentId::from_u128(uuid::Uuid::now_v7().as_u128());
    let existing = store.find_pattern(&draft.tenant, &signature_hash, &error_type).map_err(store_error)?;
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
}

impl Handler<Propose> for Learning {
    type Result = Answer<Policy>;

    fn handle(&mut self, msg: Propose, _: &mut Self::Context) -> Self::Result {
        self.serialised(vec![Some(msg.tenant.clone())], move |shared| {
            plan_propose(&shared.store, shared.config.proposal_min_occurrences, msg)
        })
    }
}

fn plan_propose(store: &Store, required: u64, msg: Propose) -> Result<(WriteBatch, Policy), ApiError> {
    let pattern = store
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
    if store.get_policy(None, &id, None).map_err(store_error)?.is_some() {
        return Err(policy_id_taken(&id));
    }
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
}

/// The answer when a new policy's id already names another policy a tenant sees (SPEC §12.1).
pub fn policy_id_taken(id: &PolicyId) -> ApiError {
    ApiError::conflict(
        "policy_id_taken",
        format!("policy id `{id}` is taken: a global policy and a tenant's policy may not share an id"),
    )
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
        // Only admins confirm global policies; they also hold the global lock, after their tenant's.
        let mut keys = vec![Some(msg.tenant.clone())];
        if msg.admin {
            keys.push(None);
        }
        self.serialised(keys, move |shared| plan_confirm(&shared.store, shared.config.confirmations_required, msg))
    }
}

fn plan_confirm(store: &Store, required: u32, msg: Confirm) -> Result<(WriteBatch, Value), ApiError> {
    let policy = store
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
    let mut callers = confirmations(store, owner.as_ref(), &policy).map_err(store_error)?;
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
}

/// What the learning loop knows about a live record: whether it was a fault, and whose policy decided it.
struct RecordFacts {
    fault: bool,
    owner: Option<TenantId>,
}

/// Reads what decides how a record counts, with the snapshots it needs cached across calls.
struct RecordReader<'a> {
    store: &'a Store,
    snapshots: HashMap<SnapshotHash, Option<Snapshot>>,
}

impl<'a> RecordReader<'a> {
    fn new(store: &'a Store) -> Self {
        Self { store, snapshots: HashMap::new() }
    }

    /// Whether the record's block was a fault (SPEC §12.2), from the decision in its run's ledger.
    fn is_fault(&self, record: &PreventionRecord) -> Result<bool, StoreError> {
        Ok(self.store.record_decision(record)?.is_some_and(|decision| learning::is_fault(&decision)))
    }

    /// The fault flag and the owner of the deciding policy, as pinned by the record's snapshot (so that a
    /// store written before ids were unique per tenant view still tells a global policy from the
    /// tenant's own with the same id); the tenant's view when the snapshot cannot be read.
    fn facts(&mut self, tenant: &TenantId, record: &PreventionRecord) -> Result<RecordFacts, StoreError> {
        let fault = self.is_fault(record)?;
        let store = self.store;
        let snapshot = self
            .snapshots
            .entry(record.snapshot_hash.clone())
            .or_insert_with(|| store.load_snapshot(&record.snapshot_hash).ok());
        let pinned = snapshot.as_ref().and_then(|snapshot| {
            snapshot.policies.iter().find(|p| p.id == record.policy_id && p.version == record.policy_version)
        });
        let owner = match pinned {
            Some(policy) => policy.tenant_id.clone(),
            None => store.find_policy(tenant, &record.policy_id, None)?.and_then(|p| p.tenant_id),
        };
        Ok(RecordFacts { fault, owner })
    }

    /// The regrets that count against a policy of `owner`: on live, non-fault records of that policy.
    fn counted_regrets(
        &mut self,
        tenant: &TenantId,
        owner: Option<&TenantId>,
        regrets: Vec<Regret>,
    ) -> Result<Vec<Regret>, StoreError> {
        let mut counted = Vec::with_capacity(regrets.len());
        for regret in regrets {
            let Some(record) = self.store.get_record(tenant, &regret.record_id)? else { continue };
            if record.is_simulated {
                continue;
            }
            let facts = self.facts(tenant, &record)?;
            if !facts.fault && facts.owner.as_ref() == owner {
                counted.push(regret);
            }
        }
        Ok(counted)
    }
}

/// Live records that are preventions, not faults: what graduation and prevention rates count.
pub fn preventions(store: &Store, records: Vec<PreventionRecord>) -> Result<Vec<PreventionRecord>, StoreError> {
    let reader = RecordReader::new(store);
    let mut kept = Vec::with_capacity(records.len());
    for record in records {
        if !record.is_simulated && !reader.is_fault(&record)? {
            kept.push(record);
        }
    }
    Ok(kept)
}

impl Handler<RegretRecord> for Learning {
    type Result = Answer<Value>;

    fn handle(&mut self, msg: RegretRecord, _: &mut Self::Context) -> Self::Result {
        self.serialised(vec![Some(msg.tenant.clone())], move |shared| plan_regret(&shared.store, msg))
    }
}

fn plan_regret(store: &Store, msg: RegretRecord) -> Result<(WriteBatch, Value), ApiError> {
    let record = store
        .get_record(&msg.tenant, &msg.record_id)
        .map_err(store_error)?
        .ok_or_else(|| ApiError::not_found("prevention record", msg.record_id.as_str()))?;
    if record.is_simulated {
        // SPEC §12.4: a simulation prevented nothing, and its records never change a live policy.
        return Err(ApiError::conflict("simulated_record", "a simulated record cannot be regretted"));
    }
    if store.get_regret(&record.id).map_err(store_error)?.is_some() {
        return Err(ApiError::conflict("already_regretted", "this record was already marked a false positive"));
    }
    let mut reader = RecordReader::new(store);
    let facts = reader.facts(&msg.tenant, &record).map_err(store_error)?;
    if facts.fault {
        // SPEC §12.2: a block by an evaluation error or an integrity failure was a fault, not a prevention.
        return Err(ApiError::conflict(
            "not_a_prevention",
            "this record's block was an evaluation error, not a prevention; it cannot be regretted",
        ));
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
    let mut summary = json!({ "policy_id": record.policy_id, "demoted": false });
    match &facts.owner {
        // A tenant's regrets never change a global policy, which other tenants rely on; they are recorded
        // and count in this tenant's regret rate only (SPEC §12.1).
        None => {
            summary = json!({
                "policy_id": record.policy_id,
                "scope": Scope::Global,
                "demoted": false,
                "reason": "global policies are not demoted by a tenant's regrets",
            });
        }
        Some(owner) if owner == &msg.tenant => {
            if let Some(policy) = store.get_policy(Some(owner), &record.policy_id, None).map_err(store_error)? {
                let earlier =
                    store.regrets_for_policy(&msg.tenant, &policy.id, policy.activated_at).map_err(store_error)?;
                let mut regrets = reader.counted_regrets(&msg.tenant, Some(owner), earlier).map_err(store_error)?;
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
                    "scope": Scope::Tenant,
                    "regret_score": score,
                    "regrets_since_activation": count,
                    "demoted": demote,
                });
            }
        }
        Some(_) => {}
    }
    Ok((batch, json!({ "regret": regret, "policy": summary })))
}

fn ppm(rate: f64) -> u32 {
    // Rates are in [0, 1]; the cast cannot overflow after clamping.
    (rate.clamp(0.0, 1.0) * 1_000_000.0).round() as u32
}

/// Everything a tenant's graduation is computed from: only what lies in the 30-day window (and the
/// tenant's policies), so that its cost follows the window, not the tenant's whole history.
struct Gathered {
    policies: Vec<Policy>,
    records: Vec<PreventionRecord>,
    incidents: Vec<Incident>,
    regrets: Vec<Regret>,
    demotions: Vec<Timestamp>,
}

fn gather(store: &Store, tenant: &TenantId, at: Timestamp) -> Result<Gathered, StoreError> {
    let start = at.plus_millis(-learning::GRADUATION_WINDOW_MS);
    // The tenant's own policies and the global ones it runs under: a global policy's preventions in this
    // tenant's runs count for this tenant (and only for it).
    let policies: Vec<Policy> = all_pages(|page| store.list_policies(tenant, None, page))?;
    let records = all_pages(|page| {
        let mut query = RecordQuery::tenant(tenant.clone());
        query.since = Some(start);
        query.page = page.clone();
        store.list_records(&query)
    })?;
    let records = preventions(store, records)?;
    let incidents = store.incidents_since(tenant, start)?;
    let mut reader = RecordReader::new(store);
    let mut regrets = Vec::new();
    let mut demotions = Vec::new();
    for policy in &policies {
        let made = store.regrets_for_policy(tenant, &policy.id, Some(start))?;
        regrets.extend(reader.counted_regrets(tenant, policy.tenant_id.as_ref(), made)?);
        // Regrets never demote a global policy; the tenant's own demotions are in their audits.
        if policy.tenant_id.as_ref() == Some(tenant) {
            for entry in store.policy_audit_since(Some(tenant), &policy.id, start)? {
                if entry.approval_path == ApprovalPath::AutoRegret {
                    demotions.push(entry.at);
                }
            }
        }
    }
    Ok(Gathered { policies, records, incidents, regrets, demotions })
}

impl Handler<TenantGraduation> for Learning {
    type Result = Answer<Value>;

    fn handle(&mut self, msg: TenantGraduation, _: &mut Self::Context) -> Self::Result {
        // Reading a 30-day window of evidence is the learning loop's heaviest read.
        let tenant = msg.tenant.clone();
        self.serialised_as(vec![Some(tenant.clone())], Some(tenant), move |shared| {
            plan_graduation(&shared.store, &msg.tenant)
        })
    }
}

fn plan_graduation(store: &Store, tenant: &TenantId) -> Result<(WriteBatch, Value), ApiError> {
    let at = now();
    let g = gather(store, tenant, at).map_err(store_error)?;
    let evidence = TenantEvidence {
        records: &g.records,
        policies: &g.policies,
        incidents: &g.incidents,
        regrets: &g.regrets,
        demotions: &g.demotions,
    };
    let gates = learning::tenant_gates(&evidence, at);
    let stored = store.graduation(tenant).map_err(store_error)?;
    let previous = stored
        .as_ref()
        .and_then(|s| Level::parse(&s.level).map(|level| (level, s.degraded_from.as_deref().and_then(Level::parse))));
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
    let changed = stored
        .as_ref()
        .is_none_or(|s| s.level != state.level || s.degraded_from != state.degraded_from || s.reason != state.reason);
    let mut batch = WriteBatch::new();
    let mut history = all_pages(|page| store.graduation_history(tenant, page)).map_err(store_error)?;
    if changed {
        batch.set_graduation(tenant.clone(), state.clone());
        history.push(state.clone());
    }
    let history: Vec<Value> = history
        .iter()
        .map(|h| json!({ "level": h.level, "degraded_from": h.degraded_from, "reason": h.reason, "at": h.at }))
        .collect();
    let view = json!({
        "tenant_id": tenant,
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
}
