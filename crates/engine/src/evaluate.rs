//! Evaluation of one call against a compiled snapshot (`docs/evaluation.md`).

use runguard_contract::canonical::DECISION_DOMAIN;
use runguard_contract::prevention::{PatternRequest, pattern_policy_matches, requires_prevention_record};
use runguard_contract::{
    Action, BindAt, BudgetMetric, BudgetPer, BudgetRule, ContentTarget, Decision, DecisionId, DecisionPhase, Evidence,
    EvidenceMatch, IncidentId, Mode, OnError, Outcome, PatternRule, Phase, Policy, PolicyAction, PolicyId, PolicyRef,
    PreventionRecord, RateMetric, RateRule, RateScope, RecordHash, RecordId, Remaining, RepeatOf, RepeatRule, Rule,
    ShadowEntry, Signature, SnapshotHash, StepCall, Timestamp, Totals, Violation, ViolationType, normalize_endpoint,
};

use crate::cel_rule::{CelContext, CelInput};
use crate::compiled::{CompiledPolicy, CompiledSnapshot, Matcher, normalize_skill};
use crate::content::ScanText;
use crate::periods::{PeriodDelta, PeriodTotals};
use crate::rates::{RateEvent, RateEvents};
use crate::repeat::StepKeys;
use crate::state::{Effects, RunState, TenantRates, TierKey, call_digest};

/// The call being evaluated.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Call<'a> {
    /// Run creation (`run_start` policies).
    RunStart,
    /// A step's `pre` or `post` call.
    Step(&'a StepCall),
    /// Run end (`run_end` policies).
    RunEnd {
        /// How the run ended.
        outcome: Outcome,
    },
}

impl<'a> Call<'a> {
    fn bind_at(&self) -> BindAt {
        match self {
            Call::RunStart => BindAt::RunStart,
            Call::Step(step) => match step.phase {
                Phase::Pre => BindAt::StepPre,
                Phase::Post => BindAt::StepPost,
            },
            Call::RunEnd { .. } => BindAt::RunEnd,
        }
    }

    fn decision_phase(&self) -> DecisionPhase {
        match self {
            Call::RunStart => DecisionPhase::RunStart,
            Call::Step(step) => step.phase.into(),
            Call::RunEnd { .. } => DecisionPhase::RunEnd,
        }
    }

    fn step(&self) -> Option<&'a StepCall> {
        match self {
            Call::Step(step) => Some(step),
            _ => None,
        }
    }
}

/// The result of evaluating a call: the decision, how the run state changes, and what the caller must
/// persist or count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Evaluation {
    /// The decision to return.
    pub(crate) decision: Decision,
    /// What [`RunState::apply`] folds in.
    pub(crate) effects: Effects,
    /// The prevention record this decision requires (unsealed: the store assigns `seq` and the chain).
    pub(crate) record: Option<PreventionRecord>,
    /// The mode of the deciding policy, if any.
    pub(crate) deciding_mode: Option<Mode>,
    /// Policies skipped because they failed with `on_error: allow` (each is a fail-open to count).
    pub(crate) fail_opens: Vec<PolicyRef>,
    /// Shadow policies evaluated by this call (for shadow statistics).
    pub(crate) shadow_evaluated: Vec<PolicyId>,
    /// The step's repeat keys, for a run whose snapshot has repeat rules (recorded when it commits).
    pub(crate) repeat: Option<StepKeys>,
    /// What the call adds to the tenant's period totals.
    pub(crate) periods: Vec<PeriodDelta>,
    /// What the call adds to the tenant's shared rate windows.
    pub(crate) rates: Option<crate::shared_rates::RateDelta>,
}

/// One violation found by one policy, before it is attributed.
#[derive(Debug)]
struct Finding {
    violation_type: ViolationType,
    action: Action,
    threshold: Option<u64>,
    actual: Option<u64>,
    reason: String,
    evidence: Option<Evidence>,
    tier: Option<u32>,
    retry_after_ms: Option<u64>,
}

impl Finding {
    fn new(violation_type: ViolationType, action: Action, reason: String) -> Self {
        Self {
            violation_type,
            action,
            threshold: None,
            actual: None,
            reason,
            evidence: None,
            tier: None,
            retry_after_ms: None,
        }
    }

    fn limit(mut self, threshold: u64, actual: u64) -> Self {
        self.threshold = Some(threshold);
        self.actual = Some(actual);
        self
    }
}

/// What every rule check can read.
struct Cx<'a> {
    state: &'a RunState,
    call: Call<'a>,
    bind: BindAt,
    /// Totals after this call's usage (at `post`), else the current totals.
    totals: Totals,
    tenant_rates: &'a TenantRates,
    /// The tenant's period totals, for tenant-period budgets.
    periods: &'a PeriodTotals,
    now: Timestamp,
    /// The CEL variables, converted for the first CEL rule and shared by the others of its environment.
    cel_context: std::cell::OnceCell<(CelContext<'a>, &'a crate::cel_rule::CelRule)>,
    /// The input and output texts with their screen matches, computed on first use.
    screened: [std::cell::OnceCell<(ScanText<'a>, Option<crate::compiled::Screened>)>; 2],
    snapshot: &'a CompiledSnapshot,
    /// The step's repeat keys (step calls of a snapshot with repeat rules).
    repeat: Option<&'a StepKeys>,
}

impl<'a> Cx<'a> {
    fn screen(&self, field: &str, text: &'a str) -> (&ScanText<'a>, Option<&crate::compiled::Screened>) {
        let slot = if field == "input_text" { &self.screened[0] } else { &self.screened[1] };
        let (text, screened) =
            slot.get_or_init(|| (ScanText::new(text), self.snapshot.screen().map(|screen| screen.matches(text))));
        (text, screened.as_ref())
    }
}

fn block_or_warn(action: PolicyAction) -> Action {
    match action {
        PolicyAction::Block => Action::Block,
        PolicyAction::Warn => Action::Warn,
    }
}

fn budget_violation_type(metric: BudgetMetric) -> ViolationType {
    match metric {
        BudgetMetric::Tokens => ViolationType::TokenLimit,
        BudgetMetric::CostMicros => ViolationType::CostLimit,
        BudgetMetric::Steps => ViolationType::StepLimit,
        BudgetMetric::DurationMs => ViolationType::DurationLimit,
    }
}

fn estimate_of(step: Option<&StepCall>, metric: BudgetMetric) -> Option<u64> {
    let estimate = step?.estimate?;
    match metric {
        BudgetMetric::Tokens => estimate.tokens,
        BudgetMetric::CostMicros => estimate.cost_micros,
        BudgetMetric::Steps | BudgetMetric::DurationMs => None,
    }
}

fn check_budget(policy: &Policy, rule: &BudgetRule, cx: &Cx<'_>) -> Vec<Finding> {
    let action = block_or_warn(policy.action);
    let metric = rule.metric.as_str();
    let kind = budget_violation_type(rule.metric);
    let over = |actual: u64, reason: String| Finding::new(kind, action, reason).limit(rule.max, actual);
    let mut found = Vec::new();
    match (rule.per, cx.bind) {
        (BudgetPer::Run, BindAt::StepPost | BindAt::RunEnd) => {
            let actual = cx.totals.get(rule.metric);
            if actual > rule.max {
                found.push(over(actual, format!("run {metric} {actual} exceed {}", rule.max)));
            }
            if cx.bind == BindAt::StepPost {
                for &tier in &rule.warn_at {
                    let reached = u128::from(actual) * 100 >= u128::from(rule.max) * u128::from(tier);
                    // Only a reached tier needs the key (a clone of the policy id) to look up.
                    if reached && !cx.state.fired_tiers.contains(&TierKey { policy_id: policy.id.clone(), tier }) {
                        let threshold =
                            u64::try_from(u128::from(rule.max) * u128::from(tier) / 100).unwrap_or(u64::MAX);
                        let mut warning = Finding::new(
                            ViolationType::BudgetWarning,
                            Action::Warn,
                            format!("run {metric} {actual} reached the {tier}% warn tier of {}", rule.max),
                        )
                        .limit(threshold, actual);
                        warning.tier = Some(tier);
                        found.push(warning);
                    }
                }
            }
        }
        (BudgetPer::Run, BindAt::StepPre) => {
            let step = cx.call.step();
            if rule.metric == BudgetMetric::Steps {
                let actual = cx.totals.steps.saturating_add(1);
                if actual > rule.max {
                    found.push(over(actual, format!("run steps would reach {actual}, above {}", rule.max)));
                }
            } else if let Some(estimate) = estimate_of(step, rule.metric) {
                let total = cx.totals.get(rule.metric);
                let actual = total.saturating_add(estimate);
                if actual > rule.max {
                    found.push(over(
                        actual,
                        format!("run {metric} {total} plus estimate {estimate} would exceed {}", rule.max),
                    ));
                }
            }
        }
        (BudgetPer::Step, BindAt::StepPost) => {
            let usage = cx.call.step().and_then(|s| s.usage).unwrap_or_default();
            let actual = match rule.metric {
                BudgetMetric::Tokens => usage.tokens,
                BudgetMetric::CostMicros => usage.cost_micros,
                BudgetMetric::DurationMs => usage.duration_ms,
                BudgetMetric::Steps => 1,
            };
            if actual > rule.max {
                found.push(over(actual, format!("step {metric} {actual} exceed {}", rule.max)));
            }
        }
        (BudgetPer::Step, BindAt::StepPre) => {
            let estimate =
                if rule.metric == BudgetMetric::Steps { Some(1) } else { estimate_of(cx.call.step(), rule.metric) };
            if let Some(actual) = estimate
                && actual > rule.max
            {
                found.push(over(actual, format!("step {metric} estimate {actual} exceeds {}", rule.max)));
            }
        }
        (BudgetPer::Step, BindAt::RunEnd) | (_, BindAt::RunStart) => {}
        (BudgetPer::Tenant, _) => {
            let step = cx.call.step();
            for finding in crate::periods::check(policy, &cx.state.labels, step, cx.bind, cx.periods, cx.now) {
                // A tenant's tier fires once per period by crossing it, so the run keeps no record of it.
                let (kind, action) =
                    if finding.warning { (ViolationType::BudgetWarning, Action::Warn) } else { (kind, action) };
                found.push(Finding::new(kind, action, finding.reason).limit(finding.threshold, finding.actual));
            }
        }
    }
    found
}

fn check_rate(policy: &Policy, rule: &RateRule, cx: &Cx<'_>) -> Vec<Finding> {
    let Some(step) = cx.call.step() else { return Vec::new() };
    let events: &dyn RateEvents = match rule.scope {
        RateScope::Run => &cx.state.rate_events,
        RateScope::Tenant => cx.tenant_rates.window(),
    };
    let window_ms = i64::from(rule.window_s).saturating_mul(1000);
    let start = cx.now.plus_millis(window_ms.saturating_neg());
    let used = u64::try_from(events.used_after(start, rule.metric)).unwrap_or(u64::MAX);
    let request = match rule.metric {
        RateMetric::Steps => 1,
        RateMetric::Tokens => step.estimate.and_then(|e| e.tokens).unwrap_or(0),
        RateMetric::CostMicros => step.estimate.and_then(|e| e.cost_micros).unwrap_or(0),
    };
    let wanted = used.saturating_add(request);
    if wanted <= rule.max {
        return Vec::new();
    }
    let window_u64 = u64::try_from(window_ms).unwrap_or(u64::MAX);
    let retry_after_ms = if request > rule.max {
        window_u64
    } else {
        // The call fits once what is left in the window is at most `room`: once the oldest events
        // (in the order they were recorded) that sum to `used - room` have left it.
        let room = rule.max - request;
        debug_assert!(used > room, "a call that does not fit has more than `room` in the window");
        let wait = events
            .reaching(start, rule.metric, u128::from(used.saturating_sub(room)))
            .map_or(window_u64, |at| at.plus_millis(window_ms).millis_since(cx.now));
        wait.max(1)
    };
    let action = match policy.action {
        PolicyAction::Block => Action::Throttle,
        PolicyAction::Warn => Action::Warn,
    };
    let scope = match rule.scope {
        RateScope::Run => "run",
        RateScope::Tenant => "tenant",
    };
    let mut finding = Finding::new(
        ViolationType::RateLimit,
        action,
        format!(
            "{scope} {} in the last {}s would reach {wanted}, above {}",
            rule.metric.as_str(),
            rule.window_s,
            rule.max
        ),
    )
    .limit(rule.max, wanted);
    finding.retry_after_ms = Some(retry_after_ms);
    vec![finding]
}

fn check_content<'a>(
    policy: &Policy,
    target: ContentTarget,
    matcher: &crate::content::ContentMatcher,
    screen: &[usize],
    cx: &Cx<'a>,
) -> Vec<Finding> {
    let Some(step) = cx.call.step() else { return Vec::new() };
    let reads_input = matches!(target, ContentTarget::Input | ContentTarget::Both);
    let reads_output = matches!(target, ContentTarget::Output | ContentTarget::Both);
    let mut texts: Vec<(&str, &'a str)> = Vec::new();
    if reads_input && let Some(text) = &step.input_text {
        texts.push(("input_text", text));
    }
    if reads_output
        && cx.bind == BindAt::StepPost
        && let Some(text) = &step.output_text
    {
        texts.push(("output_text", text));
    }
    let mut found = Vec::new();
    for (field, text) in texts {
        let matches = match cx.screen(field, text) {
            (text, Some(hits)) if !screen.is_empty() => {
                matcher.scan_screened(text, |part| screen.get(part).is_none_or(|i| hits.may_match(*i)))
            }
            (text, _) => matcher.scan_screened(text, |_| true),
        };
        if matches.is_empty() {
            continue;
        }
        let count: u64 = matches.iter().map(|m| m.count).fold(0, u64::saturating_add);
        let names: Vec<String> = matches.iter().map(|m| format!("{} ×{}", m.name, m.count)).collect();
        let mut finding = Finding::new(
            ViolationType::ContentPolicy,
            block_or_warn(policy.action),
            format!("{field} has {count} match(es): {}", names.join(", ")),
        );
        finding.evidence = Some(Evidence { text: Some(field.to_owned()), matches, ..Evidence::default() });
        found.push(finding);
    }
    found
}

fn check_skill(policy: &Policy, allow: bool, skills: &[String], cx: &Cx<'_>) -> Vec<Finding> {
    let Some(skill) = cx.call.step().and_then(|s| s.skill.as_deref()) else { return Vec::new() };
    let skill = normalize_skill(skill);
    let listed = skills.contains(&skill);
    let reason = match (allow, listed) {
        (true, false) => format!("skill `{skill}` is not in the allow list"),
        (false, true) => format!("skill `{skill}` is in the deny list"),
        _ => return Vec::new(),
    };
    vec![Finding::new(ViolationType::SkillPolicy, block_or_warn(policy.action), reason)]
}

fn check_pattern(policy: &Policy, rule: &PatternRule, cx: &Cx<'_>) -> Vec<Finding> {
    let Some(step) = cx.call.step() else { return Vec::new() };
    let signature = Signature::normalize(step.skill.as_deref(), step.api_endpoint.as_deref(), &step.input_keys);
    let hash = signature.hash();
    let request = PatternRequest {
        policy_tenant: policy.tenant_id.as_ref(),
        run_tenant: &cx.state.tenant_id,
        policy_signature: &rule.signature_hash,
        request_signature: &hash,
        policy_endpoint: rule.api_endpoint.as_deref(),
        request_endpoint: step.api_endpoint.as_deref(),
    };
    if !pattern_policy_matches(&request) {
        return Vec::new();
    }
    let mut finding = Finding::new(
        ViolationType::PatternMatch,
        block_or_warn(policy.action),
        format!("request matches the failure pattern `{}` (signature {hash})", rule.pattern_id),
    );
    finding.evidence = Some(Evidence {
        signature_hash: Some(hash.to_string()),
        api_endpoint: step.api_endpoint.as_deref().map(normalize_endpoint),
        ..Evidence::default()
    });
    vec![finding]
}

fn check_repeat(policy: &Policy, rule: &RepeatRule, cx: &Cx<'_>) -> Vec<Finding> {
    let Some(keys) = cx.repeat else { return Vec::new() };
    let window = u64::from(rule.window_steps);
    let (earlier, what) = match (rule.of, cx.bind) {
        (RepeatOf::Call, BindAt::StepPre) => (cx.state.repeat.earlier_calls(keys.index, window, &keys.call), "call"),
        (RepeatOf::Error, BindAt::StepPost) => match &keys.error {
            Some(error) => (cx.state.repeat.earlier_errors(keys.index, window, error), "error"),
            None => return Vec::new(),
        },
        _ => return Vec::new(),
    };
    // This step is one of the repeats: `max: 3` allows three equal keys in the window, not a fourth.
    let count = u64::try_from(earlier.len()).unwrap_or(u64::MAX).saturating_add(1);
    if count <= rule.max {
        return Vec::new();
    }
    let mut finding = Finding::new(
        ViolationType::LoopDetected,
        block_or_warn(policy.action),
        format!(
            "the same {what} {count} times in this step and the {} before it, above {}",
            rule.window_steps, rule.max
        ),
    )
    .limit(rule.max, count);
    // Evidence names the earlier steps, never a text: the `matches` entry of kind `repeat`.
    finding.evidence = Some(Evidence {
        matches: vec![EvidenceMatch {
            kind: "repeat".to_owned(),
            name: format!("{what}_key"),
            count,
            samples: earlier.iter().map(u64::to_string).collect(),
        }],
        ..Evidence::default()
    });
    vec![finding]
}

/// Runs one policy's rule. `Err` means the policy could not be evaluated.
fn check<'a>(compiled: &'a CompiledPolicy, cx: &Cx<'a>) -> Result<Vec<Finding>, String> {
    let policy = &compiled.policy;
    let matcher = compiled.matcher.as_ref().map_err(|e| format!("the rule does not compile: {e}"))?;
    Ok(match matcher {
        Matcher::Budget(rule) => check_budget(policy, rule, cx),
        Matcher::Rate(rule) => check_rate(policy, rule, cx),
        Matcher::Content(matcher) => {
            let target = match &policy.rule {
                Rule::Content(rule) => rule.target,
                _ => ContentTarget::Output,
            };
            check_content(policy, target, matcher, &compiled.screen, cx)
        }
        Matcher::Skill { allow, skills } => check_skill(policy, *allow, skills, cx),
        Matcher::Pattern(rule) => check_pattern(policy, rule, cx),
        Matcher::Repeat(rule) => check_repeat(policy, rule, cx),
        Matcher::Expr(rule) => {
            let state = cx.state;
            let input = || CelInput {
                run_id: state.run_id.as_str(),
                tenant: state.tenant_id.as_str(),
                labels: &state.labels,
                totals: cx.totals,
                step: cx.call.step(),
                now: cx.now,
            };
            let (context, owner) = cx.cel_context.get_or_init(|| (rule.context(&input()), rule));
            let violated = if owner.shares_env(rule) { rule.evaluate_in(context)? } else { rule.evaluate(&input())? };
            if violated {
                vec![Finding::new(
                    ViolationType::CustomRule,
                    block_or_warn(policy.action),
                    format!("custom rule `{}` holds", policy.name),
                )]
            } else {
                Vec::new()
            }
        }
    })
}

fn evaluation_error(policy: &Policy, message: &str) -> Finding {
    let action = match policy.on_error {
        OnError::Block => Action::Block,
        OnError::Warn => Action::Warn,
        OnError::Allow => Action::Allow,
    };
    let skipped = if action == Action::Allow { " (skipped: on_error allow)" } else { "" };
    Finding::new(ViolationType::EvaluationError, action, format!("policy could not be evaluated: {message}{skipped}"))
}

fn policy_ref(policy: &Policy) -> PolicyRef {
    PolicyRef { id: policy.id.clone(), name: policy.name.clone(), version: policy.version }
}

fn violation(policy: &Policy, finding: Finding) -> Violation {
    Violation {
        policy_id: policy.id.clone(),
        policy_name: policy.name.clone(),
        policy_version: policy.version,
        violation_type: finding.violation_type,
        action: finding.action,
        threshold: finding.threshold.map(|t| t.to_string()),
        actual: finding.actual.map(|a| a.to_string()),
        reason: finding.reason,
        evidence: finding.evidence,
        run_id: None,
    }
}

pub(crate) fn decision_seed(state: &RunState) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    // The same layout as `domain_hash(DECISION_DOMAIN, "tenant\nrun\ncounter")`, without allocating.
    let mut hasher = Sha256::new();
    hasher.update(DECISION_DOMAIN.as_bytes());
    hasher.update([0u8]);
    hasher.update(state.tenant_id.as_str().as_bytes());
    hasher.update(b"\n");
    hasher.update(state.run_id.as_str().as_bytes());
    hasher.update(b"\n");
    hasher.update(state.decisions.to_string().as_bytes());
    hasher.finalize().into()
}

fn remaining(
    snapshot: &CompiledSnapshot,
    totals: &Totals,
    state: &RunState,
    step: Option<&StepCall>,
    periods: &PeriodTotals,
    now: Timestamp,
) -> Remaining {
    let mut left = budget_remaining(snapshot, totals);
    crate::periods::lower_remaining(&mut left, snapshot, &state.labels, step, periods, now);
    left
}

/// What the snapshot's active per-run block budgets leave of `totals` (an ancestor's rolled-up totals, too).
pub(crate) fn budget_remaining(snapshot: &CompiledSnapshot, totals: &Totals) -> Remaining {
    let mut left = Remaining::default();
    for compiled in snapshot.policies() {
        let policy = &compiled.policy;
        let Rule::Budget(rule) = &policy.rule else { continue };
        if policy.mode != Mode::Active || policy.action != PolicyAction::Block || rule.per != BudgetPer::Run {
            continue;
        }
        let value = rule.max.saturating_sub(totals.get(rule.metric));
        let slot = match rule.metric {
            BudgetMetric::Tokens => &mut left.tokens,
            BudgetMetric::CostMicros => &mut left.cost_micros,
            BudgetMetric::Steps => &mut left.steps,
            BudgetMetric::DurationMs => &mut left.duration_ms,
        };
        *slot = Some(slot.map_or(value, |current| current.min(value)));
    }
    left
}

/// The id of the synthetic violation raised when a snapshot fails verification.
pub(crate) const INTEGRITY_POLICY_ID: &str = "runguard:integrity";

fn integrity_violation(snapshot: &CompiledSnapshot) -> Option<Violation> {
    Some(Violation {
        policy_id: PolicyId::new(INTEGRITY_POLICY_ID).ok()?,
        policy_name: "snapshot integrity".to_owned(),
        policy_version: 0,
        violation_type: ViolationType::Integrity,
        action: Action::Block,
        threshold: None,
        actual: None,
        reason: format!("snapshot `{}` failed verification against its hash", snapshot.reference().id),
        evidence: None,
        run_id: None,
    })
}

fn effects_for(snapshot: &CompiledSnapshot, state: &RunState, call: Call<'_>, now: Timestamp) -> Effects {
    let mut effects = Effects::default();
    match call {
        Call::Step(step) => {
            effects.digest = Some(call_digest(step));
            effects.step = Some((step.index, step.phase));
            let event = match step.phase {
                Phase::Pre => RateEvent { at: now, steps: 1, tokens: 0, cost_micros: 0 },
                Phase::Post => {
                    let usage = step.usage.unwrap_or_default();
                    effects.usage = Some(usage);
                    effects.counts_step = true;
                    let pre_admitted = state.next.phase == Phase::Post;
                    RateEvent {
                        at: now,
                        steps: u64::from(!pre_admitted),
                        tokens: usage.tokens,
                        cost_micros: usage.cost_micros,
                    }
                }
            };
            if snapshot.run_window_ms() > 0 {
                effects.run_rate_event = Some(event);
                effects.run_window_ms = snapshot.run_window_ms();
            }
            if snapshot.tenant_window_ms() > 0 {
                effects.tenant_rate_event = Some(event);
                effects.tenant_window_ms = snapshot.tenant_window_ms();
            }
        }
        Call::RunEnd { outcome, .. } => effects.end_outcome = Some(outcome),
        Call::RunStart => {}
    }
    effects
}

/// Evaluates `call` for the run in `state` against `snapshot` at `now`.
///
/// Pure and deterministic: the same snapshot, state, call, tenant rates and `now` give the same
/// [`Evaluation`]. Step calls should first pass [`RunState::admit`]; this function does not check order.
pub(crate) fn evaluate(
    snapshot: &CompiledSnapshot,
    state: &RunState,
    call: Call<'_>,
    tenant_rates: &TenantRates,
    periods: &PeriodTotals,
    now: Timestamp,
) -> Evaluation {
    let bind = call.bind_at();
    let mut effects = effects_for(snapshot, state, call, now);
    let totals = state.totals_with(effects.usage.as_ref(), effects.counts_step);
    let seed = decision_seed(state);
    let mut decision = Decision {
        decision_id: DecisionId::from_digest(&seed),
        run_id: state.run_id.clone(),
        step_index: call.step().map(|s| s.index),
        phase: call.decision_phase(),
        action: Action::Allow,
        deciding_policy: None,
        violations: Vec::new(),
        shadow: Vec::new(),
        remaining: remaining(snapshot, &totals, state, call.step(), periods, now),
        retry_after_ms: None,
        snapshot_hash: snapshot.hash().clone(),
        prevention_record_id: None,
        evaluated_at: now,
    };
    let mut fail_opens = Vec::new();
    let mut shadow_evaluated = Vec::new();
    let mut deciding_mode = None;

    if snapshot.is_tampered() {
        decision.action = Action::Block;
        decision.violations.extend(integrity_violation(snapshot));
        decision.remaining = Remaining::default();
        return Evaluation {
            decision,
            effects,
            record: None,
            deciding_mode,
            fail_opens,
            shadow_evaluated,
            repeat: None,
            periods: Vec::new(),
            rates: None,
        };
    }

    let repeat = match call {
        Call::Step(step) if snapshot.repeat_window() > 0 => Some(state.repeat.keys_of(step)),
        _ => None,
    };
    let cx = Cx {
        state,
        call,
        bind,
        totals,
        tenant_rates,
        periods,
        now,
        cel_context: std::cell::OnceCell::new(),
        screened: Default::default(),
        snapshot,
        repeat: repeat.as_ref(),
    };
    // (violation, precedence) of active policies; every bound policy is evaluated, no short-circuit.
    let mut active: Vec<(Violation, u32, Option<u64>)> = Vec::new();
    for compiled in snapshot.policies().iter().filter(|p| p.binds_at(bind)) {
        let policy = &compiled.policy;
        let findings = check(compiled, &cx).unwrap_or_else(|message| vec![evaluation_error(policy, &message)]);
        if policy.mode == Mode::Shadow {
            shadow_evaluated.push(policy.id.clone());
        }
        for finding in findings {
            if let Some(tier) = finding.tier {
                effects.fired_tiers.push(TierKey { policy_id: policy.id.clone(), tier });
            }
            if finding.violation_type == ViolationType::EvaluationError && finding.action == Action::Allow {
                fail_opens.push(policy_ref(policy));
            }
            match policy.mode {
                Mode::Shadow => {
                    if finding.action != Action::Allow {
                        decision.shadow.push(ShadowEntry {
                            policy_id: policy.id.clone(),
                            policy_version: policy.version,
                            would_action: finding.action,
                            violation_type: finding.violation_type,
                            reason: finding.reason,
                        });
                    }
                }
                Mode::Active => {
                    let retry = finding.retry_after_ms;
                    active.push((violation(policy, finding), policy.precedence, retry));
                }
                Mode::Pending | Mode::Disabled => {}
            }
        }
    }

    // The keys are handed on to be recorded; the checks are done with them.
    drop(cx);

    // Conflict resolution: the most restrictive action; among its violations the lowest precedence,
    // then the smallest policy id (byte order).
    let action = active.iter().map(|(v, _, _)| v.action).max().unwrap_or(Action::Allow);
    if action != Action::Allow {
        let deciding = active
            .iter()
            .filter(|(v, _, _)| v.action == action)
            .min_by(|(a, pa, _), (b, pb, _)| (pa, a.policy_id.as_str()).cmp(&(pb, b.policy_id.as_str())));
        if let Some((v, _, _)) = deciding {
            let policy = snapshot.policy(&v.policy_id);
            decision.deciding_policy = policy.map(policy_ref);
            deciding_mode = policy.map(|p| p.mode);
        }
    }
    decision.action = action;
    if action == Action::Throttle {
        // A throttled step does not run: it consumes no rate allowance of its run or its tenant
        // (`RunState::apply` skips throttles; the caller's `TenantRates` must not count it either).
        effects.run_rate_event = None;
        effects.tenant_rate_event = None;
        decision.retry_after_ms =
            active.iter().filter(|(v, _, _)| v.action == Action::Throttle).filter_map(|(_, _, retry)| *retry).max();
    }
    let mut violations: Vec<Violation> = active.into_iter().map(|(v, _, _)| v).collect();
    violations.sort_by(|a, b| (&a.policy_id, a.violation_type).cmp(&(&b.policy_id, b.violation_type)));
    decision.violations = violations;

    let mut record = None;
    if requires_prevention_record(&decision, deciding_mode) {
        let record_id = RecordId::from_digest(&seed);
        decision.prevention_record_id = Some(record_id.clone());
        record = draft_record(snapshot, state, &decision, record_id, &seed, now);
    }
    let deltas = crate::periods::deltas(snapshot, &state.labels, call.step(), decision.action, periods, now);
    let rates = crate::shared_rates::delta(snapshot, &effects, call.step(), decision.action, now);
    Evaluation {
        decision,
        effects,
        record,
        deciding_mode,
        fail_opens,
        shadow_evaluated,
        repeat,
        periods: deltas,
        rates,
    }
}

fn draft_record(
    snapshot: &CompiledSnapshot,
    state: &RunState,
    decision: &Decision,
    id: RecordId,
    seed: &[u8; 32],
    now: Timestamp,
) -> Option<PreventionRecord> {
    let deciding = decision.deciding_policy.as_ref()?;
    let policy = snapshot.policy(&deciding.id)?;
    Some(record_of(policy, decision.snapshot_hash.clone(), state, decision, id, seed, now))
}

/// The prevention record (unsealed) of `decision`, decided by `policy` of the snapshot with
/// `snapshot_hash`: the run's own, or an ancestor's.
pub(crate) fn record_of(
    policy: &Policy,
    snapshot_hash: SnapshotHash,
    state: &RunState,
    decision: &Decision,
    id: RecordId,
    seed: &[u8; 32],
    now: Timestamp,
) -> PreventionRecord {
    let (pattern_id, signature_hash) = match &policy.rule {
        Rule::Pattern(rule) => (Some(rule.pattern_id.clone()), Some(rule.signature_hash.clone())),
        _ => (None, None),
    };
    PreventionRecord {
        id,
        seq: 0,
        tenant_id: state.tenant_id.clone(),
        run_id: state.run_id.clone(),
        step_index: decision.step_index,
        phase: decision.phase,
        decision_id: decision.decision_id.clone(),
        policy_id: policy.id.clone(),
        policy_version: policy.version,
        pattern_id,
        signature_hash,
        incident_id_blocked: IncidentId::from_digest(seed),
        snapshot_hash,
        prevented_at: now,
        is_simulated: false,
        prev_hash: RecordHash::genesis(),
        hash: RecordHash::genesis(),
    }
}
