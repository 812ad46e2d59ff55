//! The static check of a CEL rule (`docs/evaluation.md`): what an expression may name, what it returns,
//! and a bound on what it costs to evaluate at the node's size limits.
//!
//! cel parses any identifier and any function name and fails only when it evaluates them, so a typo
//! (`rn.tokens`, `nosuchfn(run.tokens)`) passed validation and then failed every call, blocking every
//! run. The check walks the parsed tree once and refuses, with the field `rule.cel`:
//! - a name other than `run`, `step`, `now` and the variables a macro binds;
//! - a field `run` or `step` (or `step.usage`, `step.estimate`, `step.error`) does not have;
//! - a function or macro not in [`FUNCTIONS`] and [`MACROS`];
//! - `matches` with a pattern that is not a string literal, or a literal that is not a valid regex
//!   within [`REGEX_SIZE_LIMIT`];
//! - an expression whose result can be seen not to be a bool.
//!
//! The cost it computes is an upper bound on the work of one evaluation, in units of roughly one AST node
//! or [`BYTES_PER_UNIT`] bytes of text scanned: every node costs 1; a string operation adds the length it
//! may scan (at the configured limits: the step texts' `max_text_len`, the short fields' `max_field_len`);
//! a regex match scans [`REGEX_FACTOR`] times as expensively and compiles its pattern on every call
//! ([`REGEX_COMPILE`] and more for longer patterns); a
//! comprehension's body counts once per element its range may hold (`list` of [`TextSizes`] for the
//! input lists, the length of a list literal). Nested comprehensions multiply.

use cel::common::ast::{EntryExpr, Expr, IdedExpr, LiteralValue};
use runguard_contract::ValidationError;

/// The functions an expression may call (operators aside), as documented in `docs/evaluation.md`.
pub(crate) const FUNCTIONS: &[&str] =
    &["size", "contains", "startsWith", "endsWith", "matches", "int", "uint", "double", "string"];

/// The macros an expression may use (`has` is a field test, the others comprehensions).
pub(crate) const MACROS: &[&str] = &["has", "all", "exists", "exists_one", "existsOne", "map", "filter"];

/// The operators, by cel's internal names.
const OPERATORS: &[&str] = &[
    "_&&_",
    "_||_",
    "!_",
    "_?_:_",
    "_==_",
    "_!=_",
    "_<_",
    "_<=_",
    "_>_",
    "_>=_",
    "_+_",
    "_-_",
    "_*_",
    "_/_",
    "_%_",
    "-_",
    "_[_]",
    "@in",
    "@not_strictly_false",
];

/// Bytes of text scanned per unit of cost.
pub(crate) const BYTES_PER_UNIT: u64 = 64;
/// How much more a regex match costs per byte than a plain scan (a lazy DFA against `memchr`).
pub(crate) const REGEX_FACTOR: u64 = 8;
/// The largest compiled size of a `matches` pattern. cel compiles the pattern on every call, so its
/// compile time is part of every evaluation.
pub(crate) const REGEX_SIZE_LIMIT: usize = 64 * 1024;
/// What compiling a `matches` pattern costs at least (cel compiles it on every call).
pub(crate) const REGEX_COMPILE: u64 = 256;
/// The longest `matches` pattern, in bytes.
pub(crate) const MAX_REGEX_LEN: usize = 256;

/// The text sizes an expression may meet: the node's step limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TextSizes {
    /// Longest `step.input_text` or `step.output_text`.
    pub(crate) text: u64,
    /// Longest other string (skill, endpoint, input key, error field, run id, label).
    pub(crate) field: u64,
    /// Most elements of an input list or map (input keys, labels): a comprehension's fan-out.
    pub(crate) list: u64,
}

/// What the check learned about an accepted expression.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Checked {
    /// The bound on one evaluation's work (see the module docs).
    pub(crate) cost: u64,
}

/// The static type of a subexpression, as far as it can be seen.
#[derive(Clone, Debug, PartialEq)]
enum Ty {
    Bool,
    Int,
    Uint,
    Double,
    Null,
    Bytes,
    /// A string of at most this many bytes.
    Str(u64),
    /// A list of at most this many elements of a type.
    List(u64, Box<Ty>),
    /// A map with string keys of at most `key` bytes and values of a type.
    Map(u64, Box<Ty>),
    /// One of the input objects.
    Obj(Object),
    /// Unknown until evaluation; if it is a string, at most this many bytes (it may be any input text).
    Dyn(u64),
}

impl Ty {
    fn name(&self) -> &'static str {
        match self {
            Ty::Bool => "bool",
            Ty::Int => "int",
            Ty::Uint => "uint",
            Ty::Double => "double",
            Ty::Null => "null",
            Ty::Bytes => "bytes",
            Ty::Str(_) => "string",
            Ty::List(..) => "list",
            Ty::Map(..) | Ty::Obj(_) => "map",
            Ty::Dyn(_) => "dyn",
        }
    }

    /// The most bytes a string (or the longest element of a list of strings) may hold.
    fn text_len(&self) -> u64 {
        match self {
            Ty::Str(n) | Ty::Dyn(n) => *n,
            Ty::List(_, element) => element.text_len(),
            _ => 0,
        }
    }
}

/// The input objects, whose fields are known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Object {
    Run,
    Step,
    Usage,
    Estimate,
    StepError,
}

impl Object {
    fn name(self) -> &'static str {
        match self {
            Object::Run => "run",
            Object::Step => "step",
            Object::Usage => "step.usage",
            Object::Estimate => "step.estimate",
            Object::StepError => "step.error",
        }
    }

    fn fields(self) -> &'static [&'static str] {
        match self {
            Object::Run => &["id", "tenant", "labels", "tokens", "cost_micros", "steps", "duration_ms"],
            Object::Step => &[
                "index",
                "phase",
                "skill",
                "api_endpoint",
                "input_keys",
                "input_text",
                "output_text",
                "estimate",
                "usage",
                "error",
            ],
            Object::Usage => &["tokens", "cost_micros", "duration_ms"],
            Object::Estimate => &["tokens", "cost_micros"],
            Object::StepError => &["type", "code", "status", "message"],
        }
    }

    fn field(self, name: &str, sizes: TextSizes) -> Option<Ty> {
        if !self.fields().contains(&name) {
            return None;
        }
        Some(match (self, name) {
            (Object::Run, "labels") => Ty::Map(sizes.field, Box::new(Ty::Str(sizes.field))),
            (Object::Run, "id" | "tenant") => Ty::Str(sizes.field),
            (Object::Step, "phase") => Ty::Str(4),
            (Object::Step, "skill" | "api_endpoint") | (Object::StepError, _) if name != "status" => {
                Ty::Str(sizes.field)
            }
            (Object::Step, "input_keys") => Ty::List(sizes.list, Box::new(Ty::Str(sizes.field))),
            (Object::Step, "input_text" | "output_text") => Ty::Str(sizes.text),
            (Object::Step, "estimate") => Ty::Obj(Object::Estimate),
            (Object::Step, "usage") => Ty::Obj(Object::Usage),
            (Object::Step, "error") => Ty::Obj(Object::StepError),
            _ => Ty::Int,
        })
    }
}

fn refuse(message: impl Into<String>) -> ValidationError {
    ValidationError::new("rule.cel", message)
}

/// Text scanned, in cost units.
fn scan(bytes: u64) -> u64 {
    bytes.div_ceil(BYTES_PER_UNIT)
}

struct Checker {
    sizes: TextSizes,
    max_regex_len: usize,
    /// Variables bound by enclosing comprehensions, innermost last.
    scope: Vec<(String, Ty)>,
}

/// Checks a parsed expression; see the module docs.
pub(crate) fn check(expr: &IdedExpr, sizes: TextSizes, max_regex_len: usize) -> Result<Checked, ValidationError> {
    let mut checker = Checker { sizes, max_regex_len: max_regex_len.min(MAX_REGEX_LEN), scope: Vec::new() };
    let (ty, cost) = checker.walk(expr)?;
    if !matches!(ty, Ty::Bool | Ty::Dyn(_)) {
        return Err(refuse(format!(
            "returns `{}`, not `bool`; a rule is an expression that is true when it is violated",
            ty.name()
        )));
    }
    Ok(Checked { cost })
}

impl Checker {
    fn lookup(&self, name: &str) -> Option<Ty> {
        if let Some((_, ty)) = self.scope.iter().rev().find(|(bound, _)| bound == name) {
            return Some(ty.clone());
        }
        match name {
            "run" => Some(Ty::Obj(Object::Run)),
            "step" => Some(Ty::Obj(Object::Step)),
            "now" => Some(Ty::Int),
            _ => None,
        }
    }

    /// A value whose type shows only at evaluation: it may be any input, the longest text included.
    fn unknown(&self) -> Ty {
        Ty::Dyn(self.sizes.text)
    }

    fn field(&self, object: Object, field: &str) -> Result<Ty, ValidationError> {
        object.field(field, self.sizes).ok_or_else(|| {
            refuse(format!(
                "reads `{}.{field}`, which does not exist; `{}` has {}",
                object.name(),
                object.name(),
                object.fields().join(", ")
            ))
        })
    }

    /// The type of `expr` and the cost of evaluating it.
    fn walk(&mut self, expr: &IdedExpr) -> Result<(Ty, u64), ValidationError> {
        match &expr.expr {
            Expr::Unspecified => Err(refuse("is not a complete expression")),
            Expr::Literal(literal) => Ok((literal_type(literal), 1)),
            Expr::Ident(name) => match self.lookup(name) {
                Some(ty) => Ok((ty, 1)),
                None => Err(refuse(format!(
                    "names `{name}`, which is not defined; an expression may use `run`, `step` and `now`"
                ))),
            },
            Expr::Select(select) => {
                let (operand, cost) = self.walk(&select.operand)?;
                let field = select.field.as_str();
                let ty = match &operand {
                    Ty::Obj(object) => self.field(*object, field)?,
                    Ty::Map(_, value) => (**value).clone(),
                    Ty::Dyn(_) => self.unknown(),
                    other => {
                        return Err(refuse(format!(
                            "reads the field `{field}` of a value of type `{}`, which has none",
                            other.name()
                        )));
                    }
                };
                let ty = if select.test { Ty::Bool } else { ty };
                Ok((ty, cost.saturating_add(1)))
            }
            Expr::List(list) => {
                let mut cost = 1u64;
                let mut element = None::<Ty>;
                for item in &list.elements {
                    let (ty, c) = self.walk(item)?;
                    cost = cost.saturating_add(c);
                    element = Some(match element {
                        None => ty,
                        Some(seen) => unify(seen, ty),
                    });
                }
                let len = u64::try_from(list.elements.len()).unwrap_or(u64::MAX);
                Ok((Ty::List(len, Box::new(element.unwrap_or(Ty::Dyn(0)))), cost))
            }
            Expr::Map(map) => {
                let mut cost = 1u64;
                let mut value_ty = None::<Ty>;
                let mut key_len = 0u64;
                for entry in &map.entries {
                    let EntryExpr::MapEntry(entry) = &entry.expr else {
                        return Err(refuse("builds a message, which rules cannot"));
                    };
                    let (key, kc) = self.walk(&entry.key)?;
                    let (value, vc) = self.walk(&entry.value)?;
                    key_len = key_len.max(key.text_len());
                    cost = cost.saturating_add(kc).saturating_add(vc);
                    value_ty = Some(match value_ty {
                        None => value,
                        Some(seen) => unify(seen, value),
                    });
                }
                Ok((Ty::Map(key_len, Box::new(value_ty.unwrap_or(Ty::Dyn(0)))), cost))
            }
            Expr::Struct(_) => Err(refuse("builds a message, which rules cannot")),
            Expr::Comprehension(c) => {
                let (range, range_cost) = self.walk(&c.iter_range)?;
                let (fanout, element, value) = match &range {
                    Ty::List(n, element) => (*n, (**element).clone(), self.unknown()),
                    Ty::Map(key, value) => (self.sizes.list, Ty::Str(*key), (**value).clone()),
                    Ty::Dyn(_) => (self.sizes.list, self.unknown(), self.unknown()),
                    Ty::Obj(_) => (self.sizes.list, Ty::Str(self.sizes.field), self.unknown()),
                    other => {
                        return Err(refuse(format!(
                            "iterates over a value of type `{}`, which is not a list or a map",
                            other.name()
                        )));
                    }
                };
                let (accu, init_cost) = self.walk(&c.accu_init)?;
                let depth = self.scope.len();
                self.scope.push((c.iter_var.clone(), element));
                if let Some(second) = &c.iter_var2 {
                    self.scope.push((second.clone(), value));
                }
                self.scope.push((c.accu_var.clone(), accu));
                let body = self.walk(&c.loop_cond).and_then(|(_, cond)| {
                    let (_, step) = self.walk(&c.loop_step)?;
                    Ok(cond.saturating_add(step))
                });
                self.scope.truncate(depth);
                let body = body?;
                // The result sees only the accumulator.
                let (accu, _) = self.walk(&c.accu_init)?;
                self.scope.push((c.accu_var.clone(), accu));
                let result = self.walk(&c.result);
                self.scope.truncate(depth);
                let (ty, result_cost) = result?;
                let ty = match ty {
                    // `map` and `filter` accumulate a list as long as the range.
                    Ty::List(_, element) => Ty::List(fanout, element),
                    other => other,
                };
                let cost = 1u64
                    .saturating_add(range_cost)
                    .saturating_add(init_cost)
                    .saturating_add(result_cost)
                    .saturating_add(body.saturating_mul(fanout.max(1)));
                Ok((ty, cost))
            }
            Expr::Call(call) => self.call(&call.func_name, call.target.as_deref(), &call.args),
        }
    }

    fn call(
        &mut self,
        function: &str,
        target: Option<&IdedExpr>,
        args: &[IdedExpr],
    ) -> Result<(Ty, u64), ValidationError> {
        if !OPERATORS.contains(&function) && !FUNCTIONS.contains(&function) {
            return Err(refuse(format!(
                "calls `{function}`, which is not a function rules may use; use one of {}, the operators and the macros {}",
                FUNCTIONS.join(", "),
                MACROS.join(", ")
            )));
        }
        let mut cost = 1u64;
        let mut types = Vec::with_capacity(args.len() + 1);
        for operand in target.into_iter().chain(args) {
            let (ty, c) = self.walk(operand)?;
            cost = cost.saturating_add(c);
            types.push(ty);
        }
        let first = types.first().cloned().unwrap_or(Ty::Dyn(0));
        let longest = types.iter().map(Ty::text_len).max().unwrap_or(0);
        let (ty, work) = match function {
            "_&&_" | "_||_" | "!_" | "@not_strictly_false" => (Ty::Bool, 0),
            "_==_" | "_!=_" | "_<_" | "_<=_" | "_>_" | "_>=_" => (Ty::Bool, scan(longest)),
            "@in" => {
                let work = match types.get(1) {
                    Some(Ty::List(n, element)) => n.saturating_mul(scan(element.text_len()).max(1)),
                    // Unknown: it may be the longest list of the longest strings.
                    Some(Ty::Dyn(_)) => {
                        self.sizes.list.saturating_mul(scan(self.sizes.field).max(1)).max(scan(longest))
                    }
                    _ => scan(longest),
                };
                (Ty::Bool, work)
            }
            "_+_" => match (types.first(), types.get(1)) {
                (Some(Ty::Str(a)), Some(Ty::Str(b))) => {
                    let len = a.saturating_add(*b);
                    (Ty::Str(len), scan(len))
                }
                (Some(Ty::List(a, element)), Some(Ty::List(b, _))) => {
                    let len = a.saturating_add(*b);
                    (Ty::List(len, element.clone()), len)
                }
                (Some(a @ (Ty::Int | Ty::Uint | Ty::Double)), _) => (a.clone(), 0),
                // Unknown operands: if they are strings, the result is as long as both.
                (a, b) => {
                    let len = a.map_or(0, Ty::text_len).saturating_add(b.map_or(0, Ty::text_len));
                    (Ty::Dyn(len), scan(len))
                }
            },
            "_-_" | "_*_" | "_/_" | "_%_" | "-_" => {
                let ty = if matches!(first, Ty::Int | Ty::Uint | Ty::Double) { first } else { Ty::Dyn(0) };
                (ty, 0)
            }
            "_?_:_" => {
                let ty = match (types.get(1), types.get(2)) {
                    (Some(a), Some(b)) => unify(a.clone(), b.clone()),
                    _ => self.unknown(),
                };
                (ty, 0)
            }
            "_[_]" => {
                let ty = match (first, args.last()) {
                    (Ty::List(_, element), _) => *element,
                    (Ty::Map(_, value), _) => *value,
                    // `step['usage']` is `step.usage`, and is checked like it.
                    (Ty::Obj(object), Some(IdedExpr { expr: Expr::Literal(LiteralValue::String(key)), .. })) => {
                        self.field(object, key.inner())?
                    }
                    _ => self.unknown(),
                };
                (ty, 0)
            }
            "size" => (Ty::Int, scan(longest)),
            "contains" | "startsWith" | "endsWith" => {
                self.strings(function, &types)?;
                (Ty::Bool, scan(longest))
            }
            "matches" => {
                self.strings(function, &types)?;
                let compile = self.literal_pattern(args.last())?;
                let text = first.text_len();
                (Ty::Bool, scan(text).saturating_mul(REGEX_FACTOR).saturating_add(compile))
            }
            "int" => (Ty::Int, scan(longest)),
            "uint" => (Ty::Uint, scan(longest)),
            "double" => (Ty::Double, scan(longest)),
            "string" => {
                let len = match &first {
                    Ty::Str(n) => *n,
                    Ty::Bytes => self.sizes.field,
                    _ => 32,
                };
                (Ty::Str(len), scan(len))
            }
            _ => (self.unknown(), 0),
        };
        Ok((ty, cost.saturating_add(work)))
    }

    /// String functions take strings: a known non-string argument is refused.
    fn strings(&self, function: &str, types: &[Ty]) -> Result<(), ValidationError> {
        match types.iter().find(|ty| !matches!(ty, Ty::Str(_) | Ty::Dyn(_))) {
            Some(other) => {
                Err(refuse(format!("calls `{function}` with a value of type `{}`; it takes strings", other.name())))
            }
            None => Ok(()),
        }
    }

    /// A `matches` pattern must be a string literal that compiles within the limits: cel compiles it on
    /// every call, so a pattern computed from the input could be anything, at any cost. Returns the cost of
    /// compiling it.
    fn literal_pattern(&self, pattern: Option<&IdedExpr>) -> Result<u64, ValidationError> {
        let Some(IdedExpr { expr: Expr::Literal(LiteralValue::String(pattern)), .. }) = pattern else {
            return Err(refuse(
                "calls `matches` with a pattern that is not a string literal; write the regex in the rule",
            ));
        };
        let pattern = pattern.inner();
        if pattern.len() > self.max_regex_len {
            return Err(refuse(format!(
                "has a `matches` pattern of {} bytes, the limit is {}",
                pattern.len(),
                self.max_regex_len
            )));
        }
        regex::RegexBuilder::new(pattern).size_limit(REGEX_SIZE_LIMIT).build().map_err(|err| {
            let reason = match err {
                regex::Error::CompiledTooBig(_) => "compiles too large".to_owned(),
                other => other.to_string().lines().last().unwrap_or("is not valid").trim().to_owned(),
            };
            refuse(format!("has a `matches` pattern that is not a usable regex: {reason}"))
        })?;
        let len = u64::try_from(pattern.len()).unwrap_or(u64::MAX);
        // Measured: compiling even a short pattern takes as long as some 250 interpreted nodes, and
        // longer patterns take longer.
        Ok(REGEX_COMPILE.saturating_add(scan(len.saturating_mul(64))))
    }
}

fn literal_type(literal: &LiteralValue) -> Ty {
    match literal {
        LiteralValue::Boolean(_) => Ty::Bool,
        LiteralValue::Int(_) => Ty::Int,
        LiteralValue::UInt(_) => Ty::Uint,
        LiteralValue::Double(_) => Ty::Double,
        LiteralValue::Null => Ty::Null,
        LiteralValue::Bytes(_) => Ty::Bytes,
        LiteralValue::String(s) => Ty::Str(u64::try_from(s.inner().len()).unwrap_or(u64::MAX)),
    }
}

/// The type of a value that is one of two types: the larger bound of the same kind, else unknown.
fn unify(a: Ty, b: Ty) -> Ty {
    match (a, b) {
        (Ty::Str(x), Ty::Str(y)) => Ty::Str(x.max(y)),
        (Ty::List(x, e), Ty::List(y, f)) => Ty::List(x.max(y), Box::new(unify(*e, *f))),
        (Ty::Map(x, e), Ty::Map(y, f)) => Ty::Map(x.max(y), Box::new(unify(*e, *f))),
        (a, b) if a == b => a,
        (a, b) => Ty::Dyn(a.text_len().max(b.text_len())),
    }
}
