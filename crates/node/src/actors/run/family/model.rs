//! A state-machine test of run families through the run actors against a simple model
//! (proptest-state-machine): random trees of runs, random calls with usage at `post`, run ends and
//! restarts (every run rehydrated from the store, the run tree rebuilt). The stored rolled-up totals
//! always equal the model's sums over each subtree, and every call is answered as the model predicts,
//! so no ancestor's limit is passed at `post` without a block.

use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest, prop_state_machine};
use runguard_contract::{Action, Outcome, Phase, StepCall, Usage};

use super::Adopt;
use crate::actors::run::{CreateRun, EndRun, Step};
use crate::actors::test_support::{Node, key};

/// Every run's per-run token budget (one tenant, one snapshot).
const MAX_TOKENS: u64 = 100;
/// The default `max_run_depth`.
const MAX_DEPTH: usize = 4;
/// The most runs a case creates.
const MAX_RUNS: usize = 8;

#[derive(Clone, Debug)]
pub enum Transition {
    Root,
    Child { parent: usize },
    Call { run: usize, tokens: u64 },
    End { run: usize },
    Restart,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    Created,
    Refused,
    Decided(Action),
    Done,
}

#[derive(Clone, Debug)]
struct ModelRun {
    parent: Option<usize>,
    own: u64,
    running: bool,
    next: u64,
}

#[derive(Clone, Debug, Default)]
pub struct Model {
    runs: Vec<ModelRun>,
    expected: Option<Answer>,
}

impl Model {
    /// Root first, parent last.
    fn ancestors(&self, run: usize) -> Vec<usize> {
        let mut chain = Vec::new();
        let mut at = self.runs[run].parent;
        while let Some(parent) = at {
            chain.push(parent);
            at = self.runs[parent].parent;
        }
        chain.reverse();
        chain
    }

    fn rolled_up(&self, run: usize) -> u64 {
        let children = (0..self.runs.len()).filter(|&i| self.runs[i].parent == Some(run));
        self.runs[run].own + children.map(|child| self.rolled_up(child)).sum::<u64>()
    }

    fn predict(&self, transition: &Transition) -> (Answer, Model) {
        let mut next = self.clone();
        let answer = match *transition {
            Transition::Root => {
                next.runs.push(ModelRun { parent: None, own: 0, running: true, next: 0 });
                Answer::Created
            }
            Transition::Child { parent } => {
                let chain_running = self.ancestors(parent).iter().chain([&parent]).all(|&a| self.runs[a].running);
                if !chain_running || self.ancestors(parent).len() + 2 > MAX_DEPTH {
                    Answer::Refused
                } else {
                    next.runs.push(ModelRun { parent: Some(parent), own: 0, running: true, next: 0 });
                    Answer::Created
                }
            }
            Transition::Call { run, tokens } => {
                let ancestors = self.ancestors(run);
                if !self.runs[run].running {
                    Answer::Refused
                } else if ancestors.iter().any(|&a| !self.runs[a].running) {
                    next.runs[run].running = false;
                    Answer::Refused
                } else {
                    let over = ancestors.iter().chain([&run]).any(|&a| self.rolled_up(a) + tokens > MAX_TOKENS);
                    next.runs[run].own += tokens;
                    next.runs[run].next += 1;
                    next.runs[run].running = !over;
                    Answer::Decided(if over { Action::Block } else { Action::Allow })
                }
            }
            Transition::End { run } => {
                next.runs[run].running = false;
                Answer::Done
            }
            Transition::Restart => Answer::Done,
        };
        (answer, next)
    }
}

pub struct Tree;

impl ReferenceStateMachine for Tree {
    type State = Model;
    type Transition = Transition;

    fn init_state() -> BoxedStrategy<Model> {
        Just(Model::default()).boxed()
    }

    fn transitions(state: &Model) -> BoxedStrategy<Transition> {
        let runs = state.runs.len();
        if runs == 0 {
            return Just(Transition::Root).boxed();
        }
        let calls = prop_oneof![
            8 => (0..runs, 0u64..45).prop_map(|(run, tokens)| Transition::Call { run, tokens }),
            1 => (0..runs).prop_map(|run| Transition::End { run }),
            1 => Just(Transition::Restart),
        ];
        if runs >= MAX_RUNS {
            return calls.boxed();
        }
        prop_oneof![
            1 => Just(Transition::Root),
            3 => (0..runs).prop_map(|parent| Transition::Child { parent }),
            10 => calls,
        ]
        .boxed()
    }

    fn apply(state: Model, transition: &Transition) -> Model {
        let (answer, mut next) = state.predict(transition);
        next.expected = Some(answer);
        next
    }
}

pub struct Sut {
    system: actix_rt::SystemRunner,
    node: Option<Node>,
    created: usize,
    /// The id of each run the model knows, by its index (a refused child takes none).
    ids: Vec<String>,
    next: BTreeMap<usize, u64>,
}

fn call(index: u64, phase: Phase, tokens: u64) -> Step {
    let usage = (phase == Phase::Post).then_some(Usage { tokens, ..Usage::default() });
    Step(Box::new(StepCall { usage, ..StepCall::new(index, phase) }))
}

impl Sut {
    fn node(&self) -> &Node {
        self.node.as_ref().unwrap()
    }

    fn create(&mut self, ancestors: Vec<runguard_contract::RunId>) -> Answer {
        let id = format!("r{}", self.created);
        self.created += 1;
        let node = self.node.as_ref().unwrap();
        let created = self.system.block_on(async {
            let run = node.run("acme", &id).await;
            run.send(CreateRun { labels: BTreeMap::new(), api_endpoint: None, ancestors }).await.unwrap()
        });
        assert!(created.unwrap().created);
        self.ids.push(id);
        Answer::Created
    }

    fn apply_transition(&mut self, transition: &Transition) -> Answer {
        match *transition {
            Transition::Root => self.create(Vec::new()),
            Transition::Child { parent } => {
                let node = self.node.as_ref().unwrap();
                let adopted =
                    self.system.block_on(async { node.run("acme", &self.ids[parent]).await.send(Adopt).await });
                match adopted.unwrap() {
                    Ok(lineage) if lineage.ancestors.len() < MAX_DEPTH => self.create(lineage.ancestors),
                    _ => Answer::Refused,
                }
            }
            Transition::Call { run, tokens } => {
                let index = self.next.get(&run).copied().unwrap_or(0);
                let node = self.node.as_ref().unwrap();
                let id = &self.ids[run];
                let answer = self.system.block_on(async {
                    let actor = node.run("acme", id).await;
                    match actor.send(call(index, Phase::Pre, 0)).await.unwrap() {
                        Err(_) => return Answer::Refused,
                        Ok(pre) => assert_eq!(pre.action, Action::Allow),
                    }
                    match actor.send(call(index, Phase::Post, tokens)).await.unwrap() {
                        Err(err) => panic!("a post after an allowed pre is answered: {err:?}"),
                        Ok(post) => Answer::Decided(post.action),
                    }
                });
                if matches!(answer, Answer::Decided(_)) {
                    self.next.insert(run, index + 1);
                }
                answer
            }
            Transition::End { run } => {
                let node = self.node.as_ref().unwrap();
                let id = &self.ids[run];
                self.system.block_on(async {
                    let actor = node.run("acme", id).await;
                    actor.send(EndRun { outcome: Outcome::Succeeded, error: None }).await.unwrap().unwrap();
                });
                Answer::Done
            }
            Transition::Restart => {
                let node = self.node.take().unwrap();
                self.node = Some(self.system.block_on(async { node.restarted() }));
                Answer::Done
            }
        }
    }
}

impl StateMachineTest for Sut {
    type SystemUnderTest = Sut;
    type Reference = Tree;

    fn init_test(_: &Model) -> Sut {
        let system = actix_rt::System::new();
        let node = system.block_on(async {
            let node = Node::start(|_| {});
            node.policy(
                "acme",
                serde_json::json!({"id": "pol_tokens", "name": "tokens",
                    "rule": {"kind": "budget", "metric": "tokens", "per": "run", "max": MAX_TOKENS}}),
            );
            node
        });
        Sut { system, node: Some(node), created: 0, ids: Vec::new(), next: BTreeMap::new() }
    }

    fn apply(mut sut: Sut, reference: &Model, transition: Transition) -> Sut {
        let got = sut.apply_transition(&transition);
        assert_eq!(Some(got), reference.expected, "transition {transition:?}");
        sut
    }

    fn check_invariants(sut: &Sut, reference: &Model) {
        let store = &sut.node().store;
        for (i, id) in sut.ids.iter().enumerate() {
            let k = key("acme", id);
            let run = store.get_run(&k.tenant, &k.run_id).unwrap().unwrap();
            let rollup = store.run_rollup(&k.tenant, &k.run_id).unwrap();
            assert_eq!(
                run.totals.tokens + rollup.descendants.tokens,
                reference.rolled_up(i),
                "rolled-up totals of {id}"
            );
            assert_eq!(run.status.is_running(), reference.runs[i].running, "status of {id}");
        }
    }
}

prop_state_machine! {
    #![proptest_config(Config {
        // Each case drives real actors over a store: fewer cases than proptest's default keep the test
        // to seconds; `PROPTEST_CASES` still overrides.
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(64),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..Config::default()
    })]

    #[test]
    fn run_families_behave_like_their_model(sequential 1..30 => Sut);
}
