//! One log line per applied decision, with what an operator needs to find the run and the policy: every
//! decision at DEBUG, a throttle at INFO, a block and every fail-open at WARN. Matched content and texts
//! are never logged; the violation's reason is (it names thresholds and fields, not content).

use runguard_contract::{Action, Decision, PolicyRef, TenantId, ViolationType};
use runguard_engine::Outcome;

/// What a decision's log lines need, taken from an outcome before its decision moves into the ledger
/// entry, and written by [`Deferred::applied`] once the decision is durable. Copied only when a line will
/// be written: an allow or warn without fail-opens is a DEBUG line, off unless asked for.
#[derive(Debug)]
#[must_use = "a deferred decision line is written by `applied`"]
pub struct Deferred(Option<Box<(Decision, Vec<PolicyRef>)>>);

impl Deferred {
    /// The lines `outcome` will need.
    pub fn of(outcome: &Outcome) -> Self {
        let quiet = matches!(outcome.decision.action, Action::Allow | Action::Warn)
            && outcome.fail_opens.is_empty()
            && !tracing::enabled!(tracing::Level::DEBUG);
        Self((!quiet).then(|| Box::new((outcome.decision.clone(), outcome.fail_opens.clone()))))
    }

    /// Writes the lines of the decision, now acknowledged.
    pub fn applied(self, tenant: &TenantId) {
        if let Some(taken) = self.0 {
            let (decision, fail_opens) = *taken;
            write(tenant, &decision, &fail_opens);
        }
    }
}

/// Logs an acknowledged decision of a run of `tenant` — run start, step or run end — once it is durable
/// and applied.
pub fn applied(tenant: &TenantId, outcome: &Outcome) {
    write(tenant, &outcome.decision, &outcome.fail_opens);
}

fn write(tenant: &TenantId, decision: &Decision, fail_opens: &[PolicyRef]) {
    let (run_id, decision_id) = (decision.run_id.as_str(), decision.decision_id.as_str());
    let policy_id = decision.deciding_policy.as_ref().map(|p| p.id.as_str());
    let (step, phase) = (decision.step_index, decision.phase.as_str());
    match decision.action {
        Action::Allow | Action::Warn => tracing::debug!(
            tenant = tenant.as_str(),
            run_id,
            decision_id,
            step,
            phase,
            action = decision.action.as_str(),
            policy_id,
            "decision"
        ),
        Action::Throttle => tracing::info!(
            tenant = tenant.as_str(),
            run_id,
            decision_id,
            step,
            phase,
            policy_id,
            retry_after_ms = decision.retry_after_ms,
            "call throttled"
        ),
        Action::Block => {
            let violation = decision.deciding_violation();
            tracing::warn!(
                tenant = tenant.as_str(),
                run_id,
                decision_id,
                step,
                phase,
                policy_id,
                violation_type = violation.map(|v| v.violation_type.as_str()),
                reason = violation.map(|v| v.reason.as_str()),
                prevention_record_id = decision.prevention_record_id.as_ref().map(|r| r.as_str()),
                integrity = decision.violations.iter().any(|v| v.violation_type == ViolationType::Integrity),
                "run stopped by a block"
            );
        }
    }
    for policy in fail_opens {
        tracing::warn!(
            tenant = tenant.as_str(),
            run_id,
            decision_id,
            policy_id = policy.id.as_str(),
            "policy failed open (on_error: allow)"
        );
    }
}
