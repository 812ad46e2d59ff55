//! Compiled snapshots: policies with their regexes and CEL programs built once, shared by `Arc`.

use runguard_contract::{
    BindAt, BudgetRule, Mode, PatternRule, Policy, PolicyDocument, PolicyLimits, RateRule, RateScope, RepeatRule, Rule,
    Snapshot, SnapshotHash, SnapshotId, SnapshotRef, ValidationError,
};

use crate::cel_rule::CelRule;
use crate::content::ContentMatcher;
use crate::error::Error;

/// A compiled rule.
#[derive(Debug)]
pub(crate) enum Matcher {
    /// A budget.
    Budget(BudgetRule),
    /// A rate limit.
    Rate(RateRule),
    /// Content detectors, regexes and keywords.
    Content(Box<ContentMatcher>),
    /// Skill allow (`allow = true`) or deny list, normalised (trimmed, lower-case).
    Skill {
        /// Whether the list allows (else denies).
        allow: bool,
        /// The skills.
        skills: Vec<String>,
    },
    /// A pattern policy.
    Pattern(PatternRule),
    /// A CEL rule.
    Expr(Box<CelRule>),
    /// A repeat rule.
    Repeat(RepeatRule),
}

/// Compiles one rule. Errors name the field under `rule`.
pub(crate) fn compile_rule(rule: &Rule, limits: &PolicyLimits) -> Result<Matcher, ValidationError> {
    compile_rule_in(rule, limits, &std::sync::OnceLock::new())
}

/// Compiles one rule; CEL rules share the environment in `cel_env` (created on first use).
fn compile_rule_in(
    rule: &Rule,
    limits: &PolicyLimits,
    cel_env: &std::sync::OnceLock<std::sync::Arc<cel::Env>>,
) -> Result<Matcher, ValidationError> {
    Ok(match rule {
        Rule::Budget(b) => Matcher::Budget(b.clone()),
        Rule::Rate(r) => Matcher::Rate(r.clone()),
        Rule::Content(c) => Matcher::Content(Box::new(ContentMatcher::compile(c)?)),
        Rule::Skill(s) => {
            let (allow, list) = match (&s.allow, &s.deny) {
                (Some(list), _) => (true, list),
                (None, Some(list)) => (false, list),
                (None, None) => return Err(ValidationError::new("rule.allow", "give one of `allow` or `deny`")),
            };
            Matcher::Skill { allow, skills: list.iter().map(|s| normalize_skill(s)).collect() }
        }
        Rule::Pattern(p) => Matcher::Pattern(p.clone()),
        Rule::Repeat(r) => Matcher::Repeat(r.clone()),
        Rule::Expr(e) => {
            let env = cel_env.get_or_init(|| std::sync::Arc::new(cel::Env::stdlib()));
            Matcher::Expr(Box::new(CelRule::compile_in(&e.cel, limits, std::sync::Arc::clone(env))?))
        }
    })
}

/// Skill names compare trimmed and lower-cased.
pub(crate) fn normalize_skill(skill: &str) -> String {
    skill.trim().to_lowercase()
}

/// Validates a policy document completely: the structural checks of the contract, then the regexes and
/// the CEL expression compile within their limits. Nothing that fails here may be stored.
pub fn validate_document(doc: &PolicyDocument, limits: &PolicyLimits) -> Result<(), ValidationError> {
    doc.validate(limits)?;
    compile_rule(&doc.rule, limits).map(drop)
}

/// The cost bound the static check computes for a CEL rule at `limits` (compared with
/// `limits.max_cel_cost` by [`validate_document`]), or why the rule is refused before any cost applies.
pub fn cel_cost(source: &str, limits: &PolicyLimits) -> Result<u64, ValidationError> {
    CelRule::cost(source, limits)
}

/// A policy of a snapshot with its compiled rule.
#[derive(Debug)]
pub(crate) struct CompiledPolicy {
    /// The pinned policy version.
    pub(crate) policy: Policy,
    /// The compiled rule, or why it could not be compiled (then `on_error` decides at evaluation).
    pub(crate) matcher: Result<Matcher, String>,
    /// For content rules: the index in the snapshot's screen of each part of the matcher.
    pub(crate) screen: Vec<usize>,
}

/// One pass over a text that tells, for every content regex of the snapshot, whether it can match at
/// all; most texts match nothing, so most per-rule scans are skipped.
#[derive(Debug)]
pub(crate) struct ContentScreen {
    /// Every entry, for ASCII texts (and for all texts when no entry has a Unicode word boundary).
    all: EntrySet,
    /// For texts with a non-ASCII byte, when some entries may have a Unicode word boundary. A lazy DFA
    /// cannot decide one past a non-ASCII byte and gives up, and the search falls back to an engine some
    /// two hundred times slower (1.5 ms instead of 7 µs on 4 KiB): a set or alternation holding such an entry
    /// falls back as a whole. So the other entries are searched together, and these one by one, where
    /// most are found (or ruled out) by their literals.
    non_ascii: Option<SplitScreen>,
    entries: usize,
}

/// Screen entries searched together.
#[derive(Debug)]
struct EntrySet {
    set: regex::RegexSet,
    /// All of them as one alternation: answering "anything at all?" is cheaper than the set's
    /// overlapping search, and most texts match nothing.
    any: Option<regex::Regex>,
    /// The screen entry of each regex of the set.
    entries: Vec<usize>,
}

/// The screen for non-ASCII texts: the entries without Unicode word boundaries together, the others alone.
#[derive(Debug)]
struct SplitScreen {
    together: Option<EntrySet>,
    one_by_one: Vec<(usize, regex::Regex)>,
}

/// What the screen found in a text.
#[derive(Debug)]
pub(crate) enum Screened {
    /// Nothing can match.
    Clean,
    /// Whether each entry matches somewhere.
    Matches(Vec<bool>),
}

impl Screened {
    /// Whether entry `i` may match.
    pub(crate) fn may_match(&self, i: usize) -> bool {
        match self {
            Screened::Clean => false,
            Screened::Matches(matches) => matches.get(i).copied().unwrap_or(false),
        }
    }
}

impl EntrySet {
    fn build(sources: &[&str], entries: Vec<usize>) -> Option<Self> {
        let limit = crate::content::REGEX_SIZE_LIMIT.saturating_mul(16);
        let set = regex::RegexSetBuilder::new(sources).size_limit(limit).dfa_size_limit(limit).build().ok()?;
        let alternation: Vec<String> = sources.iter().map(|s| format!("(?:{s})")).collect();
        let any = regex::RegexBuilder::new(&alternation.join("|")).size_limit(limit).dfa_size_limit(limit).build().ok();
        Some(Self { set, any, entries })
    }

    /// Marks the entries that match somewhere in `text`; returns whether any does.
    fn mark(&self, text: &str, hits: &mut [bool]) -> bool {
        if self.any.as_ref().is_some_and(|any| !any.is_match(text)) {
            return false;
        }
        let mut found = false;
        for i in self.set.matches(text).iter() {
            if let Some(hit) = self.entries.get(i).and_then(|entry| hits.get_mut(*entry)) {
                *hit = true;
                found = true;
            }
        }
        found
    }
}

impl ContentScreen {
    /// Which screen entries match somewhere in `text`.
    pub(crate) fn matches(&self, text: &str) -> Screened {
        let mut hits = vec![false; self.entries];
        let found = match &self.non_ascii {
            Some(split) if !text.is_ascii() => {
                let mut found = split.together.as_ref().is_some_and(|set| set.mark(text, &mut hits));
                for (entry, regex) in &split.one_by_one {
                    if let Some(hit) = hits.get_mut(*entry)
                        && regex.is_match(text)
                    {
                        *hit = true;
                        found = true;
                    }
                }
                found
            }
            _ => self.all.mark(text, &mut hits),
        };
        if found { Screened::Matches(hits) } else { Screened::Clean }
    }

    fn build(sources: &[String]) -> Option<Self> {
        let all =
            EntrySet::build(&sources.iter().map(String::as_str).collect::<Vec<_>>(), (0..sources.len()).collect())?;
        let (bounded, others): (Vec<usize>, Vec<usize>) = (0..sources.len())
            .partition(|&entry| sources.get(entry).is_some_and(|s| may_have_unicode_word_boundary(s)));
        // Without the split screen non-ASCII texts use the whole one: slower, same answers.
        let non_ascii = if bounded.is_empty() { None } else { SplitScreen::build(sources, &bounded, others) };
        Some(Self { all, non_ascii, entries: sources.len() })
    }
}

impl SplitScreen {
    fn build(sources: &[String], one_by_one: &[usize], together: Vec<usize>) -> Option<Self> {
        let limit = crate::content::REGEX_SIZE_LIMIT.saturating_mul(16);
        let one_by_one = one_by_one
            .iter()
            .map(|&entry| {
                let regex = regex::RegexBuilder::new(sources.get(entry)?)
                    .size_limit(limit)
                    .dfa_size_limit(limit)
                    .build()
                    .ok()?;
                Some((entry, regex))
            })
            .collect::<Option<Vec<_>>>()?;
        let together = if together.is_empty() {
            None
        } else {
            let together_sources =
                together.iter().map(|&entry| sources.get(entry).map(String::as_str)).collect::<Option<Vec<_>>>()?;
            Some(EntrySet::build(&together_sources, together)?)
        };
        Some(Self { together, one_by_one })
    }
}

/// Whether the regex `source` may hold a Unicode word boundary: `\b`, `\B`, `\<`, `\>` or a `\b{…}` form,
/// other than the ASCII `(?-u:\b)` of the detectors. Errs towards yes (a `\b` under a `(?-u)` flag
/// set earlier counts), which only costs speed.
fn may_have_unicode_word_boundary(source: &str) -> bool {
    let rest = source.replace(r"(?-u:\b)", "");
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        if c == '\\' && matches!(chars.next(), Some('b' | 'B' | '<' | '>')) {
            return true;
        }
    }
    false
}

impl CompiledPolicy {
    /// Whether the policy is evaluated at `bind`.
    pub(crate) fn binds_at(&self, bind: BindAt) -> bool {
        self.policy.bindings().contains(&bind)
    }
}

/// A snapshot ready for evaluation. `Send + Sync`: share it between runs with `Arc`.
#[derive(Debug)]
pub struct CompiledSnapshot {
    reference: SnapshotRef,
    policies: Vec<CompiledPolicy>,
    tampered: bool,
    run_window_ms: i64,
    tenant_window_ms: i64,
    /// The widest repeat window, in steps (0: no repeat rule, and runs keep no keys).
    repeat_window: u64,
    /// Whether a policy is a tenant-period budget (calls then read and change the tenant's totals).
    tenant_periods: bool,
    screen: Option<ContentScreen>,
}

impl CompiledSnapshot {
    /// Compiles a snapshot whose hash is computed here. A policy whose rule no longer compiles is kept and
    /// fails at evaluation under its `on_error` (fail closed by default).
    pub fn compile(snapshot: &Snapshot, limits: &PolicyLimits) -> Result<Self, Error> {
        let reference = snapshot.reference().map_err(Error::Snapshot)?;
        Ok(Self::build(reference, snapshot, limits))
    }

    /// Compiles a snapshot loaded from storage, verifying it against the hash the run is bound to. On a
    /// mismatch the result is [`CompiledSnapshot::tampered`]: every decision blocks with `integrity`.
    pub fn load(snapshot: &Snapshot, expected: &SnapshotHash, limits: &PolicyLimits) -> Self {
        match snapshot.reference() {
            // `reference` hashed the snapshot already; checking the format version completes `verify`.
            Ok(reference)
                if &reference.hash == expected
                    && snapshot.format_version == runguard_contract::snapshot::SNAPSHOT_FORMAT_VERSION =>
            {
                Self::build(reference, snapshot, limits)
            }
            _ => Self::tampered(expected.clone()),
        }
    }

    /// A snapshot that failed verification (or could not be loaded): every decision of a run bound to it
    /// blocks with violation type `integrity`, which no `on_error` can override.
    pub fn tampered(expected: SnapshotHash) -> Self {
        Self {
            reference: SnapshotRef { id: SnapshotId::for_hash(&expected), hash: expected, policy_count: 0 },
            policies: Vec::new(),
            tampered: true,
            run_window_ms: 0,
            tenant_window_ms: 0,
            repeat_window: 0,
            tenant_periods: false,
            screen: None,
        }
    }

    fn build(reference: SnapshotRef, snapshot: &Snapshot, limits: &PolicyLimits) -> Self {
        let mut run_window_ms = 0i64;
        let mut tenant_window_ms = 0i64;
        let mut repeat_window = 0u64;
        let cel_env = std::sync::OnceLock::new();
        let policies: Vec<CompiledPolicy> = snapshot
            .policies
            .iter()
            .filter(|p| matches!(p.mode, Mode::Active | Mode::Shadow))
            .map(|policy| {
                if let Rule::Rate(rate) = &policy.rule {
                    let window = i64::from(rate.window_s).saturating_mul(1000);
                    match rate.scope {
                        RateScope::Run => run_window_ms = run_window_ms.max(window),
                        RateScope::Tenant => tenant_window_ms = tenant_window_ms.max(window),
                    }
                }
                if let Rule::Repeat(repeat) = &policy.rule {
                    repeat_window = repeat_window.max(u64::from(repeat.window_steps));
                }
                CompiledPolicy {
                    policy: policy.clone(),
                    matcher: compile_rule_in(&policy.rule, limits, &cel_env).map_err(|e| e.to_string()),
                    screen: Vec::new(),
                }
            })
            .collect();
        let tenant_periods = policies.iter().any(|p: &CompiledPolicy| {
            matches!(&p.policy.rule, Rule::Budget(rule) if rule.per == runguard_contract::BudgetPer::Tenant && rule.period.is_some())
        });
        let mut snapshot = Self {
            reference,
            policies,
            tampered: false,
            run_window_ms,
            tenant_window_ms,
            repeat_window,
            tenant_periods,
            screen: None,
        };
        snapshot.build_screen();
        snapshot
    }

    /// Builds the content screen: every distinct regex source of every content rule, in one set.
    fn build_screen(&mut self) {
        let mut sources: Vec<String> = Vec::new();
        for compiled in &mut self.policies {
            let Ok(Matcher::Content(matcher)) = &compiled.matcher else { continue };
            compiled.screen = matcher
                .screen_sources()
                .iter()
                .map(|source| match sources.iter().position(|s| s == source) {
                    Some(i) => i,
                    None => {
                        sources.push(source.clone());
                        sources.len() - 1
                    }
                })
                .collect();
        }
        if sources.is_empty() {
            return;
        }
        // Without a screen (too large to build) every rule scans on its own: slower, same answers.
        self.screen = ContentScreen::build(&sources);
    }

    /// The snapshot's content screen, if it has content rules and the screen could be built.
    pub(crate) fn screen(&self) -> Option<&ContentScreen> {
        self.screen.as_ref()
    }

    /// The snapshot's id, hash and policy count.
    pub fn reference(&self) -> &SnapshotRef {
        &self.reference
    }

    /// The snapshot hash every decision carries.
    pub fn hash(&self) -> &SnapshotHash {
        &self.reference.hash
    }

    /// Whether verification failed.
    pub fn is_tampered(&self) -> bool {
        self.tampered
    }

    /// The compiled policies, in snapshot order.
    pub(crate) fn policies(&self) -> &[CompiledPolicy] {
        &self.policies
    }

    /// A policy of the snapshot by id, as pinned (a host stores it beside a prevention record).
    pub fn policy(&self, id: &runguard_contract::PolicyId) -> Option<&Policy> {
        self.compiled_policy(id).map(|p| &p.policy)
    }

    pub(crate) fn compiled_policy(&self, id: &runguard_contract::PolicyId) -> Option<&CompiledPolicy> {
        self.policies.iter().find(|p| &p.policy.id == id)
    }

    /// Whether any policy reads the step's texts with a content or CEL rule, whose cost grows with them:
    /// a host may move the evaluation of calls with large texts off a latency-sensitive thread.
    pub fn scans_texts(&self) -> bool {
        self.policies.iter().any(|p| matches!(p.matcher, Ok(Matcher::Content(_) | Matcher::Expr(_))))
    }

    /// Whether any policy keeps a tenant-wide rate window (the caller must then pass its `TenantRates`).
    pub fn uses_tenant_rates(&self) -> bool {
        self.tenant_window_ms > 0
    }

    pub(crate) fn tenant_periods(&self) -> bool {
        self.tenant_periods
    }

    /// How many earlier steps the widest repeat rule looks at (0 without repeat rules).
    pub(crate) fn repeat_window(&self) -> u64 {
        self.repeat_window
    }

    pub(crate) fn run_window_ms(&self) -> i64 {
        self.run_window_ms
    }

    pub(crate) fn tenant_window_ms(&self) -> i64 {
        self.tenant_window_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unicode_word_boundaries_are_recognised() {
        for source in [r"\bINC-\d+", r"a\B", r"\<word\>", r"\b{start}x", r"(?i)\bpassword"] {
            assert!(may_have_unicode_word_boundary(source), "{source}");
        }
        for source in [r"(?-u:\b)[0-9]{3}(?-u:\b)", r"a\\b", r"[A-Z]{2}\d{2}", r"(?i)(?:secret|token)", r"\x08"] {
            assert!(!may_have_unicode_word_boundary(source), "{source}");
        }
    }

    /// Whichever way the screen searches a text, it reports exactly the entries that match alone.
    #[test]
    fn the_screen_reports_each_entry_as_it_matches_alone() {
        let sources: Vec<String> = [
            r"(?-u:\b)[0-9]{3}-[0-9]{2}-[0-9]{4}(?-u:\b)",
            r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
            r"(?:\bINC-\d{6}\b)",
            r"(?:\b[A-Z]{2}\d{2}[A-Z0-9]{11,30}\b)",
            r"(?i)(?:confidential|caf\u{e9})",
        ]
        .map(str::to_owned)
        .to_vec();
        let screen = ContentScreen::build(&sources).unwrap();
        assert!(screen.non_ascii.is_some(), "two entries have Unicode word boundaries");
        let texts = [
            "nothing here",
            "nothing here \u{2014} either",
            "ticket INC-123456 opened",
            "ticket INC-123456 opened \u{2014} CONFIDENTIAL",
            "\u{e9}INC-123456",
            "DE44500105175407324931 \u{2019} 123-45-6789",
            "mail jane@example.com, Caf\u{c9}",
        ];
        for text in texts {
            let alone: Vec<bool> = sources.iter().map(|s| regex::Regex::new(s).unwrap().is_match(text)).collect();
            let screened: Vec<bool> = (0..sources.len()).map(|i| screen.matches(text).may_match(i)).collect();
            assert_eq!(screened, alone, "{text}");
        }
    }
}
