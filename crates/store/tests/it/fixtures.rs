//! Shared test fixtures: a tenant with a block policy, its snapshot, runs, decisions and records.
//!
//! Included by the `it` integration binary and by the crate's unit tests.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::collections::BTreeMap;

use runguard_contract::{
    Action, BudgetMetric, BudgetPer, BudgetRule, Decision, DecisionId, DecisionPhase, IncidentId, Mode, NextCall,
    Phase, Policy, PolicyDocument, PolicyId, PolicyRef, PreventionRecord, RecordHash, RecordId, Remaining, Rule, RunId,
    RunStatus, Scope, Snapshot, SnapshotRef, StepCall, TenantId, Timestamp, Totals, Usage, Violation, ViolationType,
};
use runguard_store::{LedgerCall, LedgerEntry, StoredRun, WriteBatch};

/// A time in milliseconds after a fixed epoch.
pub fn at(ms: i64) -> Timestamp {
    Timestamp::from_unix_millis(1_790_000_000_000 + ms)
}

/// A tenant.
pub fn tenant(name: &str) -> TenantId {
    TenantId::new(name).unwrap()
}

/// A token budget policy of `tenant` (global when `None`).
pub fn budget_policy(tenant: Option<&TenantId>, id: &str, mode: Mode, max: u64) -> Policy {
    let doc = PolicyDocument {
        id: None,
        name: format!("budget {id}"),
        scope: if tenant.is_some() { Scope::Tenant } else { Scope::Global },
        mode,
        action: Default::default(),
        precedence: 100,
        on_error: Default::default(),
        bind_at: None,
        rule: Rule::Budget(BudgetRule {
            metric: BudgetMetric::Tokens,
            per: BudgetPer::Run,
            max,
            warn_at: vec![80],
            period: None,
            labels: Default::default(),
        }),
    };
    Policy::create(doc, PolicyId::new(id).unwrap(), tenant.cloned(), at(0))
}

/// A tenant with one active block policy and its snapshot.
#[derive(Clone, Debug)]
pub struct World {
    pub tenant: TenantId,
    pub policy: Policy,
    pub snapshot: Snapshot,
    pub snapshot_ref: SnapshotRef,
}

impl World {
    pub fn new(tenant_name: &str) -> Self {
        let tenant = tenant(tenant_name);
        let policy = budget_policy(Some(&tenant), "pol_budget", Mode::Active, 100);
        let snapshot = Snapshot::capture(&tenant, [&policy]);
        let snapshot_ref = snapshot.reference().unwrap();
        Self { tenant, policy, snapshot, snapshot_ref }
    }

    /// Policy, snapshot: what must be stored before runs.
    pub fn setup(&self, batch: &mut WriteBatch) {
        batch.put_policy_version(self.policy.clone());
        batch.put_snapshot(self.snapshot.clone());
    }

    pub fn run(&self, run_id: &str) -> StoredRun {
        StoredRun {
            tenant_id: self.tenant.clone(),
            run_id: RunId::new(run_id).unwrap(),
            snapshot: self.snapshot_ref.clone(),
            status: RunStatus::Running,
            totals: Totals::default(),
            termination_reason: None,
            stopped_at_step: None,
            violation_policy_id: None,
            labels: BTreeMap::from([("team".to_owned(), "red".to_owned())]),
            api_endpoint: None,
            created_at: at(1),
            ended_at: None,
            outcome: None,
            next: NextCall { index: 0, phase: Phase::Pre },
            parent_run_id: None,
            ancestors: Vec::new(),
            violation_run_id: None,
        }
    }

    /// An allow decision for the post of `step`.
    pub fn allow(&self, run: &RunId, step: u64) -> Decision {
        Decision {
            decision_id: DecisionId::new(format!("dec_{run}_{step}_allow")).unwrap(),
            run_id: run.clone(),
            step_index: Some(step),
            phase: DecisionPhase::Post,
            action: Action::Allow,
            deciding_policy: None,
            violations: Vec::new(),
            shadow: Vec::new(),
            remaining: Remaining { tokens: Some(50), ..Remaining::default() },
            retry_after_ms: None,
            snapshot_hash: self.snapshot_ref.hash.clone(),
            prevention_record_id: None,
            evaluated_at: at(10 + i64::try_from(step).unwrap()),
        }
    }

    /// A block decision by the world's policy at the post of `step`, naming `record`.
    pub fn block(&self, run: &RunId, step: u64, record: &RecordId, when: Timestamp) -> Decision {
        Decision {
            decision_id: DecisionId::new(format!("dec_{run}_{step}_block")).unwrap(),
            action: Action::Block,
            deciding_policy: Some(PolicyRef {
                id: self.policy.id.clone(),
                name: self.policy.name.clone(),
                version: self.policy.version,
            }),
            violations: vec![Violation {
                policy_id: self.policy.id.clone(),
                policy_name: self.policy.name.clone(),
                policy_version: self.policy.version,
                violation_type: ViolationType::TokenLimit,
                action: Action::Block,
                threshold: Some("100".into()),
                actual: Some("101".into()),
                reason: "run tokens 101 exceed 100".into(),
                evidence: None,
                run_id: None,
            }],
            remaining: Remaining { tokens: Some(0), ..Remaining::default() },
            prevention_record_id: Some(record.clone()),
            evaluated_at: when,
            ..self.allow(run, step)
        }
    }

    /// The (unsealed) record that `decision` earns.
    pub fn record_for(&self, decision: &Decision, when: Timestamp) -> PreventionRecord {
        PreventionRecord {
            id: decision.prevention_record_id.clone().unwrap(),
            seq: 0,
            tenant_id: self.tenant.clone(),
            run_id: decision.run_id.clone(),
            step_index: decision.step_index,
            phase: decision.phase,
            decision_id: decision.decision_id.clone(),
            policy_id: self.policy.id.clone(),
            policy_version: self.policy.version,
            pattern_id: None,
            signature_hash: None,
            incident_id_blocked: IncidentId::new(format!("inc_{}", decision.decision_id)).unwrap(),
            snapshot_hash: decision.snapshot_hash.clone(),
            prevented_at: when,
            is_simulated: false,
            prev_hash: RecordHash::genesis(),
            hash: RecordHash::genesis(),
        }
    }

    /// Adds a live block of `run` at `step` to `batch`: ledger entry, record and the stopped run.
    /// Returns the record id.
    pub fn push_block(&self, batch: &mut WriteBatch, run: &StoredRun, step: u64, when: Timestamp) -> RecordId {
        let record_id = RecordId::new(format!("prv_{}_{step}", run.run_id)).unwrap();
        let decision = self.block(&run.run_id, step, &record_id, when);
        let record = self.record_for(&decision, when);
        let mut stopped = run.clone();
        stopped.status = RunStatus::Stopped;
        stopped.termination_reason = Some(runguard_contract::TerminationReason::PolicyBlock);
        stopped.stopped_at_step = Some(step);
        stopped.violation_policy_id = Some(self.policy.id.clone());
        stopped.ended_at = Some(when);
        batch.append_ledger(
            run.tenant_id.clone(),
            run.run_id.clone(),
            LedgerEntry::new(LedgerCall::Step(StepCall::new(step, Phase::Post)), decision.clone(), run.totals),
        );
        batch.append_record(record, decision, self.policy.clone(), self.tenant.clone());
        batch.put_run(stopped);
        record_id
    }

    /// A post call using `tokens`, its allow decision and the new totals.
    pub fn post(&self, run: &mut StoredRun, step: u64, tokens: u64) -> LedgerEntry {
        let mut call = StepCall::new(step, Phase::Post);
        call.usage = Some(Usage { tokens, cost_micros: 2 * tokens, duration_ms: 3 });
        run.totals.tokens += tokens;
        run.totals.cost_micros += 2 * tokens;
        run.totals.duration_ms += 3;
        run.totals.steps += 1;
        run.next = NextCall { index: step + 1, phase: Phase::Pre };
        LedgerEntry::new(LedgerCall::Step(call), self.allow(&run.run_id, step), run.totals)
    }
}
