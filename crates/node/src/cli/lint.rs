//! `policy lint`: every problem of every document in the files given (not only the first), ids that two
//! documents share, and standard input as `-`. `policy apply` checks its files with the same code.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use runguard_contract::{PolicyDocument, PolicyLimits, ValidationError};
use serde_json::Value;

use super::{ReadError, read_documents};

/// Most problems reported for one document: past a handful, the rest are usually the same mistake.
const MAX_PROBLEMS: usize = 20;

/// A document that passed every check, with where it came from.
#[derive(Debug)]
pub(super) struct Checked {
    /// `file` or `file[i]` for the i-th document of a list.
    pub at: String,
    /// The document, with every default filled in.
    pub document: PolicyDocument,
}

/// What checking a set of files found.
#[derive(Debug, Default)]
pub(super) struct Checks {
    /// The documents without a problem.
    pub documents: Vec<Checked>,
    /// Problems found (each printed as it was found).
    pub problems: usize,
    /// Whether some file could not be read at all (a usage error).
    pub unreadable: bool,
}

/// The files named: a directory stands for its `.json` and `.toml` files (not its subdirectories), in
/// name order; `-` is standard input.
pub(super) fn expand(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    for path in paths {
        if !path.is_dir() {
            files.push(path.clone());
            continue;
        }
        let entries =
            std::fs::read_dir(path).map_err(|e| format!("{}: cannot read the directory: {e}", path.display()))?;
        let mut found = BTreeSet::new();
        for entry in entries {
            let entry = entry.map_err(|e| format!("{}: cannot read the directory: {e}", path.display()))?;
            let file = entry.path();
            let policy_file = file
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e.eq_ignore_ascii_case("json") || e.eq_ignore_ascii_case("toml"));
            if policy_file && file.is_file() {
                found.insert(file);
            }
        }
        files.extend(found);
    }
    Ok(files)
}

/// How a file is named in messages.
pub(super) fn label(path: &Path) -> String {
    if path == Path::new("-") { "(standard input)".to_owned() } else { path.display().to_string() }
}

/// Checks every document of every file, calling `report` with each problem (`at: problem`, `true`) and
/// each file that is fine (`false`). Documents that share an id are a problem of the later one, naming
/// the first.
pub(super) fn check(files: &[PathBuf], limits: &PolicyLimits, report: &mut dyn FnMut(String, bool)) -> Checks {
    let mut checks = Checks::default();
    let mut ids: HashMap<String, String> = HashMap::new();
    for file in files {
        let name = label(file);
        let documents = match read_documents(file) {
            Ok(documents) => documents,
            Err(ReadError::Unreadable(why)) => {
                report(format!("{name}: {why}"), true);
                checks.unreadable = true;
                continue;
            }
            Err(ReadError::Invalid(why)) => {
                report(format!("{name}: {why}"), true);
                checks.problems += 1;
                continue;
            }
        };
        let count = documents.len();
        let mut file_problems = 0;
        for (i, value) in documents.into_iter().enumerate() {
            let at = if count > 1 { format!("{name}[{i}]") } else { name.clone() };
            let id = value.get("id").and_then(Value::as_str).map(str::to_owned);
            let problems = problems(&value, limits);
            for problem in &problems {
                report(format!("{at}: {problem}"), true);
            }
            file_problems += problems.len();
            if let Some(id) = id {
                if let Some(first) = ids.get(&id) {
                    report(format!("{at}: `id` `{id}` is already the id of the policy in {first}"), true);
                    file_problems += 1;
                    continue;
                }
                ids.insert(id, at.clone());
            }
            if problems.is_empty()
                && let Ok(document) = PolicyDocument::from_value(value, limits)
            {
                checks.documents.push(Checked { at, document });
            }
        }
        checks.problems += file_problems;
        if file_problems == 0 {
            report(format!("{name}: ok ({count} polic{})", if count == 1 { "y" } else { "ies" }), false);
        }
    }
    checks
}

/// Validates one document completely (structure, regexes, CEL).
pub fn lint_document(value: Value, limits: &PolicyLimits) -> Result<(), ValidationError> {
    let doc = PolicyDocument::from_value(value, limits)?;
    runguard_engine::validate_document(&doc, limits)
}

/// Every problem of one document. Validation stops at the first problem, so each problem found is set
/// aside — a list element is dropped, a field removed, or, when the document needs the field, given a
/// harmless value of its type — and the document checked again, until it passes or nothing more can be
/// set aside. A problem caused by setting one aside is not reported.
pub fn problems(value: &Value, limits: &PolicyLimits) -> Vec<ValidationError> {
    let mut value = value.clone();
    let mut found: Vec<ValidationError> = Vec::new();
    let mut removed: HashMap<String, Value> = HashMap::new();
    let mut stand_ins: BTreeSet<String> = BTreeSet::new();
    // The original positions of the list elements dropped so far, by list.
    let mut dropped: HashMap<String, Vec<usize>> = HashMap::new();
    while found.len() < MAX_PROBLEMS {
        let Err(err) = lint_document(value.clone(), limits) else { break };
        let field = err.field().to_owned();
        if stand_ins.contains(&field) {
            break;
        }
        if let Some(original) = removed.remove(&field) {
            // The document needs the field: give it a value that its own checks accept.
            let Some(stand_in) = stand_in(&original) else { break };
            if !set(&mut value, &field, stand_in) {
                break;
            }
            stand_ins.insert(field);
            continue;
        }
        found.push(ValidationError::new(original_path(&field, &dropped), err.message()));
        match take(&mut value, &field) {
            // A list left empty would be reported as missing: a problem of setting it aside, not the file's.
            Some(Taken::Element { left: 0 }) => break,
            Some(Taken::Element { .. }) => {
                if let Some((list, index)) = field.rsplit_once('[').and_then(|(list, rest)| {
                    rest.strip_suffix(']').and_then(|i| i.parse::<usize>().ok()).map(|i| (list.to_owned(), i))
                }) {
                    let gone = dropped.entry(list).or_default();
                    let original = original_index(index, gone);
                    gone.push(original);
                    gone.sort_unstable();
                }
            }
            Some(Taken::Field(original)) => {
                removed.insert(field, original);
            }
            None => break,
        }
    }
    found
}

/// The position in the file of the `index`-th element left after dropping those at `gone` (sorted).
fn original_index(index: usize, gone: &[usize]) -> usize {
    let mut original = index;
    for dropped in gone {
        if *dropped <= original {
            original += 1;
        }
    }
    original
}

/// `path` with the index into a list that lost elements put back to the element's place in the file.
fn original_path(path: &str, dropped: &HashMap<String, Vec<usize>>) -> String {
    for (list, gone) in dropped {
        let Some(rest) = path.strip_prefix(list.as_str()).and_then(|rest| rest.strip_prefix('[')) else { continue };
        let Some((index, after)) = rest.split_once(']') else { continue };
        if let Ok(index) = index.parse::<usize>() {
            return format!("{list}[{}]{after}", original_index(index, gone));
        }
    }
    path.to_owned()
}

/// A value of the same type as `original` that no range check refuses.
fn stand_in(original: &Value) -> Option<Value> {
    match original {
        Value::Number(_) => Some(Value::from(1)),
        Value::Bool(_) => Some(Value::Bool(false)),
        Value::Array(_) => Some(Value::Array(Vec::new())),
        Value::String(_) => Some(Value::from("x")),
        _ => None,
    }
}

enum Taken {
    /// A list element was dropped; `left` remain.
    Element { left: usize },
    /// A field was removed; its value.
    Field(Value),
}

/// One step of a JSON path such as `rule.patterns[0]`.
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

fn steps(path: &str) -> Option<Vec<Step<'_>>> {
    let mut steps = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = part.split_once('[').map_or((part, ""), |(key, rest)| (key, rest));
        if !key.is_empty() {
            steps.push(Step::Key(key));
        }
        while !rest.is_empty() {
            let (index, after) = rest.split_once(']')?;
            steps.push(Step::Index(index.parse().ok()?));
            rest = after.strip_prefix('[').unwrap_or(after);
        }
    }
    (!steps.is_empty()).then_some(steps)
}

/// The container holding the last step of `path`, and that step.
fn parent<'v, 'p>(value: &'v mut Value, path: &'p str) -> Option<(&'v mut Value, Step<'p>)> {
    let mut steps = steps(path)?;
    let last = steps.pop()?;
    let mut at = value;
    for step in steps {
        at = match step {
            Step::Key(key) => at.get_mut(key)?,
            Step::Index(i) => at.get_mut(i)?,
        };
    }
    Some((at, last))
}

fn take(value: &mut Value, path: &str) -> Option<Taken> {
    match parent(value, path)? {
        (Value::Array(items), Step::Index(i)) if i < items.len() => {
            items.remove(i);
            Some(Taken::Element { left: items.len() })
        }
        (Value::Object(fields), Step::Key(key)) => fields.remove(key).map(Taken::Field),
        _ => None,
    }
}

fn set(value: &mut Value, path: &str, new: Value) -> bool {
    match parent(value, path) {
        Some((Value::Object(fields), Step::Key(key))) => {
            fields.insert(key.to_owned(), new);
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fields(value: &Value) -> Vec<String> {
        problems(value, &PolicyLimits::default()).iter().map(|p| p.field().to_owned()).collect()
    }

    #[test]
    fn every_problem_of_a_document_is_reported() {
        let doc = json!({ "name": "n", "bogus": 1, "precedence": -1,
            "rule": { "kind": "content", "target": "output", "patterns": ["(", "ok", "[a", "b"] } });
        assert_eq!(fields(&doc), ["bogus", "precedence", "rule.patterns[0]", "rule.patterns[2]"]);
        assert_eq!(original_index(1, &[0, 2]), 3);
        // A required field with a bad value is reported once, not again as missing.
        let doc = json!({ "name": "n", "rule": { "kind": "rate", "metric": "steps", "max": 0, "window_s": 0 } });
        let found = fields(&doc);
        assert!(found.contains(&"rule.window_s".to_owned()), "{found:?}");
        assert_eq!(found.iter().filter(|f| f.as_str() == "rule.window_s").count(), 1, "{found:?}");
        assert!(
            fields(&json!({ "name": "n", "rule": { "kind": "budget", "metric": "tokens", "per": "run", "max": 5 } }))
                .is_empty()
        );
        assert_eq!(fields(&json!({ "name": "n" })), ["rule"]);
    }

    #[test]
    fn paths_are_followed_into_lists() {
        let mut doc = json!({ "rule": { "patterns": ["a", "b"] } });
        assert!(matches!(take(&mut doc, "rule.patterns[1]"), Some(Taken::Element { left: 1 })));
        assert_eq!(doc, json!({ "rule": { "patterns": ["a"] } }));
        assert!(take(&mut doc, "rule.patterns[5]").is_none());
        assert!(take(&mut doc, "").is_none());
    }
}
