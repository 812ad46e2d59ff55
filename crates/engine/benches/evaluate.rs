//! Criterion benchmarks of [`Run::step`], what a host calls per step, against the engine's latency
//! targets (`docs/performance.md`). Every figure goes through the public API: a warmed run answers one call, uncommitted.
//!
//! - `baseline_totals_with`: a trivial operation (adding a step's usage to run totals) measured in the
//!   same run; the other figures are quoted as ratios to it.
//! - `four_budgets`: a typical snapshot of four budgets answering a `post` call (target: under 1 µs);
//!   `four_budgets_block`: the same call over the per-step token budget, the block path with its
//!   prevention record draft.
//! - `fifty_policies_content_cel`: fifty policies (budgets, run-scope rates, content, skill and CEL rules)
//!   answering a `post` call that carries 4 KiB of output text, without and with matches (target: under
//!   25 µs); `clean_4k_non_ascii` is the clean text with one sentence of typographic punctuation.
//!   `fifty_policies_pre` answers the `pre` call of the same snapshot, where the rate rules bind.
//! - `scaling/{10,100,1000}`: budget and CEL policies, to show cost grows at most linearly in policies.
//! - `compile/fifty_policies`: [`CompiledSnapshot::compile`], the one-time cost at run start.
//! - `breakdown/*`: pieces of the fifty-policy case, to show what limits it.
//! - `tenant_rate/{allow,throttle}/{100,100000}`: one tenant-scope rate rule checked against a window
//!   holding 100 or 100,000 events; the check must cost the same for both.
//! - `host_step/run_step_after/{four_budgets,fifty_policies_4k,four_budgets_two_repeats}`: [`Run::step`]
//!   and [`Run::after`], what the node does per `post` call before it persists.
//! - `repeat/{pre,post}`: the four budgets plus two repeat rules (calls over 100 steps, errors over 20)
//!   answering the `pre` (the call key is hashed and counted) and the `post` of a warmed run: the cost of
//!   loop detection over `four_budgets`.
//!
//! - `run_tree/three_levels_post`: the `post` of a run three levels deep ([`Run::step_in_family`] with two
//!   ancestors and descendants' usage, every run on the four budgets): the cost of parent and child runs.
//!
//! Every input is built, validated and checked once outside the timed closures: each bench asserts the
//! decision it expects, so a broken setup cannot produce a meaningless fast number.
//!
//! `cargo bench -p runguard-engine --bench evaluate`

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use runguard_contract::{
    Action, Estimate, Phase, Policy, PolicyDocument, PolicyLimits, RunId, Snapshot, StepCall, TenantId, Timestamp,
    Totals, Usage,
};
use runguard_engine::{Ancestor, CompiledSnapshot, Family, Outcome, Run, RunLimits, TenantRates, validate_document};
use serde_json::{Value, json};

/// When the bench run starts (any fixed instant: the engine never reads the clock).
const START_MS: i64 = 1_795_000_000_000;
/// Complete steps a run has taken before the benched call.
const WARM_STEPS: u64 = 6;
/// Size of the output text of the content benches.
const TEXT_LEN: usize = 4096;

fn tenant() -> TenantId {
    TenantId::new("acme").expect("`acme` is a valid tenant id")
}

/// Parses and fully validates (regexes and CEL compiled) a policy document, then makes it version 1.
fn policy(doc: Value) -> Policy {
    let limits = PolicyLimits::default();
    let shown = doc.to_string();
    let doc = PolicyDocument::from_value(doc, &limits).unwrap_or_else(|e| panic!("{shown} does not parse: {e}"));
    validate_document(&doc, &limits).unwrap_or_else(|e| panic!("{shown} is not valid: {e}"));
    let id = doc.id.clone().expect("bench policies name their id");
    Policy::create(doc, id, Some(tenant()), Timestamp::from_unix_millis(START_MS))
}

fn snapshot_of(policies: &[Policy]) -> Snapshot {
    let snapshot = Snapshot::capture(&tenant(), policies);
    assert_eq!(snapshot.policies.len(), policies.len(), "every bench policy is captured");
    snapshot
}

/// Compiles validated policies (so every rule compiles).
fn compile(policies: &[Policy]) -> Arc<CompiledSnapshot> {
    let compiled =
        CompiledSnapshot::compile(&snapshot_of(policies), &PolicyLimits::default()).expect("the snapshot hashes");
    assert_eq!(compiled.reference().policy_count, u64::try_from(policies.len()).expect("few policies"));
    Arc::new(compiled)
}

fn budget(id: &str, metric: &str, per: &str, max: u64, warn_at: &[u32], action: &str, precedence: u32) -> Policy {
    policy(json!({
        "id": id, "name": format!("{per} {metric} budget"), "action": action, "precedence": precedence,
        "rule": {"kind": "budget", "metric": metric, "per": per, "max": max, "warn_at": warn_at},
    }))
}

/// The typical snapshot: four budgets.
fn four_budgets() -> Vec<Policy> {
    vec![
        budget("b_tokens_run", "tokens", "run", 100_000, &[50, 90], "block", 100),
        budget("b_cost_run", "cost_micros", "run", 5_000_000, &[], "block", 100),
        budget("b_steps_run", "steps", "run", 200, &[], "block", 100),
        budget("b_tokens_step", "tokens", "step", 16_000, &[], "block", 100),
    ]
}

/// The four budgets and two repeat rules, loose enough for the warm-up's identical calls.
fn four_budgets_two_repeats() -> Vec<Policy> {
    let mut policies = four_budgets();
    for (id, of, max, window) in [("r_calls", "call", 50, 100), ("r_errors", "error", 3, 20)] {
        policies.push(policy(json!({
            "id": id, "name": format!("{of} loops"),
            "rule": {"kind": "repeat", "of": of, "max": max, "window_steps": window},
        })));
    }
    policies
}

fn rate(id: &str, metric: &str, max: u64, window_s: u32) -> Policy {
    policy(json!({
        "id": id, "name": format!("{metric} per {window_s}s"),
        "rule": {"kind": "rate", "metric": metric, "max": max, "window_s": window_s, "scope": "run"},
    }))
}

fn content(id: &str, action: &str, rule: Value) -> Policy {
    let mut rule = rule;
    rule["kind"] = json!("content");
    policy(json!({"id": id, "name": format!("content {id}"), "action": action, "rule": rule}))
}

fn skill(id: &str, list: &str, skills: &[&str], bind_at: Option<&str>) -> Policy {
    let mut doc = json!({"id": id, "name": format!("skill {list} list {id}"), "rule": {"kind": "skill"}});
    doc["rule"][list] = json!(skills);
    if let Some(bind) = bind_at {
        doc["bind_at"] = json!(bind);
    }
    policy(doc)
}

fn expr(id: &str, cel: &str) -> Policy {
    policy(json!({"id": id, "name": format!("custom rule {id}"), "rule": {"kind": "expr", "cel": cel}}))
}

/// The CEL rules of the fifty-policy snapshot; each is false for the benched calls.
const CEL_RULES: &[&str] = &[
    "run.tokens > 50000 && step.index > 3",
    "has(step.skill) && step.skill == 'fetch'",
    "step.input_keys.exists(k, k == 'password')",
    "has(step.usage) && step.usage.duration_ms > 30000",
    "run.cost_micros > 5000000 || run.steps > 150",
    "has(step.api_endpoint) && step.api_endpoint.startsWith('https://internal.')",
    "has(step.error) && has(step.error.status) && step.error.status >= 500",
    "'team' in run.labels && run.labels.team == 'red' && run.tokens > 20000",
    "size(step.input_keys) > 32",
    "has(step.output_text) && step.output_text.contains('BEGIN PRIVATE KEY')",
    "run.labels.env == 'prod' && has(step.skill) && step.skill in ['shell', 'exec', 'sudo']",
    "has(step.usage) && step.usage.tokens > 0 && step.usage.cost_micros / step.usage.tokens > 100",
];

/// Fifty policies: 12 budgets, 6 run-scope rates, 12 content rules, 8 skill lists and 12 CEL rules.
fn fifty_policies() -> Vec<Policy> {
    let mut policies = vec![
        budget("b01_tokens_run", "tokens", "run", 100_000, &[50, 90], "block", 100),
        budget("b02_cost_run", "cost_micros", "run", 5_000_000, &[], "block", 100),
        budget("b03_steps_run", "steps", "run", 200, &[], "block", 100),
        budget("b04_tokens_step", "tokens", "step", 16_000, &[], "block", 100),
        budget("b05_duration_run", "duration_ms", "run", 3_600_000, &[80], "block", 100),
        budget("b06_cost_step", "cost_micros", "step", 500_000, &[], "block", 50),
        budget("b07_duration_step", "duration_ms", "step", 120_000, &[], "warn", 100),
        budget("b08_tokens_run_soft", "tokens", "run", 250_000, &[], "warn", 100),
        budget("b09_cost_run_tiers", "cost_micros", "run", 20_000_000, &[25, 50, 75], "block", 100),
        budget("b10_steps_run_soft", "steps", "run", 1_000, &[], "warn", 100),
        budget("b11_tokens_step_soft", "tokens", "step", 64_000, &[], "warn", 200),
        budget("b12_cost_run_strict", "cost_micros", "run", 10_000_000, &[], "block", 10),
        rate("r01_steps_minute", "steps", 60, 60),
        rate("r02_steps_hour", "steps", 500, 3_600),
        rate("r03_tokens_minute", "tokens", 200_000, 60),
        rate("r04_cost_minute", "cost_micros", 1_000_000, 60),
        rate("r05_steps_second", "steps", 10, 1),
        rate("r06_tokens_hour", "tokens", 1_000_000, 3_600),
        content("c01_email", "warn", json!({"detectors": ["email"]})),
        content("c02_ssn", "block", json!({"detectors": ["ssn"]})),
        content("c03_card", "block", json!({"detectors": ["credit_card"]})),
        content("c04_phone", "block", json!({"detectors": ["phone"]})),
        content("c05_ip", "block", json!({"detectors": ["ip_address"]})),
        content("c06_api_key", "block", json!({"detectors": ["api_key"]})),
        content("c07_secrets_both", "block", json!({"target": "both", "detectors": ["api_key", "ssn"]})),
        content("c08_tickets", "block", json!({"patterns": [r"\bINC-\d{6}\b", r"\bSEC-[A-Z]{2,5}-\d+\b"]})),
        content(
            "c09_credentials",
            "block",
            json!({"patterns": [r"(?i)\bpassword\s*[:=]\s*\S+", r"-----BEGIN [A-Z ]*PRIVATE KEY-----"]}),
        ),
        content("c10_iban", "block", json!({"patterns": [r"\b[A-Z]{2}\d{2}[A-Z0-9]{11,30}\b"]})),
        content(
            "c11_classification",
            "warn",
            json!({"case_insensitive": true,
                   "keywords": ["confidential", "internal only", "do not distribute", "attorney-client privileged"]}),
        ),
        content(
            "c12_codenames",
            "block",
            json!({"case_insensitive": true, "keywords": [
                "project nightingale", "project kestrel", "acquisition target", "layoff list", "board minutes",
                "salary band", "merger", "insider", "embargoed", "pre-announcement", "unreleased earnings",
                "red team report", "pentest findings", "root password", "customer export", "raw pii",
                "gdpr request", "legal hold", "subpoena", "whistleblower",
            ]}),
        ),
        skill("s01_deny_dangerous", "deny", &["shell", "delete_file", "send_email"], Some("step_post")),
        skill("s02_deny_money", "deny", &["transfer_funds", "wire", "refund"], None),
        skill(
            "s03_allow_core",
            "allow",
            &["search", "fetch", "summarize", "write_file", "read_file"],
            Some("step_post"),
        ),
        skill(
            "s04_allow_catalog",
            "allow",
            &[
                "search",
                "fetch",
                "summarize",
                "translate",
                "classify",
                "extract",
                "read_file",
                "write_file",
                "list_files",
                "calendar",
                "weather",
                "calculator",
                "browse",
                "sql_read",
                "chart",
                "email_draft",
                "ticket_read",
                "ticket_comment",
                "wiki_read",
                "wiki_write",
            ],
            None,
        ),
        skill(
            "s05_deny_admin",
            "deny",
            &["sudo", "iam_admin", "kms_decrypt", "db_drop", "db_migrate", "deploy", "rollback", "scale"],
            Some("step_post"),
        ),
        skill("s06_deny_exec", "deny", &["exec"], None),
        skill("s07_allow_research", "allow", &["search", "browse"], Some("step_post")),
        skill("s08_deny_sudo", "deny", &["sudo"], None),
    ];
    policies.extend(CEL_RULES.iter().enumerate().map(|(i, cel)| expr(&format!("e{:02}_custom", i + 1), cel)));
    assert_eq!(policies.len(), 50);
    policies
}

/// `n` policies alternating a budget (metric and per cycling) and a CEL rule, none violated.
fn scaled_policies(n: usize) -> Vec<Policy> {
    const METRICS: [(&str, &str); 4] =
        [("tokens", "run"), ("cost_micros", "run"), ("steps", "run"), ("tokens", "step")];
    (0..n)
        .map(|i| {
            if i % 2 == 0 {
                let (metric, per) = METRICS[(i / 2) % METRICS.len()];
                let max = 1_000_000_000 + u64::try_from(i).expect("small");
                budget(&format!("p{i:04}"), metric, per, max, &[], "block", 100)
            } else if i % 4 == 1 {
                expr(&format!("p{i:04}"), &format!("run.tokens > {} && step.index > 3", 1_000_000 + i))
            } else {
                expr(&format!("p{i:04}"), &format!("has(step.skill) && step.skill == 'fetch_{i}'"))
            }
        })
        .collect()
}

/// Realistic agent output: a report without anything the detectors, patterns or keywords look for.
const SENTENCES: &[&str] = &[
    "Summary of the search results for the quarterly infrastructure review. ",
    "The query returned 42 documents from the knowledge base, of which 17 were relevant to the question. ",
    "Most of them describe the migration of the billing service to the new cluster in March 2025. ",
    "The migration plan lists three phases: preparation, dual writes and cut-over, each with rollback steps. ",
    "During preparation the team measured a median latency of 38 ms and a p99 of 212 ms on the old cluster. ",
    "Dual writes ran for 11 days; the reconciliation job found 0.02% of records out of sync and repaired them. ",
    "The cut-over happened on a Sunday morning and took 47 minutes, well inside the two-hour window. ",
    "Open questions remain about capacity planning for the holiday peak and the retention of audit logs. ",
    "Recommended next steps: review the alert thresholds, document the runbook, and schedule a game day. ",
    "Sources: the migration design document, the review of the February outage, and the team wiki. ",
];

/// Sentences that the fifty-policy snapshot flags: one e-mail address and one classification keyword, both
/// matched by `warn` policies.
const MATCHING: [&str; 2] = [
    "Questions about the rollout can go to jane.doe@example.com before Friday. ",
    "This summary is Confidential and meant for the platform team. ",
];

/// A clean sentence with typographic punctuation, as model output often has: the text is no longer ASCII.
const TYPOGRAPHIC: &str =
    "The team\u{2019}s review \u{2014} \u{201c}cut-over went well\u{201d} \u{2014} closed the item. ";

/// Exactly [`TEXT_LEN`] bytes of report text, with `inserts` (sentence position, text) spliced in.
fn output_text(inserts: &[(usize, &str)]) -> String {
    let mut text = String::with_capacity(TEXT_LEN + 128);
    for i in 0.. {
        if text.len() >= TEXT_LEN {
            break;
        }
        if let Some((_, insert)) = inserts.iter().find(|(at, _)| *at == i) {
            text.push_str(insert);
        }
        text.push_str(SENTENCES[i % SENTENCES.len()]);
    }
    text.truncate(TEXT_LEN);
    for (_, insert) in inserts {
        assert!(text.contains(insert), "inserted sentences lie inside the first {TEXT_LEN} bytes");
    }
    text
}

fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([("team".to_owned(), "blue".to_owned()), ("env".to_owned(), "prod".to_owned())])
}

/// When the `pre` of step `index` arrives; its `post` follows one second later.
fn pre_time(index: u64) -> Timestamp {
    Timestamp::from_unix_millis(START_MS + 10_000 + 2_000 * i64::try_from(index).expect("small index"))
}

fn post_time(index: u64) -> Timestamp {
    pre_time(index).plus_millis(1_000)
}

fn pre_call(index: u64) -> StepCall {
    StepCall {
        skill: Some("search".to_owned()),
        api_endpoint: Some("https://kb.example.com/v1/search".to_owned()),
        input_keys: vec!["query".to_owned(), "max_results".to_owned(), "filters".to_owned()],
        input_text: Some(
            "Search the knowledge base for the billing service migration and summarise the plan, the risks and \
             the open questions for the review meeting."
                .to_owned(),
        ),
        estimate: Some(Estimate { tokens: Some(1_500), cost_micros: Some(3_000) }),
        ..StepCall::new(index, Phase::Pre)
    }
}

fn post_call(index: u64, output_text: Option<String>) -> StepCall {
    StepCall {
        skill: Some("search".to_owned()),
        api_endpoint: Some("https://kb.example.com/v1/search".to_owned()),
        input_keys: vec!["query".to_owned(), "max_results".to_owned(), "filters".to_owned()],
        usage: Some(Usage { tokens: 1_200, cost_micros: 2_400, duration_ms: 850 }),
        output_text,
        ..StepCall::new(index, Phase::Post)
    }
}

/// Answers and commits one call that must be allowed.
fn drive(run: &mut Run, call: &StepCall, now: Timestamp) {
    let outcome = run.step(call, &RunLimits::default(), &mut TenantRates::default(), now).expect("in order");
    assert_eq!(outcome.decision.action, Action::Allow, "warm-up call: {:?}", outcome.decision.violations);
    run.commit(outcome);
}

/// A run that has taken [`WARM_STEPS`] complete steps under `snapshot` (so it has totals and rate events),
/// and, with `then_pre`, also the `pre` of the next step, so that it expects that step's `post`.
fn warmed_run(snapshot: &Arc<CompiledSnapshot>, then_pre: bool) -> Run {
    let run_id = RunId::new("run-bench").expect("valid run id");
    let (mut run, start) = Run::start(Arc::clone(snapshot), tenant(), run_id, labels(), pre_time(0));
    run.commit(start);
    for index in 0..WARM_STEPS {
        drive(&mut run, &pre_call(index), pre_time(index));
        drive(&mut run, &post_call(index, Some("done".to_owned())), post_time(index));
    }
    if then_pre {
        drive(&mut run, &pre_call(WARM_STEPS), pre_time(WARM_STEPS));
    }
    run
}

/// One benched call: a warmed run and the call it expects, built before timing.
#[derive(Debug)]
struct Case {
    run: Run,
    call: StepCall,
    now: Timestamp,
    limits: RunLimits,
}

impl Case {
    /// The `post` of step [`WARM_STEPS`] with `output_text`.
    fn post(policies: &[Policy], output_text: Option<String>) -> Self {
        let run = warmed_run(&compile(policies), true);
        let call = post_call(WARM_STEPS, output_text);
        Self { run, call, now: post_time(WARM_STEPS), limits: RunLimits::default() }
    }

    /// The `pre` of step [`WARM_STEPS`].
    fn pre(policies: &[Policy]) -> Self {
        let run = warmed_run(&compile(policies), false);
        Self { run, call: pre_call(WARM_STEPS), now: pre_time(WARM_STEPS), limits: RunLimits::default() }
    }

    /// The outcome of the call, uncommitted. The snapshots here have no tenant-scope rule, so the tenant's
    /// windows are an empty value (which does not allocate).
    fn step(&self) -> Outcome {
        let mut rates = TenantRates::default();
        black_box(&self.run)
            .step(black_box(&self.call), &self.limits, &mut rates, black_box(self.now))
            .expect("the benched call is in order")
    }

    /// Checks, once and untimed, that the call gets `action` with `violations` violations.
    fn expect(self, action: Action, violations: usize) -> Self {
        let outcome = self.step();
        assert!(!outcome.is_replay(), "the benched call is evaluated");
        let decision = outcome.decision;
        assert_eq!(decision.action, action, "unexpected decision: {:?}", decision.violations);
        assert_eq!(decision.violations.len(), violations, "unexpected violations: {:?}", decision.violations);
        assert!(decision.shadow.is_empty());
        self
    }

    fn bench(&self, c: &mut Criterion, name: &str) {
        c.bench_function(name, |b| b.iter(|| self.step()));
    }
}

/// The totals once a step's usage is added: the trivial operation the figures are compared with.
fn totals_with(totals: &Totals, usage: &Usage) -> Totals {
    Totals {
        tokens: totals.tokens.saturating_add(usage.tokens),
        cost_micros: totals.cost_micros.saturating_add(usage.cost_micros),
        steps: totals.steps.saturating_add(1),
        duration_ms: totals.duration_ms.saturating_add(usage.duration_ms),
    }
}

fn baseline(c: &mut Criterion) {
    let run = warmed_run(&compile(&four_budgets()), true);
    let usage = Usage { tokens: 1_200, cost_micros: 2_400, duration_ms: 850 };
    let expected = Totals {
        tokens: 1_200 * (WARM_STEPS + 1),
        cost_micros: 2_400 * (WARM_STEPS + 1),
        steps: WARM_STEPS + 1,
        duration_ms: 850 * (WARM_STEPS + 1),
    };
    assert_eq!(totals_with(&run.state().totals, &usage), expected);
    c.bench_function("baseline_totals_with", |b| {
        b.iter(|| totals_with(black_box(&run.state().totals), black_box(&usage)))
    });
}

fn engine(c: &mut Criterion) {
    Case::post(&four_budgets(), None).expect(Action::Allow, 0).bench(c, "four_budgets");
    // The same call over the per-step token budget: a block, with its prevention record draft.
    let mut block = Case::post(&four_budgets(), None);
    block.call.usage = Some(Usage { tokens: 20_000, cost_micros: 2_400, duration_ms: 850 });
    block.expect(Action::Block, 1).bench(c, "four_budgets_block");

    let fifty = fifty_policies();
    let clean = Case::post(&fifty, Some(output_text(&[]))).expect(Action::Allow, 0);
    let matching =
        Case::post(&fifty, Some(output_text(&[(12, MATCHING[0]), (27, MATCHING[1])]))).expect(Action::Warn, 2);
    let mut group = c.benchmark_group("fifty_policies_content_cel");
    group.bench_function("clean_4k", |b| b.iter(|| clean.step()));
    group.bench_function("two_matches_4k", |b| b.iter(|| matching.step()));
    let typographic = Case::post(&fifty, Some(output_text(&[(3, TYPOGRAPHIC)]))).expect(Action::Allow, 0);
    group.bench_function("clean_4k_non_ascii", |b| b.iter(|| typographic.step()));
    group.finish();

    Case::pre(&fifty).expect(Action::Allow, 0).bench(c, "fifty_policies_pre");
}

fn scaling(c: &mut Criterion) {
    let mut group = c.benchmark_group("scaling");
    for n in [10usize, 100, 1_000] {
        let case = Case::post(&scaled_policies(n), None).expect(Action::Allow, 0);
        group.throughput(Throughput::Elements(u64::try_from(n).expect("small")));
        group.bench_with_input(BenchmarkId::from_parameter(n), &case, |b, case| b.iter(|| case.step()));
    }
    group.finish();
}

fn compile_snapshot(c: &mut Criterion) {
    let limits = PolicyLimits::default();
    let snapshot = snapshot_of(&fifty_policies());
    let compiled = CompiledSnapshot::compile(&snapshot, &limits).expect("the snapshot hashes");
    assert_eq!(compiled.reference().policy_count, 50);
    let mut group = c.benchmark_group("compile");
    // A few milliseconds per iteration: 50 samples need more than the default 3 s.
    group.measurement_time(Duration::from_secs(6));
    group.bench_function("fifty_policies", |b| {
        b.iter(|| CompiledSnapshot::compile(black_box(&snapshot), black_box(&limits)))
    });
    group.finish();
}

/// Pieces of the fifty-policy case, to attribute its cost.
fn breakdown(c: &mut Criterion) {
    let fifty = fifty_policies();
    let text = output_text(&[]);
    let mut group = c.benchmark_group("breakdown");

    // Only the twelve content rules scanning the 4 KiB text.
    let content: Vec<Policy> = fifty.iter().filter(|p| p.rule.kind() == "content").cloned().collect();
    assert_eq!(content.len(), 12);
    let content_only = Case::post(&content, Some(text.clone())).expect(Action::Allow, 0);
    group.bench_function("content_rules_only_4k", |b| b.iter(|| content_only.step()));

    // The same fifty policies and call without output text: content rules have nothing to scan.
    let no_text = Case::post(&fifty, None).expect(Action::Allow, 0);
    group.bench_function("fifty_policies_no_text", |b| b.iter(|| no_text.step()));

    // Only the twelve CEL rules, with the 4 KiB text in the step.
    let cel: Vec<Policy> = fifty.iter().filter(|p| p.rule.kind() == "expr").cloned().collect();
    assert_eq!(cel.len(), CEL_RULES.len());
    let cel_only = Case::post(&cel, Some(text.clone())).expect(Action::Allow, 0);
    group.bench_function("cel_rules_only_4k", |b| b.iter(|| cel_only.step()));

    // One CEL rule, without text: the fixed cost of evaluating a single expression.
    let one_cel = Case::post(&cel[..1], None).expect(Action::Allow, 0);
    group.bench_function("one_cel_rule", |b| b.iter(|| one_cel.step()));

    // The four budgets with the 4 KiB text in the step: what digesting the call adds to the typical case.
    let budgets_text = Case::post(&four_budgets(), Some(text)).expect(Action::Allow, 0);
    group.bench_function("four_budgets_4k_output", |b| b.iter(|| budgets_text.step()));
    group.finish();
}

/// A tenant-scope steps rate rule against `events` steps of other runs, 2 ms apart, the newest 1 ms before
/// the call: all of them inside the 300 s window. With `max` = half the events the call is throttled until
/// the oldest half has left the window. The allowed call is counted in the window (at the same instant
/// every iteration, so the window does not grow), so its rule's `max` leaves room for every iteration.
fn tenant_rates(c: &mut Criterion) {
    const WINDOW_S: u32 = 300;
    let mut group = c.benchmark_group("tenant_rate");
    for (name, throttled) in [("allow", false), ("throttle", true)] {
        for events in [100i64, 100_000] {
            let rule = |max: i64| {
                policy(json!({
                    "id": "t01_tenant_steps", "name": "tenant steps per 5 minutes",
                    "rule": {"kind": "rate", "metric": "steps", "max": max, "window_s": WINDOW_S, "scope": "tenant"},
                }))
            };
            let unlimited = 1 << 50;
            let max = if throttled { events / 2 } else { unlimited };
            let snapshot = compile(&[rule(max)]);
            // The other runs are bound to a snapshot whose rule lets them all through.
            let filling = compile(&[rule(unlimited)]);
            let now = pre_time(0);
            let at = |i: i64| now.plus_millis(-1 - 2 * (events - 1 - i));
            // The other runs of the tenant fill its window, one step each.
            let mut rates = TenantRates::default();
            for i in 0..events {
                let run_id = RunId::new(format!("run-fill-{i}")).expect("valid run id");
                let (mut run, start) = Run::start(Arc::clone(&filling), tenant(), run_id, labels(), at(i));
                run.commit(start);
                let filled = run.step(&pre_call(0), &RunLimits::default(), &mut rates, at(i)).expect("in order");
                assert_eq!(filled.decision.action, Action::Allow);
            }
            let (mut run, start) = Run::start(
                Arc::clone(&snapshot),
                tenant(),
                RunId::new("run-bench").expect("valid run id"),
                labels(),
                now,
            );
            run.commit(start);
            let call = pre_call(0);
            let limits = RunLimits::default();
            let decision = run.step(&call, &limits, &mut rates.clone(), now).expect("in order").decision;
            if throttled {
                // `max` events may stay: the call fits once the oldest `events - max + 1` have left.
                let fits_at = at(events - max).plus_millis(i64::from(WINDOW_S) * 1000);
                assert_eq!(decision.action, Action::Throttle, "{:?}", decision.violations);
                assert_eq!(decision.retry_after_ms, Some(fits_at.millis_since(now)));
            } else {
                assert_eq!(decision.action, Action::Allow, "{:?}", decision.violations);
            }
            group.bench_function(BenchmarkId::new(name, events), |b| {
                b.iter(|| {
                    black_box(&run)
                        .step(black_box(&call), &limits, black_box(&mut rates), black_box(now))
                        .expect("in order")
                })
            });
        }
    }
    group.finish();
}

/// A host's whole step before it persists: the outcome and the run as it will be once committed.
fn host_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("host_step");
    let text = output_text(&[]);
    for (name, policies, output) in [
        ("four_budgets", four_budgets(), None),
        ("fifty_policies_4k", fifty_policies(), Some(text)),
        ("four_budgets_two_repeats", four_budgets_two_repeats(), None),
    ] {
        let case = Case::post(&policies, output).expect(Action::Allow, 0);
        group.bench_function(BenchmarkId::new("run_step_after", name), |b| {
            b.iter(|| {
                let outcome = case.step();
                let next = case.run.after(&outcome);
                (outcome, next)
            })
        });
    }
    group.finish();
}

/// Loop detection over the four budgets: the `pre` hashes and counts the call key, the `post` records.
fn repeat(c: &mut Criterion) {
    let mut group = c.benchmark_group("repeat");
    let pre = Case::pre(&four_budgets_two_repeats()).expect(Action::Allow, 0);
    group.bench_function("pre", |b| b.iter(|| pre.step()));
    let post = Case::post(&four_budgets_two_repeats(), None).expect(Action::Allow, 0);
    group.bench_function("post", |b| b.iter(|| post.step()));
    group.finish();
}

/// A run three levels deep (root → parent → this run), each bound to the four budgets: the `post` of
/// [`Run::step_in_family`] checks the run's own budgets on its rolled-up totals and both ancestors' on
/// theirs (what a descendant's call costs over `four_budgets`).
fn three_levels(c: &mut Criterion) {
    let case = Case::post(&four_budgets(), None);
    let snapshot = Arc::clone(case.run.snapshot());
    let rolled = Totals { tokens: 20_000, cost_micros: 40_000, steps: 10, duration_ms: 9_000 };
    let ancestors = [
        Ancestor {
            run_id: RunId::new("run-root").expect("valid run id"),
            snapshot: Arc::clone(&snapshot),
            rolled_up: rolled,
        },
        Ancestor { run_id: RunId::new("run-parent").expect("valid run id"), snapshot, rolled_up: rolled },
    ];
    let family = Family { descendants: Totals { tokens: 1_000, ..Totals::default() }, ancestors: &ancestors };
    let step = || {
        let mut rates = TenantRates::default();
        black_box(&case.run)
            .step_in_family(
                black_box(&case.call),
                &case.limits,
                &mut rates,
                black_box(&family),
                &runguard_engine::PeriodTotals::default(),
                black_box(case.now),
            )
            .expect("the benched call is in order")
    };
    let outcome = step();
    assert_eq!(outcome.decision.action, Action::Allow, "{:?}", outcome.decision.violations);
    c.bench_function("run_tree/three_levels_post", |b| b.iter(step));
}

fn config() -> Criterion {
    Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1)).sample_size(50)
}

criterion_group! {
    name = benches;
    config = config();
    targets = baseline, engine, scaling, compile_snapshot, breakdown, tenant_rates, host_step, repeat, three_levels
}
criterion_main!(benches);
