//! Custom rules in CEL: compilation with a static check and cost bound, and evaluation against a run and
//! a step.
//!
//! CEL is not Turing-complete, but comprehensions (`all`, `exists`, `map`, `filter`) iterate over inputs
//! and can nest, and string functions scan texts of up to the step text limit. [`crate::cel_check`]
//! refuses unknown names, functions and fields, non-literal regexes and non-boolean results, and bounds the
//! work of one evaluation at the configured input limits; an expression over `max_cel_cost` is rejected
//! when the policy is validated, so evaluation never runs unbounded.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use cel::common::ast::{EntryExpr, Expr};
use cel::common::traits::Indexer;
use cel::common::types::{CelInt, CelList, CelMap, CelMapKey, CelString};
use cel::common::value::CowVal;
use cel::{Context, Env, IdedExpr, Program, Value};
use runguard_contract::PolicyLimits;
use runguard_contract::{StepCall, Timestamp, Totals, ValidationError};

use crate::cel_check::{self, TextSizes};

/// A compiled CEL rule with its environment (the standard library, built once: building it costs more
/// than evaluating most rules).
pub(crate) struct CelRule {
    program: Program,
    env: Arc<Env>,
}

impl std::fmt::Debug for CelRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CelRule").finish_non_exhaustive()
    }
}

/// Most nested brackets (`(`, `[`, `{`, outside string literals) an expression may have.
pub(crate) const MAX_CEL_NESTING: usize = 32;
/// Deepest parsed expression tree accepted (evaluation recurses once per level).
pub(crate) const MAX_CEL_DEPTH: usize = 48;
/// Stack of the thread that parses an expression: room for [`MAX_CEL_NESTING`] levels of the parser.
const PARSE_STACK_BYTES: usize = 64 * 1024 * 1024;

/// The deepest bracket nesting of `source`, skipping string literals (quotes and escapes).
fn bracket_nesting(source: &str) -> usize {
    let (mut depth, mut deepest, mut quote, mut escaped) = (0usize, 0usize, None::<char>, false);
    for c in source.chars() {
        match quote {
            Some(_) if escaped => escaped = false,
            Some(_) if c == '\\' => escaped = true,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None => match c {
                '"' | '\'' => quote = Some(c),
                '(' | '[' | '{' => {
                    depth += 1;
                    deepest = deepest.max(depth);
                }
                ')' | ']' | '}' => depth = depth.saturating_sub(1),
                _ => {}
            },
        }
    }
    deepest
}

/// The depth of a parsed expression tree (a leaf is 1), without recursion.
fn tree_depth(root: &IdedExpr) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(root, 1usize)];
    while let Some((expr, depth)) = stack.pop() {
        deepest = deepest.max(depth);
        let next = depth + 1;
        match &expr.expr {
            Expr::Unspecified | Expr::Ident(_) | Expr::Literal(_) => {}
            Expr::Call(call) => {
                stack.extend(call.target.as_deref().map(|t| (t, next)));
                stack.extend(call.args.iter().map(|a| (a, next)));
            }
            Expr::Comprehension(c) => {
                for part in [&c.iter_range, &c.accu_init, &c.loop_cond, &c.loop_step, &c.result] {
                    stack.push((part, next));
                }
            }
            Expr::List(list) => stack.extend(list.elements.iter().map(|e| (e, next))),
            Expr::Map(map) => {
                for entry in &map.entries {
                    push_entry(&mut stack, &entry.expr, next);
                }
            }
            Expr::Struct(st) => {
                for entry in &st.entries {
                    push_entry(&mut stack, &entry.expr, next);
                }
            }
            Expr::Select(select) => stack.push((&select.operand, next)),
        }
    }
    deepest
}

fn push_entry<'a>(stack: &mut Vec<(&'a IdedExpr, usize)>, entry: &'a EntryExpr, depth: usize) {
    match entry {
        EntryExpr::StructField(field) => stack.push((&field.value, depth)),
        EntryExpr::MapEntry(entry) => {
            stack.push((&entry.key, depth));
            stack.push((&entry.value, depth));
        }
    }
}

impl CelRule {
    /// Compiles `source`, rejecting syntax errors, what [`crate::cel_check`] refuses, and expressions whose
    /// cost at the input limits of `limits` exceeds its `max_cel_cost`.
    #[cfg(test)]
    pub(crate) fn compile(source: &str, limits: &PolicyLimits) -> Result<Self, ValidationError> {
        Self::compile_in(source, limits, Arc::new(Env::stdlib()))
    }

    /// Like [`CelRule::compile`], in an environment shared with the other rules of a snapshot (so that
    /// one evaluation context serves them all).
    pub(crate) fn compile_in(source: &str, limits: &PolicyLimits, env: Arc<Env>) -> Result<Self, ValidationError> {
        let rule = Self::parse(source, env)?;
        let checked = cel_check::check(rule.program.expression(), sizes(limits), limits.max_pattern_len)?;
        if checked.cost > limits.max_cel_cost {
            return Err(ValidationError::new(
                "rule.cel",
                format!(
                    "has a cost of {} at the input size limits, the limit is {}; scan fewer or shorter texts, or \
                     un-nest comprehensions",
                    checked.cost, limits.max_cel_cost
                ),
            ));
        }
        Ok(rule)
    }

    /// The cost [`crate::cel_check`] computes for `source` at `limits`, if it is accepted at all (for
    /// measurements and tests).
    pub(crate) fn cost(source: &str, limits: &PolicyLimits) -> Result<u64, ValidationError> {
        let rule = Self::parse(source, Arc::new(Env::stdlib()))?;
        cel_check::check(rule.program.expression(), sizes(limits), limits.max_pattern_len).map(|checked| checked.cost)
    }

    /// Parses `source` within the nesting limits, without the static check.
    fn parse(source: &str, env: Arc<Env>) -> Result<Self, ValidationError> {
        // The CEL parser and interpreter recurse once per nesting level; deep input overflowed the stack
        // of the thread that compiled (a node's HTTP worker) or evaluated it, aborting the process.
        // Brackets are bounded before parsing, the parse runs on a thread with a stack sized for that
        // bound, and the parsed tree's depth is bounded so that evaluation stays shallow on any thread.
        let nesting = bracket_nesting(source);
        if nesting > MAX_CEL_NESTING {
            return Err(ValidationError::new(
                "rule.cel",
                format!("nests brackets {nesting} deep, the limit is {MAX_CEL_NESTING}"),
            ));
        }
        let parsed = std::thread::scope(|scope| {
            std::thread::Builder::new()
                .stack_size(PARSE_STACK_BYTES)
                .spawn_scoped(scope, || {
                    let program = env.compile(source).map_err(|err| {
                        ValidationError::new("rule.cel", format!("does not compile: {}", first_line(&err.to_string())))
                    })?;
                    let depth = tree_depth(program.expression());
                    Ok((program, depth))
                })
                .map_err(|_| ValidationError::new("rule.cel", "cannot be compiled now (no thread); retry"))?
                .join()
                .map_err(|_| ValidationError::new("rule.cel", "does not compile"))?
        });
        let (program, depth) = parsed?;
        if depth > MAX_CEL_DEPTH {
            return Err(ValidationError::new(
                "rule.cel",
                format!(
                    "nests {depth} levels deep, the limit is {MAX_CEL_DEPTH}; split long chains into several rules"
                ),
            ));
        }
        Ok(Self { program, env })
    }

    /// Evaluates the rule. `Ok(true)` means violated. Any runtime error, and any non-boolean result, is an
    /// evaluation error (the policy's `on_error` then decides).
    pub(crate) fn evaluate(&self, input: &CelInput<'_>) -> Result<bool, String> {
        self.evaluate_in(&self.context(input))
    }

    /// The variables of `input`, converted for this rule's environment. Converting costs more than
    /// evaluating most rules, so convert once per call and evaluate every rule of the same environment
    /// against them. The values borrow the input's strings (a step's texts may be kilobytes).
    pub(crate) fn context<'a>(&self, input: &CelInput<'a>) -> CelContext<'a> {
        CelContext {
            run: input.run_value(),
            step: input.step.map(step_value),
            now: Box::new(CelInt::from(input.now.unix_millis())),
        }
    }

    /// Whether this rule was compiled in `env` (and so can be evaluated in its contexts).
    pub(crate) fn shares_env(&self, other: &CelRule) -> bool {
        Arc::ptr_eq(&self.env, &other.env)
    }

    /// Evaluates the rule against variables converted by a rule of the same environment.
    pub(crate) fn evaluate_in(&self, variables: &CelContext<'_>) -> Result<bool, String> {
        let mut context = Context::with_env(Arc::clone(&self.env));
        context.set_variable_resolver(variables);
        match self.program.execute(&context) {
            Ok(Value::Bool(violated)) => Ok(violated),
            Ok(other) => Err(format!("the expression returned {:?}, not a bool", other.type_of())),
            Err(err) => Err(describe(&err)),
        }
    }
}

/// Describes a runtime error without the values involved: those may be step texts, which must never
/// reach a decision.
fn describe(err: &cel::ExecutionError) -> String {
    use cel::ExecutionError as E;
    match err {
        E::NoSuchKey(key) => format!("no such key `{key}`"),
        E::UndeclaredReference(name) => format!("undeclared reference `{name}`"),
        E::InvalidArgumentCount { expected, actual } => format!("expected {expected} arguments, got {actual}"),
        E::UnexpectedType { got, want } => format!("unexpected type `{got}`, wanted `{want}`"),
        E::NoSuchOverload(overload) => format!("no overload of `{}` for these argument types", overload.function()),
        E::FunctionError { function, .. } => format!("function `{function}` failed"),
        other => {
            let debug = format!("{other:?}");
            let variant = debug.split(['(', '{', ' ']).next().unwrap_or("error").to_owned();
            format!("runtime error `{variant}`")
        }
    }
}

/// The input sizes a rule's cost is computed for.
fn sizes(limits: &PolicyLimits) -> TextSizes {
    let inputs = &limits.cel_inputs;
    TextSizes {
        text: u64::try_from(inputs.max_text_len).unwrap_or(u64::MAX),
        field: u64::try_from(inputs.max_field_len).unwrap_or(u64::MAX),
        list: u64::try_from(inputs.max_input_keys).unwrap_or(u64::MAX),
    }
}

fn first_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default();
    line.chars().take(300).collect()
}

/// What a CEL rule sees.
#[derive(Debug)]
pub(crate) struct CelInput<'a> {
    /// The run's id.
    pub(crate) run_id: &'a str,
    /// The run's tenant.
    pub(crate) tenant: &'a str,
    /// The run's labels.
    pub(crate) labels: &'a BTreeMap<String, String>,
    /// Totals as the rule should see them (after this step's usage at `post`).
    pub(crate) totals: Totals,
    /// The step, absent at run start and run end.
    pub(crate) step: Option<&'a StepCall>,
    /// The evaluation time (CEL `int` milliseconds since the epoch).
    pub(crate) now: Timestamp,
}

/// The variables a CEL rule sees (`run`, `step`, `now`), converted once per call.
pub(crate) struct CelContext<'a> {
    run: Val<'a>,
    step: Option<Val<'a>>,
    now: Val<'a>,
}

impl std::fmt::Debug for CelContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CelContext").finish_non_exhaustive()
    }
}

/// cel resolves a qualified name such as `step.usage.tokens` by looking up `step.usage.tokens`, then
/// `step.usage`, then `step` (as variables, and the whole name as a type too) and selecting the fields
/// left on the value found. Answering the whole name at once selects the same value through the maps
/// and skips the failed lookups; any name it does not find whole (a missing field, a field of something
/// other than a map) is left to cel, which resolves and reports it as it would anyway.
impl cel::context::VariableResolver for CelContext<'_> {
    fn resolve<'b>(&'b self, name: &str) -> Option<CowVal<'b, 'b>> {
        let mut path = name.split('.');
        let mut value: &'b (dyn cel::common::value::Val + 'b) = match path.next()? {
            "run" => self.run.as_ref(),
            "step" => self.step.as_deref()?,
            "now" => self.now.as_ref(),
            _ => return None,
        };
        for field in path {
            let map = value.downcast_ref::<CelMap>()?;
            match map.get(&CelString::from(field)).ok()? {
                CowVal::Borrowed(found) => value = found,
                CowVal::Owned(_) => return None,
            }
        }
        Some(CowVal::Borrowed(value))
    }
}

/// A CEL value that may borrow strings for `'a`.
type Val<'a> = Box<dyn cel::common::value::Val + 'a>;

// The values are the types cel itself converts `Value`s into (maps, lists, strings and ints), built
// directly: going through `Value` copied every string twice and rebuilt every map.
fn int<'a>(n: u64) -> Val<'a> {
    Box::new(CelInt::from(i64::try_from(n).unwrap_or(i64::MAX)))
}

fn string(s: &str) -> Val<'_> {
    Box::new(CelString::from(s))
}

fn map<'a>(entries: Vec<(&'static str, Val<'a>)>) -> Val<'a> {
    let map: HashMap<CelMapKey<'a>, Val<'a>> = entries.into_iter().map(|(k, v)| (CelMapKey::from(k), v)).collect();
    Box::new(CelMap::from(map))
}

impl<'a> CelInput<'a> {
    fn run_value(&self) -> Val<'a> {
        let labels: HashMap<CelMapKey<'a>, Val<'a>> =
            self.labels.iter().map(|(k, v)| (CelMapKey::from(k.as_str()), string(v))).collect();
        map(vec![
            ("id", string(self.run_id)),
            ("tenant", string(self.tenant)),
            ("labels", Box::new(CelMap::from(labels))),
            ("tokens", int(self.totals.tokens)),
            ("cost_micros", int(self.totals.cost_micros)),
            ("steps", int(self.totals.steps)),
            ("duration_ms", int(self.totals.duration_ms)),
        ])
    }
}

/// The `step` map: absent optional fields are absent keys, so reading one is an error unless guarded
/// with `has()`.
fn step_value(step: &StepCall) -> Val<'_> {
    let mut entries = vec![
        ("index", int(step.index)),
        ("phase", string(step.phase.as_str())),
        (
            "input_keys",
            Box::new(CelList::from(step.input_keys.iter().map(|k| string(k)).collect::<Vec<_>>())) as Val<'_>,
        ),
    ];
    if let Some(skill) = &step.skill {
        entries.push(("skill", string(skill)));
    }
    if let Some(endpoint) = &step.api_endpoint {
        entries.push(("api_endpoint", string(endpoint)));
    }
    if let Some(text) = &step.input_text {
        entries.push(("input_text", string(text)));
    }
    if let Some(text) = &step.output_text {
        entries.push(("output_text", string(text)));
    }
    if let Some(estimate) = &step.estimate {
        let mut fields = Vec::new();
        if let Some(tokens) = estimate.tokens {
            fields.push(("tokens", int(tokens)));
        }
        if let Some(cost) = estimate.cost_micros {
            fields.push(("cost_micros", int(cost)));
        }
        entries.push(("estimate", map(fields)));
    }
    if let Some(usage) = &step.usage {
        entries.push((
            "usage",
            map(vec![
                ("tokens", int(usage.tokens)),
                ("cost_micros", int(usage.cost_micros)),
                ("duration_ms", int(usage.duration_ms)),
            ]),
        ));
    }
    if let Some(error) = &step.error {
        let mut fields = Vec::new();
        if let Some(t) = &error.error_type {
            fields.push(("type", string(t)));
        }
        if let Some(code) = &error.code {
            fields.push(("code", string(code)));
        }
        if let Some(status) = error.status {
            fields.push(("status", int(u64::from(status))));
        }
        if let Some(message) = &error.message {
            fields.push(("message", string(message)));
        }
        entries.push(("error", map(fields)));
    }
    map(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use runguard_contract::{Phase, Usage};

    fn limits(max_cel_cost: u64) -> PolicyLimits {
        PolicyLimits { max_cel_cost, ..PolicyLimits::default() }
    }

    fn input<'a>(labels: &'a BTreeMap<String, String>, step: Option<&'a StepCall>) -> CelInput<'a> {
        CelInput {
            run_id: "r1",
            tenant: "acme",
            labels,
            totals: Totals { tokens: 600, ..Totals::default() },
            step,
            now: Timestamp::from_unix_millis(5),
        }
    }

    #[test]
    fn numbers_are_ints_and_fields_are_visible() {
        let labels = BTreeMap::from([("team".to_owned(), "red".to_owned())]);
        let step = StepCall {
            skill: Some("fetch".into()),
            usage: Some(Usage { tokens: 150, ..Usage::default() }),
            ..StepCall::new(3, Phase::Post)
        };
        let rule =
            CelRule::compile("run.tokens > 500 && step.usage.tokens > 100 && run.labels.team == 'red'", &limits(1000))
                .unwrap();
        assert_eq!(rule.evaluate(&input(&labels, Some(&step))), Ok(true));
        let rule = CelRule::compile("step.index == 3 && now == 5 && step.skill == 'fetch'", &limits(1000)).unwrap();
        assert_eq!(rule.evaluate(&input(&labels, Some(&step))), Ok(true));
    }

    /// The resolver answering whole names must give every expression the result (value or error) it gets
    /// with the same values bound as plain variables.
    #[test]
    fn resolved_names_evaluate_as_bound_variables() {
        let labels = BTreeMap::from([("team".to_owned(), "red".to_owned())]);
        let step = StepCall {
            skill: Some("fetch".into()),
            input_keys: vec!["query".into()],
            usage: Some(Usage { tokens: 150, ..Usage::default() }),
            output_text: Some("some output".into()),
            ..StepCall::new(3, Phase::Post)
        };
        let expressions = [
            "now",
            "run",
            "step.usage.tokens",
            "step.usage.missing",
            "step.missing.tokens",
            "has(step.usage.tokens)",
            "has(step.error)",
            "step.error.status",
            "step.index.x",
            "step.input_keys.x",
            "step.output_text.size",
            "run.labels.team",
            "run.labels.nope",
            "'team' in run.labels",
            "step['usage'].tokens",
            "step == step",
            "size(step)",
            ".step.index",
            "[{'x': 2}].all(step, step.x == 2)",
            "[{'usage': {'tokens': 1}}].exists(step, step.usage.tokens == 1)",
            "step.input_keys.exists(k, k == 'query') && step.skill == 'fetch'",
        ];
        // Without a step (run start and end), `step` is not declared at all.
        for input in [input(&labels, Some(&step)), input(&labels, None)] {
            for source in expressions {
                // Many of these are refused by the static check; the resolver must still agree on them.
                let rule = CelRule::parse(source, Arc::new(Env::stdlib())).unwrap();
                let mut bound = Context::with_env(Arc::clone(&rule.env));
                bound.add_variable_as_val("run", input.run_value());
                if let Some(step) = input.step {
                    bound.add_variable_as_val("step", step_value(step));
                }
                bound.add_variable_as_val("now", Box::new(CelInt::from(input.now.unix_millis())));
                let variables = rule.context(&input);
                let mut resolved = Context::with_env(Arc::clone(&rule.env));
                resolved.set_variable_resolver(&variables);
                assert_eq!(rule.program.execute(&resolved), rule.program.execute(&bound), "{source}");
            }
        }
    }

    #[test]
    fn absent_fields_are_errors_unless_guarded() {
        let labels = BTreeMap::new();
        let step = StepCall::new(0, Phase::Pre);
        let rule = CelRule::compile("step.skill == 'x'", &limits(1000)).unwrap();
        assert!(rule.evaluate(&input(&labels, Some(&step))).is_err());
        let rule = CelRule::compile("has(step.skill) && step.skill == 'x'", &limits(1000)).unwrap();
        assert_eq!(rule.evaluate(&input(&labels, Some(&step))), Ok(false));
    }

    #[test]
    fn runtime_errors_never_quote_values() {
        let labels = BTreeMap::new();
        let step = StepCall { output_text: Some("TOP-SECRET-VALUE".into()), ..StepCall::new(0, Phase::Post) };
        let rule = CelRule::compile("step.output_text - 1 > 0", &limits(1000)).unwrap();
        let err = rule.evaluate(&input(&labels, Some(&step))).unwrap_err();
        assert!(!err.contains("TOP-SECRET"), "{err}");
    }

    #[test]
    fn non_boolean_results_are_refused_or_errors() {
        let err = CelRule::compile("run.tokens + 1", &limits(1000)).unwrap_err();
        assert_eq!(err.field(), "rule.cel");
        assert!(err.message().contains("not `bool`"), "{err}");
        // A result that cannot be seen before evaluation is an evaluation error.
        let labels = BTreeMap::new();
        let rule = CelRule::compile("[1, 'a'][0]", &limits(1000)).unwrap();
        let step = StepCall::new(0, Phase::Pre);
        assert!(rule.evaluate(&input(&labels, Some(&step))).is_err());
    }

    #[test]
    fn syntax_errors_and_costly_expressions_are_rejected() {
        assert_eq!(CelRule::compile("run.tokens >", &limits(1000)).unwrap_err().field(), "rule.cel");
        let nested = "step.input_keys.all(a, step.input_keys.all(b, step.input_keys.all(c, a + b + c != '')))";
        let err = CelRule::compile(nested, &limits(100_000)).unwrap_err();
        assert!(err.message().contains("cost"), "{err}");
        assert!(CelRule::compile("step.input_keys.all(k, k != 'password')", &limits(100_000)).is_ok());
    }

    /// Unknown names, fields and functions, and non-boolean results, are refused when the
    /// policy is validated instead of failing (and blocking) every call.
    #[test]
    fn typos_are_refused_at_validation() {
        for (source, says) in [
            ("nosuchfn(run.tokens)", "`nosuchfn`"),
            ("rn.tokens > 5", "`rn`"),
            ("foo.bar > 1", "`foo`"),
            ("run.tokns > 5", "`run.tokns`"),
            ("has(step.usage.tokenz)", "`step.usage.tokenz`"),
            ("step.output_text.lowerAscii() == 'x'", "`lowerAscii`"),
            ("run.tokens + 1", "not `bool`"),
            ("'text'", "not `bool`"),
            ("step.input_keys.map(k, k)", "not `bool`"),
            ("run.tokens.contains('x')", "takes strings"),
            ("run.steps.all(x, x > 0)", "not a list"),
            ("type(run) == map", "`type`"),
        ] {
            let err = CelRule::compile(source, &limits(100_000)).unwrap_err();
            assert_eq!(err.field(), "rule.cel", "{source}");
            assert!(err.message().contains(says), "{source}: {err}");
        }
        for source in [
            "run.tokens > 5 && step.index >= 1",
            "has(step.skill) && step.skill.startsWith('shell')",
            "run.labels.team == 'red' || 'env' in run.labels",
            "step.input_keys.exists(k, k == 'password')",
            "[1, 2].all(run, run > 0)",
            "has(step.error) && step.error.status >= 500",
            "has(step.output_text) && step.output_text.matches('(?i)secret')",
            "size(step.input_keys) > 3 && now > 0",
            "run.tokens > 1 ? run.steps > 2 : false",
            "int(run.labels.limit) < run.tokens",
        ] {
            assert!(CelRule::compile(source, &limits(100_000)).is_ok(), "{source}");
        }
    }

    /// A regex computed at evaluation could be anything (the rule matched a 128 KiB
    /// output against itself for over a minute); patterns are literals that compile within limits.
    #[test]
    fn regexes_are_literal_and_bounded() {
        for (source, says) in [
            ("has(step.output_text) && step.output_text.matches(step.output_text)", "not a string literal"),
            ("run.id.matches(run.tenant)", "not a string literal"),
            ("run.id.matches('a' + 'b')", "not a string literal"),
            ("matches(run.id, run.tenant)", "not a string literal"),
            ("run.id.matches('(unclosed')", "not a usable regex"),
            ("run.id.matches('\\\\w{1000}')", "not a usable regex"),
        ] {
            let err = CelRule::compile(source, &limits(100_000)).unwrap_err();
            assert_eq!(err.field(), "rule.cel", "{source}");
            assert!(err.message().contains(says), "{source}: {err}");
        }
        assert!(CelRule::compile("matches(run.id, '^r[0-9]+$')", &limits(100_000)).is_ok());
    }

    /// The cost follows the text sizes at the configured limits: a scan of the output text costs its
    /// length, so raising the step text limit raises the cost of the same rule.
    #[test]
    fn the_cost_accounts_for_text_sizes() {
        let source = "has(step.output_text) && step.output_text.contains('secret')";
        let default = CelRule::cost(source, &limits(100_000)).unwrap();
        let mut larger = limits(100_000);
        larger.cel_inputs.max_text_len *= 4;
        let cost = CelRule::cost(source, &larger).unwrap();
        assert!(cost > 3 * default, "{default} -> {cost}");
        let short = CelRule::cost("has(step.skill) && step.skill.contains('secret')", &limits(100_000)).unwrap();
        assert!(short * 10 < default, "{short} vs {default}");
        // A field read by index, or a value known only at evaluation, is charged as the longest text.
        let indexed =
            CelRule::cost("has(step.output_text) && step['output_text'].contains('secret')", &limits(100_000));
        assert!(indexed.unwrap().abs_diff(default) <= 2, "the same scan, one node more or less");
        let unknown = CelRule::cost("step[run.labels.field].contains('secret')", &limits(100_000)).unwrap();
        assert!(unknown * 10 > default * 9, "{unknown} vs {default}");
        assert!(CelRule::compile("step['outptu_text'] == ''", &limits(100_000)).is_err());
        // Scanning the output in a comprehension multiplies by the list bound.
        let looped = "step.input_keys.exists(k, has(step.output_text) && step.output_text.contains(k))";
        assert!(CelRule::compile(looped, &limits(100_000)).unwrap_err().message().contains("cost"));
    }

    /// Regression: deep nesting overflowed the stack of the compiling thread (found by the black-box
    /// security test), and long operator chains overflowed it at evaluation; both abort a process.
    #[test]
    fn deep_expressions_are_refused_not_stack_overflows() {
        let labels = BTreeMap::new();
        let deep = format!("{}true{}", "(".repeat(2000), ")".repeat(2000));
        assert!(CelRule::compile(&deep, &limits(100_000)).unwrap_err().message().contains("brackets"));
        let at_limit = format!("{}run.steps == 0{}", "(".repeat(MAX_CEL_NESTING), ")".repeat(MAX_CEL_NESTING));
        assert_eq!(CelRule::compile(&at_limit, &limits(100_000)).unwrap().evaluate(&input(&labels, None)), Ok(true));
        let chain = vec!["run.steps"; 300].join(" + ") + " > 0";
        assert!(CelRule::compile(&chain, &limits(100_000)).unwrap_err().message().contains("levels deep"));
        let short = vec!["run.steps"; 40].join(" + ") + " >= 0";
        assert_eq!(CelRule::compile(&short, &limits(100_000)).unwrap().evaluate(&input(&labels, None)), Ok(true));
        // Brackets inside string literals do not count.
        let quoted = format!("'{}' != ''", "(".repeat(100));
        assert!(CelRule::compile(&quoted, &limits(100_000)).is_ok());
    }
}
