//! Rate windows against a naive model: the events in a `Vec`, dropped from the front as the engine
//! drops them, summed and walked on every check. Tenant windows (with their running totals and merged
//! same-millisecond events) and run windows must give the same throttles, `actual` values and
//! `retry_after_ms` as the model, for events recorded in or out of time order and sums that saturate.

use std::collections::VecDeque;

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use runguard_contract::*;

use crate::compiled::CompiledSnapshot;
use crate::evaluate::{Call, evaluate};
use crate::rates::RateEvent;
use crate::state::{Effects, RunState, TenantRates};

// Events are injected into the windows directly (out of time order, with saturating sums, any horizon),
// which no sequence of calls through `Run` can produce: this test stays beside the code.

fn at(ms: i64) -> Timestamp {
    Timestamp::from_unix_millis(1_795_000_000_000 + ms)
}

fn policy(json: &str) -> Policy {
    let limits = PolicyLimits::default();
    let doc = PolicyDocument::from_json(json.as_bytes(), &limits).unwrap();
    crate::compiled::validate_document(&doc, &limits).unwrap();
    let id = doc.id.clone().unwrap();
    Policy::create(doc, id, Some(TenantId::new("acme").unwrap()), at(0))
}

fn snapshot(policies: &[Policy]) -> CompiledSnapshot {
    let tenant = TenantId::new("acme").unwrap();
    CompiledSnapshot::compile(&Snapshot::capture(&tenant, policies), &PolicyLimits::default()).unwrap()
}

fn run() -> RunState {
    RunState::new(TenantId::new("acme").unwrap(), RunId::new("run-1").unwrap(), Default::default())
}

fn pre(index: u64) -> StepCall {
    StepCall::new(index, Phase::Pre)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    }
}

/// What a check answers: nothing, or a throttle with the wanted total and the wait.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Fits,
    Throttled { actual: u64, retry_after_ms: u64 },
}

fn value(event: &RateEvent, metric: RateMetric) -> u64 {
    match metric {
        RateMetric::Steps => event.steps,
        RateMetric::Tokens => event.tokens,
        RateMetric::CostMicros => event.cost_micros,
    }
}

/// The window as the engine kept it before it had running totals.
#[derive(Default)]
struct Model {
    events: Vec<RateEvent>,
}

impl Model {
    fn record(&mut self, event: RateEvent, horizon_ms: i64) {
        self.events.push(event);
        let oldest_kept = event.at.plus_millis(horizon_ms.saturating_neg());
        let dropped = self.events.iter().take_while(|e| e.at <= oldest_kept).count();
        self.events.drain(..dropped);
    }

    fn check(&self, metric: RateMetric, max: u64, window_s: u32, request: u64, now: Timestamp) -> Outcome {
        let window_ms = i64::from(window_s) * 1000;
        let start = now.plus_millis(-window_ms);
        let in_window: Vec<&RateEvent> = self.events.iter().filter(|e| e.at > start).collect();
        let used = in_window.iter().map(|e| value(e, metric)).fold(0, u64::saturating_add);
        let wanted = used.saturating_add(request);
        if wanted <= max {
            return Outcome::Fits;
        }
        let window = u64::try_from(window_ms).unwrap();
        let retry_after_ms = if request > max {
            window
        } else {
            let mut remaining = used;
            let mut wait = window;
            for event in &in_window {
                remaining = remaining.saturating_sub(value(event, metric));
                if remaining.saturating_add(request) <= max {
                    wait = event.at.plus_millis(window_ms).millis_since(now);
                    break;
                }
            }
            wait.max(1)
        };
        Outcome::Throttled { actual: wanted, retry_after_ms }
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// An event `jitter_ms` around the clock (negative: recorded late), after the clock moved `advance_ms`.
    Record { advance_ms: i64, jitter_ms: i64, values: [u64; 3], horizon_ms: Option<i64> },
    /// A `pre` call `jitter_ms` around the clock, with an estimate of `estimate` tokens and cost.
    Check { jitter_ms: i64, estimate: u64 },
}

/// Mostly small amounts, sometimes amounts that make sums saturate.
fn amount() -> impl Strategy<Value = u64> {
    prop_oneof![6 => 0u64..4, 1 => (u64::MAX - 3)..=u64::MAX, 1 => any::<u64>()]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (
            prop_oneof![3 => 0i64..3, 2 => 0i64..1_500, 1 => 0i64..8_000],
            prop_oneof![4 => Just(0i64), 1 => -2_500i64..500],
            [amount(), amount(), amount()],
            proptest::option::weighted(0.2, 0i64..6_000),
        )
            .prop_map(|(advance_ms, jitter_ms, values, horizon_ms)| Op::Record {
                advance_ms,
                jitter_ms,
                values,
                horizon_ms
            }),
        1 => (-3_000i64..3_000, amount()).prop_map(|(jitter_ms, estimate)| Op::Check { jitter_ms, estimate }),
    ]
}

fn metric() -> impl Strategy<Value = RateMetric> {
    prop_oneof![Just(RateMetric::Steps), Just(RateMetric::Tokens), Just(RateMetric::CostMicros)]
}

fn rate_policy(scope: &str, metric: RateMetric, max: u64, window_s: u32) -> Policy {
    policy(&format!(
        r#"{{"id":"pol_rate","name":"rate","rule":{{"kind":"rate","metric":"{}","max":{max},"window_s":{window_s},"scope":"{scope}"}}}}"#,
        metric.as_str()
    ))
}

fn outcome(decision: &Decision) -> Outcome {
    match decision.action {
        Action::Allow => {
            assert!(decision.violations.is_empty(), "{decision:?}");
            Outcome::Fits
        }
        Action::Throttle => {
            let actual = decision.violations[0].actual.as_deref().unwrap().parse().unwrap();
            Outcome::Throttled { actual, retry_after_ms: decision.retry_after_ms.unwrap() }
        }
        other => panic!("a single rate rule allows or throttles, got {other:?}"),
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn rate_checks_match_the_naive_model(
        metric in metric(),
        // Policy documents carry integers up to 2^53 − 1 (`docs/evaluation.md`).
        max in prop_oneof![4 => 0u64..12, 1 => 0..=MAX_SAFE_INTEGER, 1 => (MAX_SAFE_INTEGER - 8)..=MAX_SAFE_INTEGER],
        window_s in 1u32..5,
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        let window_ms = i64::from(window_s) * 1000;
        let tenant_snapshot = snapshot(&[rate_policy("tenant", metric, max, window_s)]);
        let run_snapshot = snapshot(&[rate_policy("run", metric, max, window_s)]);
        let mut model = Model::default();
        let mut rates = TenantRates::default();
        let mut clock = 0i64;
        for op in ops {
            match op {
                Op::Record { advance_ms, jitter_ms, values: [steps, tokens, cost_micros], horizon_ms } => {
                    clock += advance_ms;
                    let event = RateEvent { at: at(clock + jitter_ms), steps, tokens, cost_micros };
                    let horizon_ms = horizon_ms.unwrap_or(window_ms);
                    model.record(event, horizon_ms);
                    rates.apply(&Effects {
                        tenant_rate_event: Some(event),
                        tenant_window_ms: horizon_ms,
                        ..Effects::default()
                    });
                }
                Op::Check { jitter_ms, estimate } => {
                    let now = at(clock + jitter_ms);
                    let request = if metric == RateMetric::Steps { 1 } else { estimate };
                    let expected = model.check(metric, max, window_s, request, now);
                    let call = StepCall {
                        estimate: Some(Estimate { tokens: Some(estimate), cost_micros: Some(estimate) }),
                        ..pre(0)
                    };
                    let tenant = evaluate(&tenant_snapshot, &run(), Call::Step(&call), &rates, &Default::default(), now);
                    prop_assert_eq!(outcome(&tenant.decision), expected.clone(), "tenant scope");
                    let mut state = run();
                    state.rate_events = model.events.iter().copied().collect::<VecDeque<_>>();
                    let run_scope = evaluate(&run_snapshot, &state, Call::Step(&call), &TenantRates::default(), &Default::default(), now);
                    prop_assert_eq!(outcome(&run_scope.decision), expected, "run scope");
                }
            }
        }
        // Merging events of the same millisecond keeps every sum, and the window serialises as its events.
        for metric in [RateMetric::Steps, RateMetric::Tokens, RateMetric::CostMicros] {
            let kept: u128 = rates.events().map(|e| u128::from(value(&e, metric))).sum();
            let recorded: u128 = model.events.iter().map(|e| u128::from(value(e, metric))).sum();
            prop_assert_eq!(kept, recorded);
        }
        let json = serde_json::to_string(&rates).unwrap();
        prop_assert_eq!(serde_json::from_str::<TenantRates>(&json).unwrap(), rates);
    }
}
