//! The learning loop's read-modify-writes (incident → pattern, proposal, confirmation, regret → demotion,
//! tenant graduation), serialised per tenant: one tenant's requests happen one at a time, different
//! tenants' concurrently. Reads run on the blocking pool; writes go through the writer.

use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;
use runguard_contract::canonical::domain_hash;
use runguard_contract::{
    ApprovalPath, Incident, IncidentId, Mode, Pattern, PatternId, PatternRule, Policy, PolicyAction, PolicyDocument,
    PolicyId, PreventionRecord, RecordId, Regret, Rule, Scope, Signature, Snapshot, SnapshotHash, StepError, TenantId,
    Timestamp,
};
use runguard_engine::learning::{self, Level, TenantEvidence};
use runguard_store::{
    ClusterLock, GraduationGates, GraduationState, RecordQuery, Store, StoreError, WriteBatch, all_pages,
};
use serde::Serialize;
use tokio::sync::Mutex as AsyncMutex;

use crate::node_error::NodeError;
use crate::policy_change::{self, Approval, PolicyChange};
use crate::shared::{Shared, now};

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
#[rtype(result = "Result<Option<IncidentId>, NodeError>")]
pub struct CommitRunEnd {
    /// The run-end writes (ledger entry, run, any record).
    pub batch: WriteBatch,
    /// The incident to create, if any.
    pub incident: Option<IncidentDraft>,
}

/// Proposes a pattern's shadow policy.
#[derive(Debug, Message)]
#[rtype(result = "Result<Policy, NodeError>")]
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
#[rtype(result = "Result<Confirmation, NodeError>")]
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
#[rtype(result = "Result<RegretAnswer, NodeError>")]
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
#[rtype(result = "Result<Graduation, NodeError>")]
pub struct TenantGraduation {
    /// The tenant.
    pub tenant: TenantId,
}

// The answers below are serialised as they are: their fields are in alphabetical order, the order the
// node's JSON objects have always had on the wire.

/// Where a policy's confirmations stand after one more.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
#[schemars(rename = "Confirmation")]
pub struct Confirmation {
    /// Distinct callers who confirmed since the latest mode change.
    pub confirmations: usize,
    /// The policy (active once `required` callers confirmed).
    pub policy: Policy,
    /// Confirmations needed.
    pub required: u32,
}

/// A regret and what it did to the deciding policy.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
#[schemars(rename = "RegretResult")]
pub struct RegretAnswer {
    /// The effect on the policy.
    pub policy: RegretEffect,
    /// The regret as stored.
    pub regret: Regret,
}

/// What a regret did to the policy that decided the record.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
#[schemars(rename = "RegretPolicySummary")]
pub struct RegretEffect {
    /// Whether the regret demoted (disabled) the policy.
    pub demoted: bool,
    /// The policy.
    pub policy_id: PolicyId,
    /// Why nothing was demoted, for a global policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// The policy's regret score, for the tenant's own policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regret_score: Option<f64>,
    /// Regrets counted since the policy's activation, for the tenant's own policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regrets_since_activation: Option<usize>,
    /// The policy's scope, when the policy was found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
}

/// A tenant's graduation level, its gates and its history.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
#[schemars(rename = "TenantGraduation")]
pub struct Graduation {
    /// The level it fell from, if degraded.
    pub degraded_from: Option<String>,
    /// When the level was computed.
    pub evaluated_at: Timestamp,
    /// The gates.
    pub gates: Gates,
    /// Every level change, oldest first.
    pub history: Vec<GraduationStep>,
    /// The level.
    pub level: String,
    /// Why this level.
    pub reason: Option<String>,
    /// The tenant.
    pub tenant_id: TenantId,
}

/// The graduation gates.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
#[schemars(rename = "Gates")]
pub struct Gates {
    /// The prevention gate.
    pub prevention: PreventionGate,
    /// The rollback gate.
    pub rollback: RollbackGate,
}

/// The prevention gate.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
#[schemars(rename = "PreventionGate")]
pub struct PreventionGate {
    /// Counted preventions in the window.
    pub counted_preventions: u64,
    /// The latest prevention.
    pub last_prevention_at: Option<Timestamp>,
    /// Recurrences the policies missed.
    pub missed_recurrences: u64,
    /// Whether it passed.
    pub passed: bool,
    /// Preventions per recurrence.
    pub prevention_rate: f64,
}

/// The rollback gate.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
#[schemars(rename = "RollbackGate")]
pub struct RollbackGate {
    /// Demotions in the window.
    pub demotions: u64,
    /// Whether it passed.
    pub passed: bool,
    /// Regrets per prevention.
    pub regret_rate: f64,
    /// Counted regrets in the window.
    pub regrets: u64,
}

/// One level change.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
#[schemars(rename = "GraduationHistoryEntry")]
pub struct GraduationStep {
    /// When.
    pub at: Timestamp,
    /// The level it fell from, if degraded.
    pub degraded_from: Option<String>,
    /// The level.
    pub level: String,
    /// Why.
    pub reason: Option<String>,
}

/// A lock of the learning loop: one per tenant, and one (`None`) for the global policies' confirmations.
type LockKey = Option<TenantId>;

/// Lock map entries kept before unused ones are dropped.
const LOCKS_KEPT: usize = 1024;

/// Requests of one tenant waiting for (or holding) its lock at most; past it the tenant's next request is
/// answered 503 at once. A caller that times out leaves its request queued, so without a bound a tenant
/// retrying faster than its requests complete would grow the queue without limit (`docs/learning-loop.md`).
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
    /// The actor, reading and committing through `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared, locks: HashMap::new() }
    }

    /// Starts the actor on its own arbiter.
    pub fn start_dedicated(shared: Arc<Shared>) -> (Addr<Learning>, Arbiter) {
        let arbiter = Arbiter::new();
        let addr = Learning::start_in_arbiter(&arbiter.handle(), move |_| Learning::new(shared));
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
        plan: impl FnOnce(&Shared) -> Result<(WriteBatch, T), NodeError> + Send + 'static,
    ) -> Answer<T> {
        self.serialised_as(keys, None, plan)
    }

    /// [`Self::serialised`], with the planning done as `heavy` tenant work (`Shared::heavy`) when given.
    fn serialised_as<T: Send + 'static>(
        &mut self,
        keys: Vec<LockKey>,
        heavy: Option<TenantId>,
        plan: impl FnOnce(&Shared) -> Result<(WriteBatch, T), NodeError> + Send + 'static,
    ) -> Answer<T> {
        let names: Vec<String> = keys.iter().map(cluster_lock_name).collect();
        let locks: Vec<Arc<AsyncMutex<()>>> = keys.into_iter().map(|key| self.lock(key)).collect();
        // Each waiting request holds a clone of its lock; the map holds one more.
        if locks.iter().any(|lock| Arc::strong_count(lock) > WAITING_PER_TENANT + 1) {
            return Box::pin(std::future::ready(Err(NodeError::unavailable(
                "too many learning-loop requests of this tenant are waiting; retry",
            ))));
        }
        let shared = Arc::clone(&self.shared);
        Box::pin(async move {
            // Waiting for the locks and planning change nothing, so they may give up at the call timeout;
            // the commit decides for itself (a 503 only when the writer never took the batch), so that a
            // request answered 503 is never applied (`docs/reliability.md`).
            let planned = actix_web::rt::time::timeout(shared.call_timeout(), async {
                let mut held = Vec::with_capacity(locks.len());
                for lock in locks {
                    held.push(lock.lock_owned().await);
                }
                let cluster = cluster_locks(&shared, names).await?;
                let planned = match &heavy {
                    Some(tenant) => shared.heavy(tenant, plan).await?,
                    None => shared.blocking(plan).await?,
                };
                Ok::<_, NodeError>((held, cluster, planned))
            })
            .await;
            let (held, cluster, (batch, value)) = planned.map_err(|_| {
                NodeError::unavailable("the learning loop is busy for this tenant; nothing was changed, retry")
            })??;
            if !batch.is_empty() {
                shared.commit(batch).await?;
            }
            drop(cluster);
            drop(held);
            Ok(value)
        })
    }
}

type Answer<T> = ResponseFuture<Result<T, NodeError>>;

/// The name of a learning lock across the nodes of a store: one per tenant, and one for global policies.
fn cluster_lock_name(key: &LockKey) -> String {
    match key {
        Some(tenant) => format!("runguard/learning/tenant/{tenant}"),
        None => "runguard/learning/global".to_owned(),
    }
}

/// Takes the learning locks `names` for every node sharing the store (`docs/architecture.md`, "Cluster:
/// fencing and consistency"), held until the commit is done: on PostgreSQL another node's request reads
/// only after this one's commit. One node owns a sled store, so there it is only the in-process lock.
async fn cluster_locks(shared: &Arc<Shared>, names: Vec<String>) -> Result<Option<ClusterLock>, NodeError> {
    if !shared.store.is_shared() {
        return Ok(None);
    }
    let wait = shared.call_timeout();
    let lock = shared.blocking(move |shared| Ok::<_, NodeError>(shared.store.cluster_lock(&names, wait)?)).await?;
    Ok(Some(lock))
}

fn generated<T>(make: impl Fn([u8; 32]) -> T, domain: &str, parts: &[&str]) -> T {
    make(domain_hash(domain, parts.join("\n").as_bytes()))
}

impl Handler<CommitRunEnd> for Learning {
    type Result = Answer<Option<IncidentId>>;

    fn handle(&mut self, msg: CommitRunEnd, _: &mut Self::Context) -> Self::Result {
        let keys = msg.incident.iter().map(|draft| Some(draft.tenant.clone())).collect();
        self.serialised(keys, move |shared| plan_end(&shared.store, msg))
    }
}

fn plan_end(store: &Store, msg: CommitRunEnd) -> Result<(WriteBatch, Option<IncidentId>), NodeError> {
    let mut batch = msg.batch;
    let Some(draft) = msg.incident else { return Ok((batch, None)) };
    let at = now();
    let signature_hash = draft.signature.hash();
    let error_type = runguard_contract::ErrorClass::of(&draft.error).error_type;
    let incident_id = IncidentId::from_u128(uuid::Uuid::now_v7().as_u128());
    let existing = store.find_pattern(&draft.tenant, &signature_hash, &error_type)?;
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

fn plan_propose(store: &Store, required: u64, msg: Propose) -> Result<(WriteBatch, Policy), NodeError> {
    let pattern = store
        .get_pattern(&msg.tenant, &msg.pattern_id)?
        .ok_or_else(|| NodeError::not_found("pattern", msg.pattern_id.as_str()))?;
    if let Some(policy_id) = &pattern.policy_id {
        return Err(NodeError::conflict(
            "already_proposed",
            format!("pattern already proposed as policy `{policy_id}`"),
        ));
    }
    if pattern.occurrences < required {
        return Err(NodeError::conflict(
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
    if policy_change::id_taken(store, Some(&msg.tenant), &id)? {
        return Err(policy_change::id_taken_error(&id));
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
    let approval = Approval::manual(msg.caller.clone(), Some(format!("proposed from pattern {}", pattern.id)));
    let mut batch = WriteBatch::new();
    let policy = PolicyChange::create(doc, id, Some(msg.tenant.clone()), approval, at).write(&mut batch);
    let mut proposed = pattern;
    proposed.policy_id = Some(policy.id.clone());
    batch.put_pattern(proposed);
    Ok((batch, policy))
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
    type Result = Answer<Confirmation>;

    fn handle(&mut self, msg: Confirm, _: &mut Self::Context) -> Self::Result {
        // Only admins confirm global policies; they also hold the global lock, after their tenant's.
        let mut keys = vec![Some(msg.tenant.clone())];
        if msg.admin {
            keys.push(None);
        }
        self.serialised(keys, move |shared| plan_confirm(&shared.store, shared.config.confirmations_required, msg))
    }
}

fn plan_confirm(store: &Store, required: u32, msg: Confirm) -> Result<(WriteBatch, Confirmation), NodeError> {
    let policy = store
        .find_policy(&msg.tenant, &msg.policy_id, None)?
        .ok_or_else(|| NodeError::not_found("policy", msg.policy_id.as_str()))?;
    if policy.scope == Scope::Global && !msg.admin {
        return Err(NodeError::Forbidden("only admins confirm global policies"));
    }
    if policy.mode == Mode::Disabled {
        return Err(NodeError::conflict(
            "policy_disabled",
            "confirmations never revive a disabled policy; set its mode explicitly",
        ));
    }
    let owner = policy.tenant_id.clone();
    let mut callers = confirmations(store, owner.as_ref(), &policy)?;
    let mut batch = WriteBatch::new();
    if policy.mode == Mode::Active {
        let confirmations = callers.len();
        return Ok((batch, Confirmation { confirmations, policy, required }));
    }
    let at = now();
    let new_confirmation = !callers.contains(&msg.caller);
    if new_confirmation {
        callers.push(msg.caller.clone());
        let reason = format!("confirmation {}/{required}", callers.len());
        policy_change::write_confirmation(&mut batch, &policy, &msg.caller, reason, at);
    }
    let count = callers.len();
    let policy = if u32::try_from(count).unwrap_or(u32::MAX) >= required {
        let approval = Approval {
            caller: msg.caller.clone(),
            path: ApprovalPath::Confirmations,
            reason: Some(format!("{count} confirmations")),
        };
        let next = PolicyChange::mode(&policy, Mode::Active, approval, at).write(&mut batch);
        tracing::info!(policy_id = %next.id, confirmations = count, "policy activated by confirmations");
        next
    } else {
        policy
    };
    Ok((batch, Confirmation { confirmations: count, policy, required }))
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

    /// Whether the record's block was a fault (`docs/learning-loop.md`), from the decision in its run's ledger.
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
    type Result = Answer<RegretAnswer>;

    fn handle(&mut self, msg: RegretRecord, _: &mut Self::Context) -> Self::Result {
        self.serialised(vec![Some(msg.tenant.clone())], move |shared| plan_regret(&shared.store, msg))
    }
}

fn plan_regret(store: &Store, msg: RegretRecord) -> Result<(WriteBatch, RegretAnswer), NodeError> {
    let record = store
        .get_record(&msg.tenant, &msg.record_id)?
        .ok_or_else(|| NodeError::not_found("prevention record", msg.record_id.as_str()))?;
    if record.is_simulated {
        // A simulation prevented nothing, and its records never change a live policy.
        return Err(NodeError::conflict("simulated_record", "a simulated record cannot be regretted"));
    }
    if store.get_regret(&record.id)?.is_some() {
        return Err(NodeError::conflict("already_regretted", "this record was already marked a false positive"));
    }
    let mut reader = RecordReader::new(store);
    let facts = reader.facts(&msg.tenant, &record)?;
    if facts.fault {
        // A block by an evaluation error or an integrity failure was a fault, not a prevention.
        return Err(NodeError::conflict(
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
    let mut summary = RegretEffect {
        demoted: false,
        policy_id: record.policy_id.clone(),
        reason: None,
        regret_score: None,
        regrets_since_activation: None,
        scope: None,
    };
    match &facts.owner {
        // A tenant's regrets never change a global policy, which other tenants rely on; they are recorded
        // and count in this tenant's regret rate only (docs/learning-loop.md).
        None => {
            summary.scope = Some(Scope::Global);
            summary.reason = Some("global policies are not demoted by a tenant's regrets");
        }
        Some(owner) if owner == &msg.tenant => {
            if let Some(policy) = store.get_policy(Some(owner), &record.policy_id, None)? {
                let earlier = store.regrets_for_policy(&msg.tenant, &policy.id, policy.activated_at)?;
                let mut regrets = reader.counted_regrets(&msg.tenant, Some(owner), earlier)?;
                regrets.push(regret.clone());
                let (score, count) = learning::regret_score(&regrets, policy.activated_at, at);
                let demote = policy.mode == Mode::Active && learning::should_demote(score, count);
                if demote {
                    let approval = Approval {
                        caller: msg.caller.clone(),
                        path: ApprovalPath::AutoRegret,
                        reason: Some(format!("regret score {score:.2} from {count} regrets")),
                    };
                    let next = PolicyChange::mode(&policy, Mode::Disabled, approval, at).write(&mut batch);
                    tracing::warn!(policy_id = %next.id, score, count, "policy demoted by regret");
                }
                summary = RegretEffect {
                    demoted: demote,
                    policy_id: policy.id.clone(),
                    reason: None,
                    regret_score: Some(score),
                    regrets_since_activation: Some(count),
                    scope: Some(Scope::Tenant),
                };
            }
        }
        Some(_) => {}
    }
    Ok((batch, RegretAnswer { policy: summary, regret }))
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
    type Result = Answer<Graduation>;

    fn handle(&mut self, msg: TenantGraduation, _: &mut Self::Context) -> Self::Result {
        // Reading a 30-day window of evidence is the learning loop's heaviest read.
        let tenant = msg.tenant.clone();
        self.serialised_as(vec![Some(tenant.clone())], Some(tenant), move |shared| {
            plan_graduation(&shared.store, &msg.tenant)
        })
    }
}

fn plan_graduation(store: &Store, tenant: &TenantId) -> Result<(WriteBatch, Graduation), NodeError> {
    let at = now();
    let g = gather(store, tenant, at)?;
    let evidence = TenantEvidence {
        records: &g.records,
        policies: &g.policies,
        incidents: &g.incidents,
        regrets: &g.regrets,
        demotions: &g.demotions,
    };
    let gates = learning::tenant_gates(&evidence, at);
    let stored = store.graduation(tenant)?;
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
    let mut history = all_pages(|page| store.graduation_history(tenant, page))?;
    if changed {
        batch.set_graduation(tenant.clone(), state.clone());
        history.push(state.clone());
    }
    let history = history
        .into_iter()
        .map(|h| GraduationStep { at: h.at, degraded_from: h.degraded_from, level: h.level, reason: h.reason })
        .collect();
    let view = Graduation {
        degraded_from: state.degraded_from,
        evaluated_at: at,
        gates: Gates {
            prevention: PreventionGate {
                counted_preventions: gates.counted_preventions,
                last_prevention_at: gates.last_prevention_at,
                missed_recurrences: gates.missed_recurrences,
                passed: gates.prevention_passed,
                prevention_rate: gates.prevention_rate,
            },
            rollback: RollbackGate {
                demotions: gates.demotions,
                passed: gates.rollback_passed,
                regret_rate: gates.regret_rate,
                regrets: gates.regrets,
            },
        },
        history,
        level: state.level,
        reason: state.reason,
        tenant_id: tenant.clone(),
    };
    Ok((batch, view))
}

#[cfg(test)]
mod tests {
    use runguard_contract::{Action, Phase, RunId, StepCall};

    use super::*;
    use crate::actors::run::{CreateRun, Step};
    use crate::actors::test_support::Node;

    fn tenant(name: &str) -> TenantId {
        TenantId::new(name).unwrap()
    }

    fn draft(run: &str) -> IncidentDraft {
        IncidentDraft {
            tenant: tenant("acme"),
            run_id: RunId::new(run).unwrap(),
            signature: Signature::normalize(Some("charge"), Some("/v1/pay"), &[]),
            error: StepError { error_type: Some("timeout".into()), ..StepError::default() },
        }
    }

    #[actix_rt::test]
    async fn a_failed_run_end_creates_its_incident_and_counts_its_pattern() {
        let node = Node::start(|_| {});
        let mut incidents = Vec::new();
        for run in ["run_1", "run_2"] {
            let end = CommitRunEnd { batch: WriteBatch::new(), incident: Some(draft(run)) };
            incidents.push(node.learning.send(end).await.unwrap().unwrap().expect("an incident"));
        }
        let first = node.store.get_incident(&tenant("acme"), &incidents[0]).unwrap().expect("stored");
        let second = node.store.get_incident(&tenant("acme"), &incidents[1]).unwrap().expect("stored");
        assert_eq!(first.pattern_id, second.pattern_id, "one signature, one pattern");
        let pattern = node.store.get_pattern(&tenant("acme"), &first.pattern_id).unwrap().unwrap();
        assert_eq!(pattern.occurrences, 2);
        let plain = node.learning.send(CommitRunEnd { batch: WriteBatch::new(), incident: None }).await.unwrap();
        assert!(plain.unwrap().is_none(), "an end without an incident only commits");
    }

    #[actix_rt::test]
    async fn a_regret_is_recorded_once_and_answered_with_its_effect() {
        let node = Node::start(|_| {});
        let deny = serde_json::json!({
            "id": "pol_deny_rm", "name": "deny rm", "mode": "active", "rule": { "kind": "skill", "deny": ["rm"] }
        });
        let policy = node.policy("acme", deny);
        let run = node.run("acme", "run_1").await;
        run.send(CreateRun { labels: Default::default(), api_endpoint: None, ancestors: Vec::new() })
            .await
            .unwrap()
            .unwrap();
        let call = StepCall { skill: Some("rm".into()), ..StepCall::new(0, Phase::Pre) };
        let decision = run.send(Step(Box::new(call))).await.unwrap().unwrap();
        assert_eq!(decision.action, Action::Block);
        let records = node.store.list_records(&RecordQuery::tenant(tenant("acme"))).unwrap().items;
        let record = records.first().expect("the block left a prevention record");
        let regret = |severity| RegretRecord {
            tenant: tenant("acme"),
            record_id: record.id.clone(),
            severity,
            note: None,
            caller: "op".into(),
        };
        let answer = node.learning.send(regret(3)).await.unwrap().unwrap();
        assert_eq!(answer.policy.policy_id, policy.id);
        assert_eq!(answer.policy.scope, Some(Scope::Tenant));
        assert_eq!(answer.policy.regrets_since_activation, Some(1));
        // The wire shape: the keys the node has always answered, in their order.
        let wire = serde_json::to_string(&answer.policy).unwrap();
        let keys = ["\"demoted\"", "\"policy_id\"", "\"regret_score\"", "\"regrets_since_activation\"", "\"scope\""];
        let at: Vec<usize> = keys.iter().map(|k| wire.find(k).expect(k)).collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]) && !wire.contains("\"reason\""), "{wire}");
        assert!(node.store.get_regret(&record.id).unwrap().is_some());
        let again = node.learning.send(regret(5)).await.unwrap().unwrap_err();
        assert!(matches!(again, NodeError::Conflict { code: "already_regretted", .. }), "{again:?}");
    }

    #[actix_rt::test]
    async fn a_tenant_with_too_many_waiting_requests_is_refused_and_others_are_not() {
        let node = Node::start(|_| {});
        let mut learning = Learning::new(std::sync::Arc::clone(&node.shared));
        // As many waiting requests as a tenant may have, each holding a clone of its lock.
        let waiting: Vec<_> = (0..WAITING_PER_TENANT).map(|_| learning.lock(Some(tenant("busy")))).collect();
        let refused = learning.serialised(vec![Some(tenant("busy"))], |_| Ok((WriteBatch::new(), ()))).await;
        assert!(matches!(refused, Err(NodeError::Unavailable { retry_after_s: 1, .. })), "{refused:?}");
        let other = learning.serialised(vec![Some(tenant("calm"))], |_| Ok((WriteBatch::new(), ()))).await;
        assert!(other.is_ok(), "another tenant is served");
        drop(waiting);
        let served = learning.serialised(vec![Some(tenant("busy"))], |_| Ok((WriteBatch::new(), ()))).await;
        assert!(served.is_ok(), "the tenant is served again once its queue drains");
    }
}

#[cfg(test)]
mod wire {
    use runguard_contract::Timestamp;
    use serde_json::json;

    use super::*;

    /// The typed answers serialise byte for byte as the JSON objects the node built before them (keys in
    /// alphabetical order, `null` for absent options).
    #[test]
    fn typed_answers_keep_the_json_the_node_always_answered() {
        let at = Timestamp::from_unix_millis(1_700_000_000_000);
        let tenant = TenantId::new("acme").unwrap();
        let answer = Graduation {
            degraded_from: None,
            evaluated_at: at,
            gates: Gates {
                prevention: PreventionGate {
                    counted_preventions: 3,
                    last_prevention_at: Some(at),
                    missed_recurrences: 1,
                    passed: true,
                    prevention_rate: 0.75,
                },
                rollback: RollbackGate { demotions: 0, passed: false, regret_rate: 0.5, regrets: 2 },
            },
            history: vec![GraduationStep { at, degraded_from: Some("l2".into()), level: "l1".into(), reason: None }],
            level: "l1".into(),
            reason: Some("why".into()),
            tenant_id: tenant.clone(),
        };
        let before = json!({
            "tenant_id": tenant,
            "level": "l1",
            "degraded_from": null,
            "reason": "why",
            "evaluated_at": at,
            "gates": {
                "prevention": {
                    "passed": true, "counted_preventions": 3, "missed_recurrences": 1,
                    "prevention_rate": 0.75, "last_prevention_at": at,
                },
                "rollback": { "passed": false, "demotions": 0, "regrets": 2, "regret_rate": 0.5 },
            },
            "history": [{ "level": "l1", "degraded_from": "l2", "reason": null, "at": at }],
        });
        assert_eq!(serde_json::to_string(&answer).unwrap(), before.to_string());
        let global = RegretEffect {
            demoted: false,
            policy_id: PolicyId::new("pol_1").unwrap(),
            reason: Some("global policies are not demoted by a tenant's regrets"),
            regret_score: None,
            regrets_since_activation: None,
            scope: Some(Scope::Global),
        };
        let before = json!({
            "policy_id": "pol_1", "scope": Scope::Global, "demoted": false,
            "reason": "global policies are not demoted by a tenant's regrets",
        });
        assert_eq!(serde_json::to_string(&global).unwrap(), before.to_string());
        let unknown = RegretEffect { reason: None, scope: None, ..global };
        assert_eq!(
            serde_json::to_string(&unknown).unwrap(),
            json!({ "policy_id": "pol_1", "demoted": false }).to_string()
        );
    }
}
