//! proptest strategies that generate valid values by construction (feature `proptest`).
//!
//! Every strategy builds values through the same types the API accepts, so a generated policy always
//! passes [`PolicyDocument::validate`](crate::PolicyDocument::validate).

use proptest::collection::vec;
use proptest::prelude::*;

use crate::ids::{PatternId, PolicyId, RunId, SignatureHash, TenantId};
use crate::policy::{
    BudgetMetric, BudgetPer, BudgetRule, ContentRule, ContentTarget, Detector, ExprRule, Mode, OnError, PatternRule,
    Policy, PolicyAction, PolicyDocument, RateMetric, RateRule, RateScope, RepeatOf, RepeatRule, Rule, Scope,
    SkillRule,
};
use crate::signature::Signature;
use crate::step::{Estimate, Phase, StepCall, StepError, Usage};
use crate::timestamp::Timestamp;

/// One of a few tenant names, so that collisions (same tenant) and differences both happen.
pub fn tenant_id() -> impl Strategy<Value = TenantId> {
    prop_oneof![Just("acme"), Just("globex"), Just("initech")]
        .prop_filter_map("valid tenant", |t| TenantId::new(t).ok())
}

/// A policy id from a small alphabet, so that id-order tie-breaks are exercised.
pub fn policy_id() -> impl Strategy<Value = PolicyId> {
    "pol_[a-f]{1,3}".prop_filter_map("valid policy id", |s| PolicyId::new(s).ok())
}

/// A run id.
pub fn run_id() -> impl Strategy<Value = RunId> {
    any::<u64>().prop_map(|n| RunId::from_u128(u128::from(n)))
}

/// A skill name from a small set.
pub fn skill() -> impl Strategy<Value = String> {
    prop_oneof![Just("search"), Just("Search "), Just("fetch"), Just("write_file")].prop_map(str::to_owned)
}

/// An endpoint with id-like segments that normalise away.
pub fn endpoint() -> impl Strategy<Value = String> {
    (prop_oneof![Just("/v1/users"), Just("/v1/orders"), Just("/v2/items")], 0u32..100_000, any::<bool>())
        .prop_map(|(base, id, slash)| format!("{base}/{id}{}", if slash { "/" } else { "" }))
}

/// Input keys from a small alphabet, possibly repeated or unordered.
pub fn input_keys() -> impl Strategy<Value = Vec<String>> {
    vec(prop_oneof![Just("query"), Just("limit"), Just("path")].prop_map(str::to_owned), 0..4)
}

/// A normalised request signature.
pub fn signature() -> impl Strategy<Value = Signature> {
    (skill(), endpoint(), input_keys()).prop_map(|(s, e, k)| Signature::normalize(Some(&s), Some(&e), &k))
}

/// A budget rule (warn tiers only on per-run budgets).
pub fn budget_rule() -> impl Strategy<Value = BudgetRule> {
    (
        prop_oneof![
            Just(BudgetMetric::Tokens),
            Just(BudgetMetric::CostMicros),
            Just(BudgetMetric::Steps),
            Just(BudgetMetric::DurationMs)
        ],
        any::<bool>(),
        0u64..2_000,
        proptest::sample::subsequence(vec![25u32, 50, 80, 95], 0..=2),
    )
        .prop_map(|(metric, per_run, max, warn_at)| BudgetRule {
            metric,
            per: if per_run { BudgetPer::Run } else { BudgetPer::Step },
            max,
            warn_at: if per_run { warn_at } else { Vec::new() },
            period: None,
            labels: Default::default(),
        })
}

/// A rate rule.
pub fn rate_rule() -> impl Strategy<Value = RateRule> {
    (
        prop_oneof![Just(RateMetric::Steps), Just(RateMetric::Tokens), Just(RateMetric::CostMicros)],
        0u64..50,
        1u32..120,
        prop_oneof![Just(RateScope::Run), Just(RateScope::Tenant)],
    )
        .prop_map(|(metric, max, window_s, scope)| RateRule { metric, max, window_s, scope })
}

/// A content rule with at least one detector, pattern or keyword.
pub fn content_rule() -> impl Strategy<Value = ContentRule> {
    (
        prop_oneof![Just(ContentTarget::Output), Just(ContentTarget::Input), Just(ContentTarget::Both)],
        proptest::sample::subsequence(
            vec![Detector::Email, Detector::Ssn, Detector::CreditCard, Detector::Phone, Detector::IpAddress],
            1..=2,
        ),
        proptest::sample::subsequence(vec!["secret".to_owned(), "password".to_owned()], 0..=1),
        any::<bool>(),
    )
        .prop_map(|(target, detectors, keywords, case_insensitive)| ContentRule {
            target,
            detectors,
            patterns: Vec::new(),
            keywords,
            case_insensitive,
        })
}

/// A skill rule.
pub fn skill_rule() -> impl Strategy<Value = SkillRule> {
    (any::<bool>(), proptest::sample::subsequence(vec!["search".to_owned(), "fetch".to_owned()], 1..=2)).prop_map(
        |(allow, list)| {
            if allow {
                SkillRule { allow: Some(list), deny: None }
            } else {
                SkillRule { allow: None, deny: Some(list) }
            }
        },
    )
}

/// A pattern rule for `signature`.
pub fn pattern_rule_for(signature: &Signature) -> PatternRule {
    PatternRule {
        pattern_id: PatternId::from_digest(&crate::canonical::domain_hash("test/pattern", signature.skill.as_bytes())),
        signature_hash: signature.hash(),
        api_endpoint: None,
    }
}

/// A pattern rule over a generated signature, sometimes naming its endpoint.
pub fn pattern_rule() -> impl Strategy<Value = PatternRule> {
    (signature(), any::<bool>()).prop_map(|(sig, with_endpoint)| {
        let mut rule = pattern_rule_for(&sig);
        if with_endpoint {
            rule.api_endpoint = Some(sig.api_endpoint.clone());
        }
        rule
    })
}

/// A CEL rule from a fixed set of expressions that compile, some of which fail at run time.
pub fn expr_rule() -> impl Strategy<Value = ExprRule> {
    prop_oneof![
        Just("run.tokens > 500"),
        Just("step.index >= 3"),
        Just("has(step.skill) && step.skill == 'fetch'"),
        Just("step.usage.tokens > 100"),
        Just("run.labels.team == 'red'"),
    ]
    .prop_map(|cel| ExprRule { cel: cel.to_owned() })
}

/// A repeat rule with small limits and windows, so that random runs reach them.
pub fn repeat_rule() -> impl Strategy<Value = RepeatRule> {
    (prop_oneof![Just(RepeatOf::Call), Just(RepeatOf::Error)], 1u64..4, 1u32..6)
        .prop_map(|(of, max, window_steps)| RepeatRule { of, max, window_steps })
}

/// Any rule (pattern rules only from `pattern_rule`).
pub fn rule() -> impl Strategy<Value = Rule> {
    prop_oneof![
        4 => budget_rule().prop_map(Rule::Budget),
        2 => rate_rule().prop_map(Rule::Rate),
        2 => content_rule().prop_map(Rule::Content),
        1 => skill_rule().prop_map(Rule::Skill),
        1 => pattern_rule().prop_map(Rule::Pattern),
        1 => expr_rule().prop_map(Rule::Expr),
        1 => repeat_rule().prop_map(Rule::Repeat),
    ]
}

/// A mode that can be in a snapshot.
pub fn snapshot_mode() -> impl Strategy<Value = Mode> {
    prop_oneof![3 => Just(Mode::Active), 1 => Just(Mode::Shadow)]
}

/// A valid tenant-scoped policy document.
pub fn policy_document() -> impl Strategy<Value = PolicyDocument> {
    (
        rule(),
        snapshot_mode(),
        prop_oneof![3 => Just(PolicyAction::Block), 1 => Just(PolicyAction::Warn)],
        0u32..4,
        prop_oneof![Just(OnError::Block), Just(OnError::Warn), Just(OnError::Allow)],
    )
        .prop_map(|(rule, mode, action, precedence, on_error)| PolicyDocument {
            id: None,
            name: format!("{} policy", rule.kind()),
            scope: Scope::Tenant,
            mode,
            action,
            precedence,
            on_error,
            bind_at: None,
            rule,
        })
}

/// A stored policy version for `tenant`.
pub fn policy_for(tenant: TenantId) -> impl Strategy<Value = Policy> {
    (policy_document(), policy_id()).prop_map(move |(doc, id)| {
        Policy::create(doc, id, Some(tenant.clone()), Timestamp::from_unix_millis(1_700_000_000_000))
    })
}

/// A set of policies with distinct ids for `tenant`.
pub fn policies_for(tenant: TenantId, max: usize) -> impl Strategy<Value = Vec<Policy>> {
    vec(policy_for(tenant), 0..=max).prop_map(|mut ps| {
        ps.sort_by(|a, b| a.id.cmp(&b.id));
        ps.dedup_by(|a, b| a.id == b.id);
        ps
    })
}

/// Text that sometimes contains detectable content.
pub fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("all clear".to_owned()),
        Just("mail jane.doe@example.com now".to_owned()),
        Just("card 4111 1111 1111 1111".to_owned()),
        Just("my SSN is 123-45-6789".to_owned()),
        Just("the Password is hunter2".to_owned()),
        "[a-z ]{0,40}",
    ]
}

/// The step fields shared by both phases.
fn step_common() -> impl Strategy<Value = (Option<String>, Option<String>, Vec<String>, Option<String>)> {
    (proptest::option::of(skill()), proptest::option::of(endpoint()), input_keys(), proptest::option::of(text()))
}

/// A valid `pre` call for `index`.
pub fn pre_call(index: u64) -> impl Strategy<Value = StepCall> {
    (step_common(), proptest::option::of((proptest::option::of(0u64..800), proptest::option::of(0u64..800)))).prop_map(
        move |((skill, api_endpoint, input_keys, input_text), estimate)| StepCall {
            skill,
            api_endpoint,
            input_keys,
            input_text,
            estimate: estimate.map(|(tokens, cost_micros)| Estimate { tokens, cost_micros }),
            ..StepCall::new(index, Phase::Pre)
        },
    )
}

/// A valid `post` call for `index`.
pub fn post_call(index: u64) -> impl Strategy<Value = StepCall> {
    (step_common(), 0u64..600, 0u64..600, 0u64..5_000, proptest::option::of(text()), any::<bool>()).prop_map(
        move |(
            (skill, api_endpoint, input_keys, input_text),
            tokens,
            cost_micros,
            duration_ms,
            output_text,
            failed,
        )| {
            StepCall {
                skill,
                api_endpoint,
                input_keys,
                input_text,
                usage: Some(Usage { tokens, cost_micros, duration_ms }),
                output_text,
                error: failed.then(|| StepError {
                    error_type: Some("Timeout".into()),
                    code: Some("e_slow".into()),
                    status: Some(504),
                    message: None,
                }),
                ..StepCall::new(index, Phase::Post)
            }
        },
    )
}

/// A signature hash that differs from every generated signature's (all zeroes is never produced).
pub fn unrelated_signature_hash() -> SignatureHash {
    SignatureHash::from_bytes(&[0u8; 16])
}
