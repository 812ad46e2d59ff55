//! A state-machine test of a run against a simple reference model (proptest-state-machine).
//!
//! The snapshot holds a per-run token budget and a per-run steps budget. The model tracks totals, the
//! next expected call, whether the run is stopped, and the last call; it predicts for each call whether
//! it is refused, replayed, allowed or blocked. The engine's `Run` (step, then commit) must agree.

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest, prop_state_machine};
use runguard_contract::*;
use runguard_engine::{Run, RunLimits, TenantRates};

use crate::support::{at, policy, snapshot, start};

const MAX_TOKENS: u64 = 300;
const MAX_STEPS: u64 = 6;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    Pre { index: u64, estimate: Option<u64> },
    Post { index: u64, tokens: u64 },
    ResendLast,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expected {
    Refused,
    Replayed,
    Decided(Action),
}

#[derive(Clone, Debug)]
pub struct Model {
    tokens: u64,
    steps: u64,
    next: (u64, Phase),
    stopped: bool,
    last: Option<(Transition, Action)>,
    expected: Option<Expected>,
}

impl Model {
    fn predict(&self, t: &Transition) -> (Expected, Model) {
        let t = match t {
            Transition::ResendLast => match &self.last {
                Some((call, _)) => call.clone(),
                None => return (Expected::Refused, self.clone()),
            },
            other => other.clone(),
        };
        if self.last.as_ref().is_some_and(|(last, _)| *last == t) {
            return (Expected::Replayed, self.clone());
        }
        if self.stopped {
            return (Expected::Refused, self.clone());
        }
        let (index, phase) = call_key(&t);
        let in_order = index == self.next.0 && (self.next.1 == Phase::Pre || phase == Phase::Post);
        let same_as_last = self.last.as_ref().is_some_and(|(call, _)| call_key(call) == (index, phase));
        if same_as_last || !in_order {
            // A different body for the last call, or out of order: refused either way.
            return (Expected::Refused, self.clone());
        }
        let mut next = self.clone();
        let action = match &t {
            Transition::Pre { estimate, .. } => {
                let over_steps = self.steps + 1 > MAX_STEPS;
                let over_tokens = estimate.is_some_and(|e| self.tokens + e > MAX_TOKENS);
                next.next = (index, Phase::Post);
                if over_steps || over_tokens { Action::Block } else { Action::Allow }
            }
            Transition::Post { tokens, .. } => {
                next.tokens += tokens;
                next.steps += 1;
                next.next = (index + 1, Phase::Pre);
                if next.tokens > MAX_TOKENS || next.steps > MAX_STEPS { Action::Block } else { Action::Allow }
            }
            Transition::ResendLast => return (Expected::Refused, self.clone()),
        };
        next.stopped = action == Action::Block;
        next.last = Some((t, action));
        (Expected::Decided(action), next)
    }
}

fn call_key(t: &Transition) -> (u64, Phase) {
    match t {
        Transition::Pre { index, .. } => (*index, Phase::Pre),
        Transition::Post { index, .. } => (*index, Phase::Post),
        Transition::ResendLast => (u64::MAX, Phase::Pre),
    }
}

fn to_call(t: &Transition) -> StepCall {
    match t {
        Transition::Pre { index, estimate } => StepCall {
            estimate: estimate.map(|e| Estimate { tokens: Some(e), cost_micros: None }),
            ..StepCall::new(*index, Phase::Pre)
        },
        Transition::Post { index, tokens } => StepCall {
            usage: Some(Usage { tokens: *tokens, ..Usage::default() }),
            ..StepCall::new(*index, Phase::Post)
        },
        Transition::ResendLast => StepCall::new(u64::MAX, Phase::Pre),
    }
}

pub struct RunMachine;

impl ReferenceStateMachine for RunMachine {
    type State = Model;
    type Transition = Transition;

    fn init_state() -> BoxedStrategy<Model> {
        Just(Model { tokens: 0, steps: 0, next: (0, Phase::Pre), stopped: false, last: None, expected: None }).boxed()
    }

    fn transitions(state: &Model) -> BoxedStrategy<Transition> {
        let index = state.next.0;
        let near = prop_oneof![8 => Just(index), 1 => Just(index + 1), 1 => Just(index.saturating_sub(1))];
        prop_oneof![
            3 => (near.clone(), proptest::option::of(0u64..120)).prop_map(|(index, estimate)| Transition::Pre { index, estimate }),
            5 => (near, 0u64..90).prop_map(|(index, tokens)| Transition::Post { index, tokens }),
            1 => Just(Transition::ResendLast),
        ]
        .boxed()
    }

    fn apply(state: Model, transition: &Transition) -> Model {
        let (expected, mut next) = state.predict(transition);
        next.expected = Some(expected);
        next
    }
}

pub struct Sut {
    run: Run,
    last_call: Option<StepCall>,
}

impl StateMachineTest for Sut {
    type SystemUnderTest = Sut;
    type Reference = RunMachine;

    fn init_test(_: &Model) -> Sut {
        let tokens = policy(&format!(
            r#"{{"id":"pol_tokens","name":"tokens","rule":{{"kind":"budget","metric":"tokens","per":"run","max":{MAX_TOKENS}}}}}"#
        ));
        let steps = policy(&format!(
            r#"{{"id":"pol_steps","name":"steps","rule":{{"kind":"budget","metric":"steps","per":"run","max":{MAX_STEPS}}}}}"#
        ));
        Sut {
            run: start(std::sync::Arc::new(snapshot(&[tokens, steps])), "run-model", Default::default()),
            last_call: None,
        }
    }

    fn apply(mut sut: Sut, reference: &Model, transition: Transition) -> Sut {
        let call = match &transition {
            Transition::ResendLast => match &sut.last_call {
                Some(call) => call.clone(),
                None => return sut,
            },
            other => to_call(other),
        };
        let got = match sut.run.step(&call, &RunLimits::default(), &mut TenantRates::default(), at(1)) {
            Err(_) => Expected::Refused,
            Ok(e) if e.is_replay() => Expected::Replayed,
            Ok(e) => {
                assert_eq!(e.record.is_some(), e.decision.action == Action::Block);
                let action = e.decision.action;
                sut.run.commit(e);
                sut.last_call = Some(call);
                Expected::Decided(action)
            }
        };
        if let Some(expected) = &reference.expected {
            assert_eq!(&got, expected, "transition {transition:?}");
        }
        sut
    }

    fn check_invariants(sut: &Sut, reference: &Model) {
        let state = sut.run.state();
        assert_eq!(state.totals.tokens, reference.tokens);
        assert_eq!(state.totals.steps, reference.steps);
        assert_eq!((state.next.index, state.next.phase), reference.next);
        assert_eq!(state.status == RunStatus::Stopped, reference.stopped);
    }
}

prop_state_machine! {
    #![proptest_config(Config {
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..Config::default()
    })]

    #[test]
    fn a_run_behaves_like_its_model(sequential 1..40 => Sut);
}
