//! Bulk-writes durable blocks straight through `Store::commit` (as the node's writer does), to measure
//! restart time over a large store without driving a million HTTP calls.
//!
//! Each block is one run stopped at its step 0 by a token budget: its ledger entry, its prevention record
//! (contract-checked, chained and indexed by the store) and the stopped run.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::Context as _;
use runguard_contract::{
    Action, BudgetMetric, BudgetPer, BudgetRule, Decision, DecisionId, DecisionPhase, IncidentId, Mode, NextCall,
    Phase, Policy, PolicyDocument, PolicyId, PolicyRef, PreventionRecord, RecordHash, RecordId, Remaining, Rule, RunId,
    RunStatus, Scope, Snapshot, SnapshotRef, StepCall, TenantId, TerminationReason, Timestamp, Totals, Violation,
    ViolationType,
};
use runguard_store::{LedgerCall, LedgerEntry, Store, StoreOptions, StoredRun, WriteBatch};

fn at(ms: u64) -> Timestamp {
    Timestamp::from_unix_millis(1_790_000_000_000 + i64::try_from(ms).unwrap_or(i64::MAX))
}

struct World {
    tenant: TenantId,
    policy: Policy,
    snapshot: Snapshot,
    snapshot_ref: SnapshotRef,
}

impl World {
    fn new() -> anyhow::Result<Self> {
        let tenant = TenantId::new("default")?;
        let doc = PolicyDocument {
            id: None,
            name: "run token budget".to_owned(),
            scope: Scope::Tenant,
            mode: Mode::Active,
            action: Default::default(),
            precedence: 100,
            on_error: Default::default(),
            bind_at: None,
            rule: Rule::Budget(BudgetRule {
                metric: BudgetMetric::Tokens,
                per: BudgetPer::Run,
                max: 100,
                warn_at: Vec::new(),
                period: None,
                labels: Default::default(),
            }),
        };
        let policy = Policy::create(doc, PolicyId::new("fill_budget")?, Some(tenant.clone()), at(0));
        let snapshot = Snapshot::capture(&tenant, [&policy]);
        let snapshot_ref = snapshot.reference()?;
        Ok(Self { tenant, policy, snapshot, snapshot_ref })
    }

    fn push_block(&self, batch: &mut WriteBatch, n: u64) -> anyhow::Result<()> {
        let run_id = RunId::new(format!("fill-{n:08}"))?;
        let when = at(n + 1);
        let record_id = RecordId::new(format!("prv_fill_{n:08}"))?;
        let policy_ref =
            PolicyRef { id: self.policy.id.clone(), name: self.policy.name.clone(), version: self.policy.version };
        let decision = Decision {
            decision_id: DecisionId::new(format!("dec_fill_{n:08}"))?,
            run_id: run_id.clone(),
            step_index: Some(0),
            phase: DecisionPhase::Post,
            action: Action::Block,
            deciding_policy: Some(policy_ref),
            violations: vec![Violation {
                policy_id: self.policy.id.clone(),
                policy_name: self.policy.name.clone(),
                policy_version: self.policy.version,
                violation_type: ViolationType::TokenLimit,
                action: Action::Block,
                threshold: Some("100".into()),
                actual: Some("812".into()),
                reason: "run tokens 812 exceed 100".into(),
                evidence: None,
                run_id: None,
            }],
            shadow: Vec::new(),
            remaining: Remaining { tokens: Some(0), ..Remaining::default() },
            retry_after_ms: None,
            snapshot_hash: self.snapshot_ref.hash.clone(),
            prevention_record_id: Some(record_id.clone()),
            evaluated_at: when,
        };
        let record = PreventionRecord {
            id: record_id,
            seq: 0,
            tenant_id: self.tenant.clone(),
            run_id: run_id.clone(),
            step_index: Some(0),
            phase: DecisionPhase::Post,
            decision_id: decision.decision_id.clone(),
            policy_id: self.policy.id.clone(),
            policy_version: self.policy.version,
            pattern_id: None,
            signature_hash: None,
            incident_id_blocked: IncidentId::new(format!("inc_fill_{n:08}"))?,
            snapshot_hash: self.snapshot_ref.hash.clone(),
            prevented_at: when,
            is_simulated: false,
            prev_hash: RecordHash::genesis(),
            hash: RecordHash::genesis(),
        };
        let run = StoredRun {
            tenant_id: self.tenant.clone(),
            run_id: run_id.clone(),
            snapshot: self.snapshot_ref.clone(),
            status: RunStatus::Stopped,
            totals: Totals::default(),
            termination_reason: Some(TerminationReason::PolicyBlock),
            stopped_at_step: Some(0),
            violation_policy_id: Some(self.policy.id.clone()),
            labels: BTreeMap::from([("team".to_owned(), "fill".to_owned())]),
            api_endpoint: None,
            created_at: at(n),
            ended_at: Some(when),
            outcome: None,
            next: NextCall { index: 0, phase: Phase::Post },
            parent_run_id: None,
            ancestors: Vec::new(),
            violation_run_id: None,
        };
        batch.append_ledger(
            self.tenant.clone(),
            run_id,
            LedgerEntry::new(LedgerCall::Step(StepCall::new(0, Phase::Post)), decision.clone(), Totals::default()),
        );
        batch.append_record(record, decision, self.policy.clone(), self.tenant.clone());
        batch.put_run(run);
        Ok(())
    }
}

/// Writes `records` durable blocks into the store at `dir` in commits of `batch` blocks each.
pub fn fill(dir: &Path, records: u64, batch: u64) -> anyhow::Result<()> {
    let store = Store::open(dir, &StoreOptions::default()).context("cannot open the store")?;
    let world = World::new()?;
    // The chain head is the sequence number of the last record (0 when there is none).
    let (existing, _) = store.chain_head()?;
    if existing == 0 {
        let mut setup = WriteBatch::new();
        setup.put_policy_version(world.policy.clone());
        setup.put_snapshot(world.snapshot.clone());
        store.commit(setup)?;
    }
    let started = Instant::now();
    let mut n = existing;
    while n < records {
        let mut writes = WriteBatch::new();
        let end = (n + batch.max(1)).min(records);
        while n < end {
            world.push_block(&mut writes, n)?;
            n += 1;
        }
        store.commit(writes)?;
        if n % 100_000 == 0 {
            eprintln!("  {n} records, {:.0} s", started.elapsed().as_secs_f64());
        }
    }
    let (last_seq, _) = store.chain_head()?;
    eprintln!(
        "store holds {} records ({} written in {:.1} s)",
        last_seq,
        records.saturating_sub(existing),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
