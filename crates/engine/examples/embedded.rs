//! Another service embedding the engine: compile a snapshot once, then answer each step of a run.
//!
//! `cargo run -p runguard-engine --example embedded`

use std::sync::Arc;

use runguard_contract::{
    Action, Phase, Policy, PolicyDocument, PolicyId, PolicyLimits, RunId, Snapshot, StepCall, TenantId, Timestamp,
    Usage,
};
use runguard_engine::{Admission, Call, CompiledSnapshot, RunState, TenantRates, evaluate};

const POLICIES: &[&str] = &[
    r#"{"id": "pol_tokens", "name": "Run token budget",
        "rule": {"kind": "budget", "metric": "tokens", "per": "run", "max": 3000, "warn_at": [50, 90]}}"#,
    r#"{"id": "pol_pii", "name": "No e-mail addresses in output",
        "rule": {"kind": "content", "target": "output", "detectors": ["email"]}}"#,
    r#"{"id": "pol_slow", "name": "Slow steps (shadow)", "mode": "shadow",
        "rule": {"kind": "expr", "cel": "has(step.usage) && step.usage.duration_ms > 2000"}}"#,
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
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

    let mut run = RunState::new(tenant, RunId::new("run-demo")?, Default::default());
    let tenant_rates = TenantRates::default();
    let outputs = ["looked it up", "wrote the summary", "mail it to jane.doe@example.com"];
    for (index, output) in (0u64..).zip(outputs) {
        let now = created.plus_millis(i64::try_from(index)? * 1000 + 1000);
        let step = StepCall {
            usage: Some(Usage { tokens: 1100, cost_micros: 2_000, duration_ms: 900 * (index + 1) }),
            output_text: Some(output.to_owned()),
            ..StepCall::new(index, Phase::Post)
        };
        if run.admit(&step) != Admission::Evaluate {
            break;
        }
        let evaluation = evaluate(&snapshot, &run, Call::Step(&step), &tenant_rates, now);
        let decision = &evaluation.decision;
        println!(
            "step {index}: {} (tokens left {:?}){}",
            decision.action,
            decision.remaining.tokens,
            decision.deciding_policy.as_ref().map(|p| format!(", decided by {}", p.id)).unwrap_or_default()
        );
        for violation in &decision.violations {
            println!("  {}: {}", violation.violation_type.as_str(), violation.reason);
        }
        for shadow in &decision.shadow {
            println!("  shadow {} would {}: {}", shadow.policy_id, shadow.would_action, shadow.reason);
        }
        if let Some(record) = &evaluation.record {
            println!("  prevention record {} for policy {}", record.id, record.policy_id);
        }
        run.apply(decision, &evaluation.effects);
        if decision.action == Action::Block {
            break;
        }
    }
    println!("run {}: {:?}", run.status.as_str(), run.totals);
    Ok(())
}
