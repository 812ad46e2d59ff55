//! Another service embedding the engine: compile a snapshot once, then drive each run through [`Run`]:
//! `step` computes an outcome, the service persists what it carries, `commit` applies it. Two runs of one
//! tenant share the tenant's rate windows, so the tenant-scope rate rule throttles the second run.
//!
//! `cargo run -p runguard-engine --example embedded`

use std::sync::Arc;

use runguard_contract::{
    Action, Phase, Policy, PolicyDocument, PolicyId, PolicyLimits, RunId, Snapshot, StepCall, TenantId, Timestamp,
    Usage,
};
use runguard_engine::{CompiledSnapshot, Run, RunLimits, TenantRates};

const POLICIES: &[&str] = &[
    r#"{"id": "pol_tokens", "name": "Run token budget",
        "rule": {"kind": "budget", "metric": "tokens", "per": "run", "max": 3000, "warn_at": [50, 90]}}"#,
    r#"{"id": "pol_tenant_rate", "name": "At most 3 steps a minute per tenant",
        "rule": {"kind": "rate", "metric": "steps", "max": 3, "window_s": 60, "scope": "tenant"}}"#,
    r#"{"id": "pol_pii", "name": "No e-mail addresses in output",
        "rule": {"kind": "content", "target": "output", "detectors": ["email"]}}"#,
    r#"{"id": "pol_slow", "name": "Slow steps (shadow)", "mode": "shadow",
        "rule": {"kind": "expr", "cel": "has(step.usage) && step.usage.duration_ms > 2000"}}"#,
];

/// Drives two runs of one tenant; returns each step's action, per run.
fn drive() -> Result<Vec<Vec<Action>>, Box<dyn std::error::Error>> {
    let tenant = TenantId::new("acme")?;
    let limits = PolicyLimits::default();
    let created = Timestamp::from_unix_millis(1_795_000_000_000);
    let mut policies = Vec::new();
    for json in POLICIES {
        let doc = PolicyDocument::from_json(json.as_bytes(), &limits)?;
        runguard_engine::validate_document(&doc, &limits)?;
        let id = doc.id.clone().unwrap_or_else(|| PolicyId::from_u128(1));
        policies.push(Policy::create(doc, id, Some(tenant.clone()), created));
    }
    let snapshot = Arc::new(CompiledSnapshot::compile(&Snapshot::capture(&tenant, &policies), &limits)?);
    println!("snapshot {} with {} policies", snapshot.reference().id, snapshot.reference().policy_count);

    // One per tenant, shared by all its runs (a multi-threaded host keeps it behind the tenant's lock).
    let mut tenant_rates = TenantRates::default();
    let mut actions = Vec::new();
    let outputs = ["looked it up", "wrote the summary", "mail it to jane.doe@example.com"];
    for (run_index, name) in (0i64..).zip(["run-demo-1", "run-demo-2"]) {
        let started = created.plus_millis(run_index * 10_000);
        let (mut run, outcome) =
            Run::start(Arc::clone(&snapshot), tenant.clone(), RunId::new(name)?, Default::default(), started);
        run.commit(outcome); // persist the run-start decision first, then commit
        let mut run_actions = Vec::new();
        for (index, output) in (0u64..).zip(outputs) {
            let now = started.plus_millis(i64::try_from(index)? * 1000 + 1000);
            // The `pre` call asks before the step runs (rate rules throttle it); the `post` reports it.
            let pre = StepCall { skill: Some("search".to_owned()), ..StepCall::new(index, Phase::Pre) };
            let post = StepCall {
                usage: Some(Usage { tokens: 1100, cost_micros: 2_000, duration_ms: 900 * (index + 1) }),
                output_text: Some(output.to_owned()),
                ..StepCall::new(index, Phase::Post)
            };
            let mut stop = false;
            for call in [pre, post] {
                let outcome = run.step(&call, &RunLimits::default(), &mut tenant_rates, now)?;
                let decision = &outcome.decision;
                println!(
                    "{name} step {index} {}: {}{}",
                    call.phase.as_str(),
                    decision.action,
                    decision.deciding_policy.as_ref().map(|p| format!(", decided by {}", p.id)).unwrap_or_default()
                );
                for violation in &decision.violations {
                    println!("  {}: {}", violation.violation_type.as_str(), violation.reason);
                }
                for shadow in outcome.shadow.iter().filter(|s| s.would_block > 0) {
                    println!("  shadow {} would block", shadow.policy_id);
                }
                if let Some(record) = &outcome.record {
                    println!("  prevention record {} for policy {}", record.id, record.policy_id);
                }
                let action = decision.action;
                run_actions.push(action);
                // A real host persists the outcome (ledger entry, record, shadow deltas) before this.
                run.commit(outcome);
                if matches!(action, Action::Block | Action::Throttle) {
                    stop = true;
                    break;
                }
            }
            if stop {
                break;
            }
        }
        println!("{name}: {:?}", run.state().status.as_str());
        actions.push(run_actions);
    }
    Ok(actions)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    drive().map(|_| ())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_tenant_rate_rule_throttles_the_second_run_and_the_budget_blocks_the_first() {
        use runguard_contract::Action::{Allow, Block, Throttle, Warn};

        let actions = super::drive().unwrap();
        // Run 1: two steps within budget (the second warns past 50 %), then the third step's `pre` is the
        // tenant's third step of the minute and is let through; its `post` crosses the token budget.
        assert_eq!(actions[0], vec![Allow, Allow, Allow, Warn, Allow, Block], "{actions:?}");
        // Run 2 shares the tenant's window, in which three steps were already taken: its first is throttled.
        assert_eq!(actions[1], vec![Throttle], "{actions:?}");
    }
}
