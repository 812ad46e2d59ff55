//! Policy documents (`docs/policies.md`): the seven rule kinds, modes, actions and binding points.

use serde::{Deserialize, Serialize};

use crate::error::ValidationError;
use crate::ids::{PatternId, PolicyId, SignatureHash, TenantId};
use crate::limits::PolicyLimits;
use crate::timestamp::Timestamp;

/// Whether a policy belongs to one tenant or applies to all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// The caller's tenant.
    #[default]
    Tenant,
    /// Every tenant (admins only).
    Global,
}

/// The lifecycle mode of a policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Enforced: its violations decide.
    #[default]
    Active,
    /// Evaluated, reported in `shadow`, never decides.
    Shadow,
    /// Awaiting confirmations; not in snapshots.
    Pending,
    /// Off; not in snapshots.
    Disabled,
}

impl Mode {
    /// Whether policies in this mode are captured by new snapshots.
    pub const fn in_snapshots(self) -> bool {
        matches!(self, Mode::Active | Mode::Shadow)
    }

    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Mode::Active => "active",
            Mode::Shadow => "shadow",
            Mode::Pending => "pending",
            Mode::Disabled => "disabled",
        }
    }
}

/// What a violated policy asks for. Rate rules throttle instead of blocking.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum PolicyAction {
    /// Stop the run (rate rules: throttle the call).
    #[default]
    Block,
    /// Let the call through with a warning.
    Warn,
}

/// What happens when a policy cannot be evaluated (`docs/evaluation.md`). Defaults to `block`: fail closed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// An `evaluation_error` violation with action block.
    #[default]
    Block,
    /// An `evaluation_error` violation with action warn.
    Warn,
    /// Skip the policy, counted as a fail-open.
    Allow,
}

/// The point in a run at which a policy is evaluated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum BindAt {
    /// When the run is created.
    RunStart,
    /// At a step's `pre` call (admission).
    StepPre,
    /// At a step's `post` call (report).
    StepPost,
    /// When the run ends.
    RunEnd,
}

impl BindAt {
    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            BindAt::RunStart => "run_start",
            BindAt::StepPre => "step_pre",
            BindAt::StepPost => "step_post",
            BindAt::RunEnd => "run_end",
        }
    }
}

/// A policy document as a caller creates or updates it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    /// Optional on create; generated (`pol_…`) when absent.
    #[serde(default)]
    pub id: Option<PolicyId>,
    /// A human name, shown in decisions.
    #[cfg_attr(feature = "schema", schemars(length(min = 1, max = 256), regex(pattern = r"\S")))]
    pub name: String,
    /// Tenant (default) or global.
    #[serde(default)]
    pub scope: Scope,
    /// Lifecycle mode; default active.
    #[serde(default)]
    pub mode: Mode,
    /// Block (default) or warn.
    #[serde(default)]
    pub action: PolicyAction,
    /// Lower wins among equal actions; default 100.
    #[serde(default = "default_precedence")]
    pub precedence: u32,
    /// Failure mode; default block.
    #[serde(default)]
    pub on_error: OnError,
    /// Binding point; absent means the rule kind's default.
    #[serde(default)]
    pub bind_at: Option<BindAt>,
    /// What the policy checks.
    pub rule: Rule,
}

/// The default precedence of a policy.
pub const DEFAULT_PRECEDENCE: u32 = 100;

fn default_precedence() -> u32 {
    DEFAULT_PRECEDENCE
}

/// A rule, tagged by `kind` on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Rule {
    /// Token, cost, step or duration budget.
    Budget(BudgetRule),
    /// Sliding-window rate limit.
    Rate(RateRule),
    /// Detectors, regexes and keywords over step texts.
    Content(ContentRule),
    /// Skill allow or deny list.
    Skill(SkillRule),
    /// A learned failure pattern.
    Pattern(PatternRule),
    /// A CEL expression, true when violated.
    Expr(ExprRule),
    /// Loop detection: the same call or error repeated within a window of steps.
    Repeat(RepeatRule),
}

impl Rule {
    /// The wire name of the rule kind.
    pub const fn kind(&self) -> &'static str {
        match self {
            Rule::Budget(_) => "budget",
            Rule::Rate(_) => "rate",
            Rule::Content(_) => "content",
            Rule::Skill(_) => "skill",
            Rule::Pattern(_) => "pattern",
            Rule::Expr(_) => "expr",
            Rule::Repeat(_) => "repeat",
        }
    }

    /// The binding points allowed for this rule kind.
    pub fn allowed_bindings(&self) -> &'static [BindAt] {
        match self {
            Rule::Budget(_) => &[BindAt::StepPre, BindAt::StepPost, BindAt::RunEnd],
            Rule::Rate(_) => &[BindAt::StepPre],
            Rule::Content(_) | Rule::Skill(_) | Rule::Pattern(_) => &[BindAt::StepPre, BindAt::StepPost],
            Rule::Expr(_) => &[BindAt::RunStart, BindAt::StepPre, BindAt::StepPost, BindAt::RunEnd],
            Rule::Repeat(r) => r.of.bindings(),
        }
    }

    /// The binding points used when the document names none (`docs/evaluation.md`, binding points).
    ///
    /// A budget binds at `step_post`, and also at `step_pre` where it only acts on calls that carry an
    /// estimate (or, for the `steps` metric, on the step about to be admitted). Content with target `both`
    /// binds at both phases, checking the input text at `pre` and the output (and any input) text at `post`.
    pub fn default_bindings(&self) -> &'static [BindAt] {
        match self {
            Rule::Budget(_) => &[BindAt::StepPre, BindAt::StepPost],
            Rule::Rate(_) | Rule::Skill(_) | Rule::Pattern(_) => &[BindAt::StepPre],
            Rule::Content(c) => match c.target {
                ContentTarget::Output => &[BindAt::StepPost],
                ContentTarget::Input => &[BindAt::StepPre],
                ContentTarget::Both => &[BindAt::StepPre, BindAt::StepPost],
            },
            Rule::Expr(_) => &[BindAt::StepPost],
            Rule::Repeat(r) => r.of.bindings(),
        }
    }
}

/// What a budget counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum BudgetMetric {
    /// Tokens reported in `usage.tokens`.
    Tokens,
    /// Micro-USD reported in `usage.cost_micros`.
    CostMicros,
    /// Steps whose `post` was accepted.
    Steps,
    /// Milliseconds reported in `usage.duration_ms`.
    DurationMs,
}

impl BudgetMetric {
    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            BudgetMetric::Tokens => "tokens",
            BudgetMetric::CostMicros => "cost_micros",
            BudgetMetric::Steps => "steps",
            BudgetMetric::DurationMs => "duration_ms",
        }
    }
}

/// Whether a budget caps the run's total, each step, or the tenant's total over a calendar period.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum BudgetPer {
    /// The run's running total.
    Run,
    /// Each step on its own.
    Step,
    /// The sum over every counting run of the tenant within the current `period` (UTC calendar).
    Tenant,
}

/// The UTC calendar period of a tenant budget (`per: "tenant"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum BudgetPeriod {
    /// A UTC calendar day, from midnight.
    Day,
    /// A UTC calendar month, from midnight of its first day.
    Month,
}

impl BudgetPeriod {
    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            BudgetPeriod::Day => "day",
            BudgetPeriod::Month => "month",
        }
    }
}

/// A budget rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct BudgetRule {
    /// What is counted.
    pub metric: BudgetMetric,
    /// Per run, per step or per tenant and period.
    pub per: BudgetPer,
    /// Inclusive maximum; 0 allows nothing.
    pub max: u64,
    /// Warn tiers in percent of `max` (1–99; per-run and per-tenant budgets only).
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(inner(range(min = 1, max = 99))))]
    pub warn_at: Vec<u32>,
    /// The calendar period of a `per: "tenant"` budget (required there, refused elsewhere). Absent from
    /// the canonical form when unset, so that the hashes of existing snapshots do not change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<BudgetPeriod>,
    /// Of a `per: "tenant"` budget: only runs whose labels contain every one of these pairs count.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

impl BudgetRule {
    /// Whether a run with `labels` counts toward this budget: every pair of the rule's `labels` is among
    /// the run's (a rule without labels counts every run).
    pub fn counts_labels(&self, labels: &std::collections::BTreeMap<String, String>) -> bool {
        self.labels.iter().all(|(key, value)| labels.get(key) == Some(value))
    }
}

/// What a rate rule counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum RateMetric {
    /// Steps admitted.
    Steps,
    /// Tokens reported.
    Tokens,
    /// Micro-USD reported.
    CostMicros,
}

impl RateMetric {
    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            RateMetric::Steps => "steps",
            RateMetric::Tokens => "tokens",
            RateMetric::CostMicros => "cost_micros",
        }
    }
}

/// Whether a rate window is kept per run or per tenant on this node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum RateScope {
    /// One window per run.
    #[default]
    Run,
    /// One window shared by all the tenant's runs on this node.
    Tenant,
}

/// A sliding-window rate rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RateRule {
    /// What is counted.
    pub metric: RateMetric,
    /// Inclusive maximum within the window.
    pub max: u64,
    /// Window length, 1–86400 seconds.
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = 86_400)))]
    pub window_s: u32,
    /// Run (default) or tenant.
    #[serde(default)]
    pub scope: RateScope,
}

/// Which text a content rule reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum ContentTarget {
    /// `output_text` (default).
    #[default]
    Output,
    /// `input_text`.
    Input,
    /// Both texts.
    Both,
}

/// A built-in detector of sensitive content.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Detector {
    /// E-mail addresses.
    Email,
    /// US social security numbers.
    Ssn,
    /// Payment card numbers that pass the Luhn check.
    CreditCard,
    /// Phone numbers.
    Phone,
    /// IPv4 and IPv6 addresses.
    IpAddress,
    /// API keys and secrets of well-known shapes.
    ApiKey,
}

impl Detector {
    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Detector::Email => "email",
            Detector::Ssn => "ssn",
            Detector::CreditCard => "credit_card",
            Detector::Phone => "phone",
            Detector::IpAddress => "ip_address",
            Detector::ApiKey => "api_key",
        }
    }
}

/// A content rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(extend("anyOf" = [
    {"required": ["detectors"], "properties": {"detectors": {"minItems": 1}}},
    {"required": ["patterns"], "properties": {"patterns": {"minItems": 1}}},
    {"required": ["keywords"], "properties": {"keywords": {"minItems": 1}}},
])))]
#[serde(deny_unknown_fields)]
pub struct ContentRule {
    /// Which text to read.
    #[serde(default)]
    pub target: ContentTarget,
    /// Built-in detectors.
    #[serde(default)]
    pub detectors: Vec<Detector>,
    /// Regular expressions (Rust `regex` syntax, linear time).
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(inner(length(min = 1, max = 1024))))]
    pub patterns: Vec<String>,
    /// Literal keywords.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(inner(length(min = 1, max = 256))))]
    pub keywords: Vec<String>,
    /// Match patterns and keywords without regard to case.
    #[serde(default)]
    pub case_insensitive: bool,
}

/// A skill rule: exactly one of `allow` or `deny`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(extend("oneOf" = [
    {"required": ["allow"], "properties": {"allow": {"type": "array", "minItems": 1}}},
    {"required": ["deny"], "properties": {"deny": {"type": "array", "minItems": 1}}},
])))]
#[serde(deny_unknown_fields)]
pub struct SkillRule {
    /// Only these skills may run.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(inner(length(min = 1, max = 256))))]
    pub allow: Option<Vec<String>>,
    /// These skills may not run.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(inner(length(min = 1, max = 256))))]
    pub deny: Option<Vec<String>>,
}

/// A pattern rule, created by proposing a learned pattern.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct PatternRule {
    /// The pattern this policy prevents.
    pub pattern_id: PatternId,
    /// The request signature hash it matches.
    pub signature_hash: SignatureHash,
    /// When set, the normalised endpoint must equal it too.
    #[serde(default)]
    pub api_endpoint: Option<String>,
}

/// A custom rule in CEL.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ExprRule {
    /// A CEL expression that is true when the rule is violated.
    #[cfg_attr(feature = "schema", schemars(length(min = 1, max = 4096)))]
    pub cel: String,
}

/// What a repeat rule compares between steps (`docs/policies.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum RepeatOf {
    /// The call key: normalised skill and endpoint, input keys, input text hash; checked at `pre`.
    Call,
    /// The error key: normalised skill, error type and code; checked at a `post` with an error.
    Error,
}

impl RepeatOf {
    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            RepeatOf::Call => "call",
            RepeatOf::Error => "error",
        }
    }

    /// The one binding point where this key is known: a call's at `pre`, an error's at `post`.
    pub const fn bindings(self) -> &'static [BindAt] {
        match self {
            RepeatOf::Call => &[BindAt::StepPre],
            RepeatOf::Error => &[BindAt::StepPost],
        }
    }
}

/// The widest window a repeat rule may have, in steps: it bounds what a run keeps.
pub const MAX_REPEAT_WINDOW_STEPS: u32 = 1000;

/// A repeat rule (loop detection).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RepeatRule {
    /// Which key is compared.
    pub of: RepeatOf,
    /// How many equal keys the window may hold (this step included); at least 1.
    #[cfg_attr(feature = "schema", schemars(range(min = 1)))]
    pub max: u64,
    /// How many earlier steps the window covers, 1–1000.
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = 1000)))]
    pub window_steps: u32,
}

/// A stored policy version: the document plus identity, version and times.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Unique within its tenant, or among global policies.
    pub id: PolicyId,
    /// The owning tenant; `None` for a global policy.
    pub tenant_id: Option<TenantId>,
    /// 1 on create, n+1 on each update.
    pub version: u32,
    /// Human name.
    pub name: String,
    /// Tenant or global.
    pub scope: Scope,
    /// Lifecycle mode.
    pub mode: Mode,
    /// Block or warn.
    pub action: PolicyAction,
    /// Lower wins among equal actions.
    pub precedence: u32,
    /// Failure mode.
    pub on_error: OnError,
    /// Binding point as written; `None` means the kind's default.
    pub bind_at: Option<BindAt>,
    /// What it checks.
    pub rule: Rule,
    /// When version 1 was created.
    pub created_at: Timestamp,
    /// When this version was made.
    pub updated_at: Timestamp,
    /// The latest change to `active`, if any.
    pub activated_at: Option<Timestamp>,
}

impl Policy {
    /// Version 1 of a policy created from `doc` at `now`.
    ///
    /// `id` is the document's id or the one generated for it; a policy created active has `activated_at`.
    pub fn create(doc: PolicyDocument, id: PolicyId, tenant_id: Option<TenantId>, now: Timestamp) -> Self {
        let activated_at = (doc.mode == Mode::Active).then_some(now);
        Self {
            id,
            tenant_id,
            version: 1,
            name: doc.name,
            scope: doc.scope,
            mode: doc.mode,
            action: doc.action,
            precedence: doc.precedence,
            on_error: doc.on_error,
            bind_at: doc.bind_at,
            rule: doc.rule,
            created_at: now,
            updated_at: now,
            activated_at,
        }
    }

    /// The next version after an update with `doc` at `now`. The id, tenant and scope do not change;
    /// `activated_at` moves only when the update turns the policy active.
    pub fn updated(&self, doc: PolicyDocument, now: Timestamp) -> Self {
        let activated_at =
            if doc.mode == Mode::Active && self.mode != Mode::Active { Some(now) } else { self.activated_at };
        Self {
            id: self.id.clone(),
            tenant_id: self.tenant_id.clone(),
            version: self.version.saturating_add(1),
            name: doc.name,
            scope: self.scope,
            mode: doc.mode,
            action: doc.action,
            precedence: doc.precedence,
            on_error: doc.on_error,
            bind_at: doc.bind_at,
            rule: doc.rule,
            created_at: self.created_at,
            updated_at: now,
            activated_at,
        }
    }

    /// The next version with only the mode changed.
    pub fn with_mode(&self, mode: Mode, now: Timestamp) -> Self {
        let mut next = self.clone();
        next.version = self.version.saturating_add(1);
        next.mode = mode;
        next.updated_at = now;
        if mode == Mode::Active && self.mode != Mode::Active {
            next.activated_at = Some(now);
        }
        next
    }

    /// The binding points in force: the document's, or the kind's default.
    pub fn bindings(&self) -> &[BindAt] {
        match &self.bind_at {
            Some(bind) => std::slice::from_ref(bind),
            None => self.rule.default_bindings(),
        }
    }

    /// The document this version was made from (for updates and simulation).
    pub fn document(&self) -> PolicyDocument {
        PolicyDocument {
            id: Some(self.id.clone()),
            name: self.name.clone(),
            scope: self.scope,
            mode: self.mode,
            action: self.action,
            precedence: self.precedence,
            on_error: self.on_error,
            bind_at: self.bind_at,
            rule: self.rule.clone(),
        }
    }
}

impl PolicyDocument {
    /// Parses and structurally validates a policy document from JSON.
    ///
    /// Expression compilation and regex compilation are checked by the engine, which owns those
    /// languages; call `runguard_engine::validate_document` for the full check.
    pub fn from_json(bytes: &[u8], limits: &PolicyLimits) -> Result<Self, ValidationError> {
        let value: serde_json::Value = crate::error::from_json_slice(bytes)?;
        Self::from_value(value, limits)
    }

    /// Like [`PolicyDocument::from_json`], from an already parsed JSON value.
    pub fn from_value(value: serde_json::Value, limits: &PolicyLimits) -> Result<Self, ValidationError> {
        let rule = value.get("rule").cloned();
        // The `kind` tag makes serde read the rule as any value, where a list of the fields in order
        // would pass for an object; an array never stands in for an object (`docs/evaluation.md`).
        if rule.as_ref().is_some_and(|rule| !rule.is_object()) {
            return Err(ValidationError::new("rule", "must be an object with a `kind`"));
        }
        let doc: PolicyDocument = crate::error::from_json_value(value).map_err(|err| {
            // The `kind` tag makes serde buffer the rule, which loses the path inside it; re-parse the
            // rule against its variant to name the exact field.
            match (err.field().starts_with("rule"), rule) {
                (true, Some(rule)) => Rule::explain(rule).unwrap_or(err),
                _ => err,
            }
        })?;
        doc.validate(limits)?;
        Ok(doc)
    }

    /// Checks every structural rule of a policy document (`docs/policies.md`), naming the field at fault.
    pub fn validate(&self, limits: &PolicyLimits) -> Result<(), ValidationError> {
        let name = self.name.trim();
        if name.is_empty() {
            return Err(ValidationError::new("name", "must not be empty"));
        }
        if self.name.len() > limits.max_name_len {
            return Err(ValidationError::new(
                "name",
                format!("is {} bytes long, the limit is {}", self.name.len(), limits.max_name_len),
            ));
        }
        if let Some(bind) = self.bind_at
            && !self.rule.allowed_bindings().contains(&bind)
        {
            let allowed: Vec<&str> = self.rule.allowed_bindings().iter().map(|b| b.as_str()).collect();
            return Err(ValidationError::new(
                "bind_at",
                format!(
                    "`{}` is not allowed for a {} rule; use one of {}",
                    bind.as_str(),
                    self.rule.kind(),
                    allowed.join(", ")
                ),
            ));
        }
        if matches!(self.rule, Rule::Pattern(_)) && self.scope == Scope::Global {
            return Err(ValidationError::new("scope", "pattern policies are always tenant-scoped"));
        }
        self.rule.validate(limits).map_err(|e| e.within("rule"))
    }
}

impl Rule {
    /// The precise error for a rule object that failed to parse, with its path under `rule`.
    fn explain(rule: serde_json::Value) -> Option<ValidationError> {
        use crate::error::from_json_value;
        let serde_json::Value::Object(mut fields) = rule else {
            return Some(ValidationError::new("rule", "must be an object with a `kind`"));
        };
        let kind = match fields.remove("kind") {
            Some(serde_json::Value::String(kind)) => kind,
            Some(_) => return Some(ValidationError::new("rule.kind", "must be a string")),
            None => return Some(ValidationError::new("rule.kind", "is missing")),
        };
        let body = serde_json::Value::Object(fields);
        let result = match kind.as_str() {
            "budget" => from_json_value::<BudgetRule>(body).map(drop),
            "rate" => from_json_value::<RateRule>(body).map(drop),
            "content" => from_json_value::<ContentRule>(body).map(drop),
            "skill" => from_json_value::<SkillRule>(body).map(drop),
            "pattern" => from_json_value::<PatternRule>(body).map(drop),
            "expr" => from_json_value::<ExprRule>(body).map(drop),
            "repeat" => from_json_value::<RepeatRule>(body).map(drop),
            other => {
                return Some(ValidationError::new(
                    "rule.kind",
                    format!("`{other}` is not a rule kind; use budget, rate, content, skill, pattern, expr or repeat"),
                ));
            }
        };
        result.err().map(|e| e.within("rule"))
    }

    fn validate(&self, limits: &PolicyLimits) -> Result<(), ValidationError> {
        match self {
            Rule::Budget(rule) => rule.validate(),
            Rule::Rate(rule) => rule.validate(),
            Rule::Content(rule) => rule.validate(limits),
            Rule::Skill(rule) => rule.validate(limits),
            Rule::Pattern(rule) => rule.validate(limits),
            Rule::Expr(rule) => rule.validate(limits),
            Rule::Repeat(rule) => rule.validate(),
        }
    }
}

impl BudgetRule {
    fn validate(&self) -> Result<(), ValidationError> {
        if !self.warn_at.is_empty() && self.per == BudgetPer::Step {
            return Err(ValidationError::new("warn_at", "warn tiers apply to per-run and per-tenant budgets only"));
        }
        self.validate_tenant_period()?;
        let mut seen = Vec::with_capacity(self.warn_at.len());
        for (i, tier) in self.warn_at.iter().enumerate() {
            if !(1..=99).contains(tier) {
                return Err(ValidationError::new(
                    format!("warn_at[{i}]"),
                    format!("is {tier}; tiers are percents 1–99"),
                ));
            }
            if seen.contains(tier) {
                return Err(ValidationError::new(format!("warn_at[{i}]"), format!("repeats the tier {tier}")));
            }
            seen.push(*tier);
        }
        Ok(())
    }
}

/// The most label pairs a tenant budget may filter on.
pub const MAX_BUDGET_LABELS: usize = 16;

impl BudgetRule {
    /// `period` and `labels` belong to `per: "tenant"` budgets, which count tokens, cost or steps only.
    fn validate_tenant_period(&self) -> Result<(), ValidationError> {
        if self.per != BudgetPer::Tenant {
            if self.period.is_some() {
                return Err(ValidationError::new("period", "applies to `per: \"tenant\"` budgets only"));
            }
            if !self.labels.is_empty() {
                return Err(ValidationError::new("labels", "applies to `per: \"tenant\"` budgets only"));
            }
            return Ok(());
        }
        if self.period.is_none() {
            return Err(ValidationError::new("period", "is required with `per: \"tenant\"`; use `day` or `month`"));
        }
        if self.metric == BudgetMetric::DurationMs {
            return Err(ValidationError::new(
                "metric",
                "`duration_ms` cannot be summed per tenant; use tokens, cost_micros or steps",
            ));
        }
        if self.labels.len() > MAX_BUDGET_LABELS {
            return Err(ValidationError::new(
                "labels",
                format!("has {} pairs, the limit is {MAX_BUDGET_LABELS}", self.labels.len()),
            ));
        }
        for (key, value) in &self.labels {
            if key.is_empty() || key.len() > 256 {
                return Err(ValidationError::new("labels", format!("key `{key}` must be 1–256 bytes long")));
            }
            if value.len() > 256 {
                return Err(ValidationError::new(format!("labels.{key}"), "is longer than 256 bytes"));
            }
        }
        Ok(())
    }
}

impl RateRule {
    fn validate(&self) -> Result<(), ValidationError> {
        if !(1..=86_400).contains(&self.window_s) {
            return Err(ValidationError::new("window_s", format!("is {}; windows are 1–86400 seconds", self.window_s)));
        }
        Ok(())
    }
}

impl RepeatRule {
    fn validate(&self) -> Result<(), ValidationError> {
        if self.max == 0 {
            return Err(ValidationError::new("max", "is 0; a repeat rule allows at least one call"));
        }
        if !(1..=MAX_REPEAT_WINDOW_STEPS).contains(&self.window_steps) {
            return Err(ValidationError::new(
                "window_steps",
                format!("is {}; windows are 1–{MAX_REPEAT_WINDOW_STEPS} steps", self.window_steps),
            ));
        }
        Ok(())
    }
}

fn check_list(field: &str, items: &[String], max_items: usize, max_len: usize) -> Result<(), ValidationError> {
    if items.len() > max_items {
        return Err(ValidationError::new(field, format!("has {} entries, the limit is {max_items}", items.len())));
    }
    for (i, item) in items.iter().enumerate() {
        if item.is_empty() {
            return Err(ValidationError::new(format!("{field}[{i}]"), "must not be empty"));
        }
        if item.len() > max_len {
            return Err(ValidationError::new(
                format!("{field}[{i}]"),
                format!("is {} bytes long, the limit is {max_len}", item.len()),
            ));
        }
    }
    Ok(())
}

impl ContentRule {
    fn validate(&self, limits: &PolicyLimits) -> Result<(), ValidationError> {
        if self.detectors.is_empty() && self.patterns.is_empty() && self.keywords.is_empty() {
            return Err(ValidationError::new(
                "detectors",
                "a content rule needs at least one of `detectors`, `patterns` or `keywords`",
            ));
        }
        check_list("patterns", &self.patterns, limits.max_patterns, limits.max_pattern_len)?;
        check_list("keywords", &self.keywords, limits.max_keywords, limits.max_keyword_len)
    }
}

impl SkillRule {
    fn validate(&self, limits: &PolicyLimits) -> Result<(), ValidationError> {
        let (field, list) = match (&self.allow, &self.deny) {
            (Some(allow), None) => ("allow", allow),
            (None, Some(deny)) => ("deny", deny),
            (Some(_), Some(_)) => {
                return Err(ValidationError::new("deny", "give exactly one of `allow` or `deny`, not both"));
            }
            (None, None) => return Err(ValidationError::new("allow", "give exactly one of `allow` or `deny`")),
        };
        if list.is_empty() {
            return Err(ValidationError::new(field, "must not be empty"));
        }
        check_list(field, list, limits.max_skills, limits.max_keyword_len)
    }
}

impl PatternRule {
    fn validate(&self, limits: &PolicyLimits) -> Result<(), ValidationError> {
        if let Some(endpoint) = &self.api_endpoint {
            if endpoint.is_empty() {
                return Err(ValidationError::new("api_endpoint", "must not be empty when given"));
            }
            if endpoint.len() > limits.max_text_len {
                return Err(ValidationError::new("api_endpoint", "is too long"));
            }
        }
        Ok(())
    }
}

impl ExprRule {
    fn validate(&self, limits: &PolicyLimits) -> Result<(), ValidationError> {
        if self.cel.trim().is_empty() {
            return Err(ValidationError::new("cel", "must not be empty"));
        }
        if self.cel.len() > limits.max_cel_len {
            return Err(ValidationError::new(
                "cel",
                format!("is {} bytes long, the limit is {}", self.cel.len(), limits.max_cel_len),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<PolicyDocument, ValidationError> {
        PolicyDocument::from_json(json.as_bytes(), &PolicyLimits::default())
    }

    #[test]
    fn a_budget_document_parses_with_defaults() {
        let doc =
            parse(r#"{"name":"b","rule":{"kind":"budget","metric":"tokens","per":"run","max":10,"warn_at":[80]}}"#)
                .unwrap();
        assert_eq!(doc.mode, Mode::Active);
        assert_eq!(doc.action, PolicyAction::Block);
        assert_eq!(doc.on_error, OnError::Block);
        assert_eq!(doc.precedence, 100);
        assert_eq!(doc.rule.default_bindings(), &[BindAt::StepPre, BindAt::StepPost]);
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_path() {
        let err = parse(r#"{"name":"b","colour":1,"rule":{"kind":"expr","cel":"true"}}"#).unwrap_err();
        assert_eq!(err.field(), "colour");
        assert!(err.message().starts_with("is not a known field (known: `id`, `name`"), "{err}");
        let err = parse(r#"{"name":"b","rule":{"kind":"expr","cel":"true","extra":1}}"#).unwrap_err();
        assert_eq!(err.field(), "rule.extra");
        assert!(err.to_string().starts_with("`rule.extra` is not a known field"), "{err}");
    }

    #[test]
    fn negative_and_fractional_numbers_are_rejected() {
        let err = parse(r#"{"name":"b","rule":{"kind":"budget","metric":"tokens","per":"run","max":-1}}"#).unwrap_err();
        assert_eq!(err.field(), "rule.max");
        let err =
            parse(r#"{"name":"b","rule":{"kind":"budget","metric":"tokens","per":"run","max":1.5}}"#).unwrap_err();
        assert_eq!(err.field(), "rule.max");
        let err = parse(r#"{"name":"b","rule":{"kind":"rate","metric":"steps","max":1,"window_s":5,"scope":"x"}}"#)
            .unwrap_err();
        assert_eq!(err.field(), "rule.scope");
        let err = parse(r#"{"name":"b","precedence":-3,"rule":{"kind":"expr","cel":"x"}}"#).unwrap_err();
        assert_eq!(err.field(), "precedence");
    }

    #[test]
    fn repeated_keys_arrays_and_unsafe_integers_are_refused() {
        let err =
            parse(r#"{"name":"b","mode":"active","mode":"disabled","rule":{"kind":"expr","cel":"true"}}"#).unwrap_err();
        assert_eq!((err.field(), err.message()), ("mode", "is given more than once"));
        let err = parse(r#"{"name":"b","rule":{"kind":"expr","kind":"budget","cel":"true"}}"#).unwrap_err();
        assert_eq!(err.field(), "rule.kind");
        let err = parse(r#"{"name":"b","rule":["budget","tokens","run",5]}"#).unwrap_err();
        assert_eq!(err.field(), "rule");
        let max = r#"{"name":"b","rule":{"kind":"budget","metric":"tokens","per":"run","max":18446744073709551615}}"#;
        let err = parse(max).unwrap_err();
        assert_eq!(err.field(), "rule.max");
        assert!(err.message().contains("2^53"), "{err}");
        let err =
            parse(r#"{"name":"b","rule":{"kind":"budget","metric":"tokens","per":"run","max":9007199254740992}}"#)
                .unwrap_err();
        assert_eq!(err.field(), "rule.max");
        let doc =
            parse(r#"{"name":"b","rule":{"kind":"budget","metric":"tokens","per":"run","max":9007199254740991}}"#)
                .unwrap();
        assert!(matches!(doc.rule, Rule::Budget(BudgetRule { max: crate::MAX_SAFE_INTEGER, .. })));
        let err =
            parse(r#"{"name":"b","rule":{"kind":"budget","metric":"tokens","per":"run","max":2.0}}"#).unwrap_err();
        assert_eq!(err.field(), "rule.max", "a zero fraction does not make an integer");
        // A document converted from TOML (integers up to 2^63) is checked the same way.
        let value =
            serde_json::json!({"name":"b","rule":{"kind":"budget","metric":"tokens","per":"run","max": i64::MAX}});
        assert_eq!(PolicyDocument::from_value(value, &PolicyLimits::default()).unwrap_err().field(), "rule.max");
    }

    #[test]
    fn range_checks_name_the_field() {
        let err = parse(r#"{"name":"b","rule":{"kind":"budget","metric":"tokens","per":"run","max":1,"warn_at":[0]}}"#)
            .unwrap_err();
        assert_eq!(err.field(), "rule.warn_at[0]");
        let err =
            parse(r#"{"name":"b","rule":{"kind":"budget","metric":"tokens","per":"step","max":1,"warn_at":[50]}}"#)
                .unwrap_err();
        assert_eq!(err.field(), "rule.warn_at");
        let err = parse(r#"{"name":"b","rule":{"kind":"rate","metric":"steps","max":1,"window_s":0}}"#).unwrap_err();
        assert_eq!(err.field(), "rule.window_s");
        let err = parse(r#"{"name":"b","rule":{"kind":"skill","allow":[]}}"#).unwrap_err();
        assert_eq!(err.field(), "rule.allow");
        let err = parse(r#"{"name":"b","rule":{"kind":"skill","allow":["a"],"deny":["b"]}}"#).unwrap_err();
        assert_eq!(err.field(), "rule.deny");
        let err = parse(r#"{"name":"b","rule":{"kind":"content"}}"#).unwrap_err();
        assert_eq!(err.field(), "rule.detectors");
        let err = parse(r#"{"name":" ","rule":{"kind":"expr","cel":"true"}}"#).unwrap_err();
        assert_eq!(err.field(), "name");
        let err =
            parse(r#"{"name":"b","bind_at":"run_start","rule":{"kind":"rate","metric":"steps","max":1,"window_s":5}}"#)
                .unwrap_err();
        assert_eq!(err.field(), "bind_at");
    }

    #[test]
    fn unknown_kinds_and_detectors_are_rejected() {
        assert_eq!(parse(r#"{"name":"b","rule":{"kind":"magic"}}"#).unwrap_err().field(), "rule.kind");
        assert_eq!(parse(r#"{"name":"b","rule":{"max":1}}"#).unwrap_err().field(), "rule.kind");
        let err = parse(r#"{"name":"b","rule":{"kind":"content","detectors":["dna"]}}"#).unwrap_err();
        assert_eq!(err.field(), "rule.detectors[0]");
    }

    #[test]
    fn repeat_rules_parse_with_their_binding_and_name_bad_fields() {
        let doc = parse(r#"{"name":"r","rule":{"kind":"repeat","of":"call","max":3,"window_steps":10}}"#).unwrap();
        assert_eq!(doc.rule, Rule::Repeat(RepeatRule { of: RepeatOf::Call, max: 3, window_steps: 10 }));
        assert_eq!(doc.rule.default_bindings(), &[BindAt::StepPre]);
        let doc = parse(r#"{"name":"r","rule":{"kind":"repeat","of":"error","max":1,"window_steps":1000}}"#).unwrap();
        assert_eq!(doc.rule.default_bindings(), &[BindAt::StepPost]);
        let cases = [
            (r#"{"kind":"repeat","of":"call","max":0,"window_steps":5}"#, "rule.max"),
            (r#"{"kind":"repeat","of":"call","max":1,"window_steps":0}"#, "rule.window_steps"),
            (r#"{"kind":"repeat","of":"call","max":1,"window_steps":1001}"#, "rule.window_steps"),
            (r#"{"kind":"repeat","of":"loop","max":1,"window_steps":5}"#, "rule.of"),
            (r#"{"kind":"repeat","of":"call","max":1}"#, "rule.window_steps"),
            (r#"{"kind":"repeat","of":"call","max":1,"window_steps":5,"extra":1}"#, "rule.extra"),
            (r#"{"kind":"repeat","of":"call","max":-1,"window_steps":5}"#, "rule.max"),
        ];
        for (rule, field) in cases {
            let err = parse(&format!(r#"{{"name":"r","rule":{rule}}}"#)).unwrap_err();
            assert_eq!(err.field(), field, "{rule}: {err}");
        }
        for (bind, of) in [("step_post", "call"), ("run_end", "call"), ("step_pre", "error"), ("run_start", "error")] {
            let doc = format!(
                r#"{{"name":"r","bind_at":"{bind}","rule":{{"kind":"repeat","of":"{of}","max":1,"window_steps":5}}}}"#
            );
            let err = parse(&doc).unwrap_err();
            assert_eq!(err.field(), "bind_at", "{doc}");
            assert!(err.message().contains("repeat rule"), "{err}");
        }
    }

    #[test]
    fn tenant_budgets_need_a_period_and_name_their_bad_fields() {
        let doc = parse(
            r#"{"name":"d","rule":{"kind":"budget","metric":"cost_micros","per":"tenant","period":"day","max":5,
                "warn_at":[50],"labels":{"team":"search"}}}"#,
        )
        .unwrap();
        let Rule::Budget(rule) = &doc.rule else { panic!("a budget") };
        assert_eq!((rule.per, rule.period), (BudgetPer::Tenant, Some(BudgetPeriod::Day)));
        assert!(rule.counts_labels(&[("team".into(), "search".into()), ("x".into(), "y".into())].into()));
        assert!(!rule.counts_labels(&[("team".into(), "ads".into())].into()));
        assert!(!rule.counts_labels(&std::collections::BTreeMap::new()));
        let cases = [
            (r#"{"kind":"budget","metric":"tokens","per":"tenant","max":5}"#, "rule.period"),
            (r#"{"kind":"budget","metric":"tokens","per":"tenant","period":"week","max":5}"#, "rule.period"),
            (r#"{"kind":"budget","metric":"tokens","per":"run","period":"day","max":5}"#, "rule.period"),
            (r#"{"kind":"budget","metric":"tokens","per":"run","labels":{"a":"b"},"max":5}"#, "rule.labels"),
            (r#"{"kind":"budget","metric":"duration_ms","per":"tenant","period":"day","max":5}"#, "rule.metric"),
            (
                r#"{"kind":"budget","metric":"tokens","per":"tenant","period":"day","labels":{"a":1},"max":5}"#,
                "rule.labels.a",
            ),
            (
                r#"{"kind":"budget","metric":"tokens","per":"tenant","period":"day","labels":{"":"b"},"max":5}"#,
                "rule.labels",
            ),
        ];
        for (rule, field) in cases {
            let err = parse(&format!(r#"{{"name":"t","rule":{rule}}}"#)).unwrap_err();
            assert_eq!(err.field(), field, "{rule}: {err}");
        }
        // A run budget's canonical form is unchanged by the new optional fields.
        let doc = parse(r#"{"name":"b","rule":{"kind":"budget","metric":"tokens","per":"run","max":10}}"#).unwrap();
        let json = serde_json::to_string(&doc.rule).unwrap();
        assert!(!json.contains("period") && !json.contains("labels"), "{json}");
    }

    #[test]
    fn versions_and_activation_times_follow_mode_changes() {
        let doc = parse(r#"{"name":"b","mode":"shadow","rule":{"kind":"expr","cel":"true"}}"#).unwrap();
        let t0 = Timestamp::from_unix_millis(1_000);
        let p1 = Policy::create(doc, PolicyId::new("p").unwrap(), None, t0);
        assert_eq!(p1.activated_at, None);
        let t1 = Timestamp::from_unix_millis(2_000);
        let p2 = p1.with_mode(Mode::Active, t1);
        assert_eq!((p2.version, p2.activated_at), (2, Some(t1)));
        let p3 = p2.with_mode(Mode::Active, Timestamp::from_unix_millis(3_000));
        assert_eq!(p3.activated_at, Some(t1));
    }
}
