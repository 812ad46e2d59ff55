//! runguard-engine beside `cedar-policy` and `regorus` (OPA's Rego in Rust), evaluating the same
//! 4-budget rule set on the same step in one criterion run.
//!
//! The rule set (the engine bench's `four_budgets`, SPEC §11's "typical snapshot"):
//! run tokens ≤ 100,000 with warn tiers at 50 % and 90 %, run cost ≤ 5,000,000 µ$, run steps ≤ 200 and
//! step tokens ≤ 16,000. The call is the `post` of step 6 of a run that has taken six steps of 1,200
//! tokens, 2,400 µ$ each; it reports 1,200 tokens and 2,400 µ$, so every rule is allowed.
//!
//! Each timed iteration does what a per-call decision needs in that system, from the run's totals and
//! the call's usage to an answer that names the outcome and any warn tiers:
//! - runguard: `Run::step` on the warmed run, a full outcome (admission, decision with ids, `remaining`,
//!   effects), uncommitted;
//! - cedar: build the request context (totals after the call, step tokens), `is_authorized` over four
//!   `forbid` limits, one `permit` and two warn-tier `permit`s whose ids appear in the diagnostics;
//! - regorus: build the input value, `eval_rule` of a Rego rule that returns `{block, violations, warnings}`.
//!
//! The baseline is the same trivial operation as the engine bench (adding a step's usage to the run's
//! totals), so ratios
//! compare across both benches. Run: `just bench-peers`.

use std::hint::black_box;
use std::str::FromStr;

use cedar_policy::{Authorizer, Context, Decision, Entities, EntityUid, PolicySet, Request, RestrictedExpression};
use criterion::{Criterion, criterion_group};
use runguard_contract::{
    Action, Phase, Policy, PolicyDocument, PolicyLimits, RunId, Snapshot, StepCall, TenantId, Timestamp, Usage,
};
use std::sync::Arc;

use runguard_engine::{CompiledSnapshot, Run, RunLimits, TenantRates, validate_document};
use serde_json::json;

const START_MS: i64 = 1_795_000_000_000;
const WARM_STEPS: u64 = 6;
const USAGE: Usage = Usage { tokens: 1_200, cost_micros: 2_400, duration_ms: 850 };

fn tenant() -> TenantId {
    TenantId::new("acme").expect("valid tenant")
}

fn budget(id: &str, metric: &str, per: &str, max: u64, warn_at: &[u32]) -> Policy {
    let limits = PolicyLimits::default();
    let doc = json!({ "id": id, "name": format!("{per} {metric} budget"),
        "rule": { "kind": "budget", "metric": metric, "per": per, "max": max, "warn_at": warn_at } });
    let doc = PolicyDocument::from_value(doc, &limits).expect("the budget parses");
    validate_document(&doc, &limits).expect("the budget is valid");
    Policy::create(
        doc,
        runguard_contract::PolicyId::new(id).expect("id"),
        Some(tenant()),
        Timestamp::from_unix_millis(START_MS),
    )
}

fn post(index: u64) -> StepCall {
    StepCall { skill: Some("search".to_owned()), usage: Some(USAGE), ..StepCall::new(index, Phase::Post) }
}

fn at(index: u64, post: bool) -> Timestamp {
    Timestamp::from_unix_millis(
        START_MS + 10_000 + 2_000 * i64::try_from(index).expect("small") + if post { 1_000 } else { 0 },
    )
}

/// The totals once a step's usage is added (the engine bench's baseline).
fn totals_with(totals: &runguard_contract::Totals, usage: &Usage) -> runguard_contract::Totals {
    runguard_contract::Totals {
        tokens: totals.tokens.saturating_add(usage.tokens),
        cost_micros: totals.cost_micros.saturating_add(usage.cost_micros),
        steps: totals.steps.saturating_add(1),
        duration_ms: totals.duration_ms.saturating_add(usage.duration_ms),
    }
}

struct Runguard {
    run: Run,
    call: StepCall,
    limits: RunLimits,
}

impl Runguard {
    fn new() -> Self {
        let policies = vec![
            budget("b_tokens_run", "tokens", "run", 100_000, &[50, 90]),
            budget("b_cost_run", "cost_micros", "run", 5_000_000, &[]),
            budget("b_steps_run", "steps", "run", 200, &[]),
            budget("b_tokens_step", "tokens", "step", 16_000, &[]),
        ];
        let snapshot = CompiledSnapshot::compile(&Snapshot::capture(&tenant(), &policies), &PolicyLimits::default())
            .expect("the snapshot compiles");
        let (mut run, start) = Run::start(
            Arc::new(snapshot),
            tenant(),
            RunId::new("run-bench").expect("id"),
            Default::default(),
            at(0, false),
        );
        run.commit(start);
        let limits = RunLimits::default();
        for index in 0..WARM_STEPS {
            let outcome =
                run.step(&post(index), &limits, &mut TenantRates::default(), at(index, true)).expect("in order");
            assert_eq!(outcome.decision.action, Action::Allow);
            run.commit(outcome);
        }
        Self { run, call: post(WARM_STEPS), limits }
    }

    fn decide(&self) -> Action {
        let outcome = black_box(&self.run)
            .step(black_box(&self.call), &self.limits, &mut TenantRates::default(), black_box(at(WARM_STEPS, true)))
            .expect("in order");
        outcome.decision.action
    }
}

/// The four budgets in Cedar: a limit is a `forbid`; a warn tier is an annotated `permit` that shows up
/// in the diagnostics of an allowed request.
const CEDAR: &str = r#"
@id("allow_all") permit(principal, action, resource);
@id("b_tokens_run") forbid(principal, action == Action::"post", resource) when { context.run_tokens > 100000 };
@id("b_cost_run") forbid(principal, action == Action::"post", resource) when { context.run_cost_micros > 5000000 };
@id("b_steps_run") forbid(principal, action == Action::"post", resource) when { context.run_steps > 200 };
@id("b_tokens_step") forbid(principal, action == Action::"post", resource) when { context.step_tokens > 16000 };
@id("b_tokens_run_warn_50") @tier("warn") permit(principal, action == Action::"post", resource) when { context.run_tokens * 100 >= 100000 * 50 };
@id("b_tokens_run_warn_90") @tier("warn") permit(principal, action == Action::"post", resource) when { context.run_tokens * 100 >= 100000 * 90 };
"#;

struct Cedar {
    policies: PolicySet,
    authorizer: Authorizer,
    entities: Entities,
    principal: EntityUid,
    action: EntityUid,
    resource: EntityUid,
    totals: runguard_contract::Totals,
}

impl Cedar {
    fn new(totals: runguard_contract::Totals) -> Self {
        Self {
            policies: PolicySet::from_str(CEDAR).expect("the Cedar policies parse"),
            authorizer: Authorizer::new(),
            entities: Entities::empty(),
            principal: EntityUid::from_str(r#"Run::"run-bench""#).expect("uid"),
            action: EntityUid::from_str(r#"Action::"post""#).expect("uid"),
            resource: EntityUid::from_str(r#"Tenant::"acme""#).expect("uid"),
            totals,
        }
    }

    /// Allowed?, and how many warn tiers fired.
    fn decide(&self, usage: &Usage) -> (bool, usize) {
        let t = &self.totals;
        let long = |v: u64| RestrictedExpression::new_long(i64::try_from(v).unwrap_or(i64::MAX));
        let context = Context::from_pairs([
            ("run_tokens".to_owned(), long(t.tokens + usage.tokens)),
            ("run_cost_micros".to_owned(), long(t.cost_micros + usage.cost_micros)),
            ("run_steps".to_owned(), long(t.steps + 1)),
            ("step_tokens".to_owned(), long(usage.tokens)),
        ])
        .expect("context");
        let request = Request::new(self.principal.clone(), self.action.clone(), self.resource.clone(), context, None)
            .expect("request");
        let response = self.authorizer.is_authorized(&request, black_box(&self.policies), &self.entities);
        let allowed = response.decision() == Decision::Allow;
        let warnings = response
            .diagnostics()
            .reason()
            .filter(|id| self.policies.policy(id).and_then(|p| p.annotation("tier")) == Some("warn"))
            .count();
        (allowed, warnings)
    }
}

/// The four budgets in Rego.
const REGO: &str = r#"
package runguard

import rego.v1

violations contains "b_tokens_run" if input.run.tokens > 100000
violations contains "b_cost_run" if input.run.cost_micros > 5000000
violations contains "b_steps_run" if input.run.steps > 200
violations contains "b_tokens_step" if input.step.tokens > 16000

warnings contains tier if {
	some tier in [50, 90]
	input.run.tokens * 100 >= 100000 * tier
}

decision := {"block": count(violations) > 0, "violations": violations, "warnings": warnings}
"#;

struct Rego {
    engine: regorus::Engine,
    totals: runguard_contract::Totals,
}

impl Rego {
    fn new(totals: runguard_contract::Totals) -> Self {
        let mut engine = regorus::Engine::new();
        engine.add_policy("runguard.rego".to_owned(), REGO.to_owned()).expect("the Rego policy parses");
        Self { engine, totals }
    }

    /// Blocked?, and how many warn tiers fired.
    fn decide(&mut self, usage: &Usage) -> (bool, usize) {
        let t = &self.totals;
        let mut run = std::collections::BTreeMap::new();
        run.insert(regorus::Value::from("tokens"), regorus::Value::from(t.tokens + usage.tokens));
        run.insert(regorus::Value::from("cost_micros"), regorus::Value::from(t.cost_micros + usage.cost_micros));
        run.insert(regorus::Value::from("steps"), regorus::Value::from(t.steps + 1));
        let mut step = std::collections::BTreeMap::new();
        step.insert(regorus::Value::from("tokens"), regorus::Value::from(usage.tokens));
        let mut input = std::collections::BTreeMap::new();
        input.insert(regorus::Value::from("run"), regorus::Value::from(run));
        input.insert(regorus::Value::from("step"), regorus::Value::from(step));
        self.engine.set_input(regorus::Value::from(input));
        let decision = self.engine.eval_rule("data.runguard.decision".to_owned()).expect("the rule evaluates");
        let block = decision["block"] == regorus::Value::from(true);
        let warnings = decision["warnings"].as_set().map(|s| s.len()).unwrap_or(0);
        (block, warnings)
    }
}

fn peers(c: &mut Criterion) {
    let runguard = Runguard::new();
    let totals = runguard.run.state().totals;
    assert_eq!(runguard.decide(), Action::Allow, "runguard allows the benched call");
    let cedar = Cedar::new(totals);
    assert_eq!(cedar.decide(&USAGE), (true, 0), "cedar allows the benched call, no warn tier");
    let mut rego = Rego::new(totals);
    assert_eq!(rego.decide(&USAGE), (false, 0), "rego allows the benched call, no warn tier");
    // The rule sets agree where they should block and warn, too: a run past 50 % of its token budget
    // warns once, a step over 16,000 tokens blocks.
    let late = runguard_contract::Totals { tokens: 45_000, ..totals };
    let heavy = Usage { tokens: 6_000, ..USAGE };
    let over = Usage { tokens: 17_000, ..USAGE };
    assert_eq!(Cedar::new(late).decide(&heavy), (true, 1));
    assert_eq!(Rego::new(late).decide(&heavy), (false, 1));
    assert!(!cedar.decide(&over).0);
    assert!(rego.decide(&over).0);

    let mut group = c.benchmark_group("peers_four_budgets");
    group.bench_function("baseline_totals_with", |b| {
        b.iter(|| totals_with(black_box(&runguard.run.state().totals), black_box(&USAGE)))
    });
    group.bench_function("runguard", |b| b.iter(|| runguard.decide()));
    group.bench_function("cedar", |b| b.iter(|| cedar.decide(black_box(&USAGE))));
    group.bench_function("regorus", |b| b.iter(|| rego.decide(black_box(&USAGE))));
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(3))
        .sample_size(50);
    targets = peers
}
/// Reads criterion's median estimate (ns) of `bench` in this group from its output directory.
fn median_ns(bench: &str) -> Option<f64> {
    // The bench binary lives in <target>/<profile>/deps; criterion writes to <target>/criterion.
    let exe = std::env::current_exe().ok()?;
    let target = exe.parent()?.parent()?.parent()?;
    let path = target.join("criterion").join("peers_four_budgets").join(bench).join("new").join("estimates.json");
    let estimates: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    estimates["median"]["point_estimate"].as_f64()
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    let Some(baseline) = median_ns("baseline_totals_with") else { return };
    let Some(runguard) = median_ns("runguard") else { return };
    println!("\nmedians, ratio to the baseline and to runguard (same run):");
    for name in ["baseline_totals_with", "runguard", "cedar", "regorus"] {
        if let Some(ns) = median_ns(name) {
            println!(
                "  {name:<22} {:>10.1} ns  {:>8.0}x baseline  {:>6.2}x runguard",
                ns,
                ns / baseline,
                ns / runguard
            );
        }
    }
}
