//! `policy apply`: makes a node's policies match policy files, like `kubectl apply` for runguard.
//!
//! Every file is linted first and nothing is sent unless all pass. Each document must carry its `id`:
//! that is how a file names the policy it stands for. The plan compares each document, defaults filled
//! in, with the policy the node holds: new ids are created, changed ones updated (`PUT` with the
//! version read, so a concurrent change is refused rather than overwritten; a change of `mode` alone goes
//! through `POST …/mode`, audited as `policy apply`), and nothing is ever deleted. A second run with the
//! same files has nothing to do.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use runguard_contract::{PolicyDocument, PolicyLimits};
use serde_json::{Map, Value, json};

use super::{FINDING, USAGE, lint};

/// How long one request to the node may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The fields of a policy that a document sets.
const DOCUMENT_FIELDS: [&str; 9] =
    ["id", "name", "scope", "mode", "action", "precedence", "on_error", "bind_at", "rule"];

#[derive(Debug, Args)]
pub(super) struct ApplyArgs {
    /// Policy files or directories (their `.json` and `.toml` files); `-` reads standard input.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// The node, e.g. `http://127.0.0.1:7070`.
    #[arg(long, env = "RUNGUARD_SERVER")]
    server: String,
    /// An operator's bearer token (an admin's for global policies); not needed in development mode.
    #[arg(long, env = "RUNGUARD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Act for this tenant (admins only; sent as `X-Tenant`).
    #[arg(long)]
    tenant: Option<String>,
    /// Print the plan and change nothing.
    #[arg(long)]
    dry_run: bool,
}

/// Why an apply stopped.
#[derive(Debug)]
enum Stop {
    /// A usage problem: the node cannot be reached or refused the token (exit 2).
    Usage(String),
    /// The node refused a change or answered something unexpected (exit 1).
    Finding(String),
}

/// What to do with one document.
#[derive(Debug)]
enum Step {
    Create,
    Update { version: u32, differences: Vec<String>, mode_only: bool },
    Unchanged { version: u32 },
}

#[derive(Debug)]
struct Planned {
    at: String,
    document: PolicyDocument,
    step: Step,
}

/// The node's HTTP API as `policy apply` uses it.
struct Node {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
    tenant: Option<String>,
}

/// An answer of any status.
struct Answer {
    status: u16,
    body: Value,
}

impl Node {
    fn new(args: &ApplyArgs) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(REQUEST_TIMEOUT))
            .build()
            .into();
        Self {
            agent,
            base: args.server.trim_end_matches('/').to_owned(),
            token: args.token.clone(),
            tenant: args.tenant.clone(),
        }
    }

    fn send(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Answer, Stop> {
        let url = format!("{}{path}", self.base);
        let mut request = ureq::http::Request::builder().method(method).uri(&url);
        if let Some(token) = &self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if let Some(tenant) = &self.tenant {
            request = request.header("x-tenant", tenant);
        }
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        let bytes = body.map(Value::to_string).unwrap_or_default().into_bytes();
        let request = request.body(bytes).map_err(|e| Stop::Usage(format!("`{url}` is not a usable address: {e}")))?;
        let mut response = self
            .agent
            .run(request)
            .map_err(|e| Stop::Usage(format!("cannot reach the node at `{}`: {e}", self.base)))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| Stop::Usage(format!("the node at `{}` broke off its answer: {e}", self.base)))?;
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        let answer = Answer { status, body };
        // An unknown token is a usage error wherever it shows; a role too low for a change (an operator's
        // token and a global policy) is that change refused, reported where it happens.
        if status == 401 || (status == 403 && method == "GET") { Err(token_refused(&answer)) } else { Ok(answer) }
    }
}

fn token_refused(answer: &Answer) -> Stop {
    Stop::Usage(format!(
        "the node refused the token ({}): {}",
        answer.status,
        message(&answer.body).unwrap_or("no reason given")
    ))
}

/// The node's error message, if the body is an error.
fn message(body: &Value) -> Option<&str> {
    body.pointer("/error/message").and_then(Value::as_str)
}

fn refused(what: &str, answer: &Answer) -> Stop {
    Stop::Finding(format!(
        "{what}: the node answered {}: {}",
        answer.status,
        message(&answer.body).unwrap_or("no reason given")
    ))
}

/// The document a stored policy was made from, defaults filled in as in a file's.
fn stored_document(policy: &Value) -> Option<PolicyDocument> {
    let fields: Map<String, Value> = DOCUMENT_FIELDS
        .iter()
        .filter_map(|key| policy.get(*key).filter(|v| !v.is_null()).map(|v| ((*key).to_owned(), v.clone())))
        .collect();
    serde_json::from_value(Value::Object(fields)).ok()
}

/// The differences from `old` to `new`, one line per field (`~ rule.max: 10 → 20`).
fn differences(path: &str, old: &Value, new: &Value, out: &mut Vec<String>) {
    match (old, new) {
        (Value::Object(old), Value::Object(new)) => {
            let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
            for key in keys {
                let at = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                let null = Value::Null;
                differences(&at, old.get(key).unwrap_or(&null), new.get(key).unwrap_or(&null), out);
            }
        }
        _ if old == new => {}
        (Value::Null, new) => out.push(format!("+ {path}: {new}")),
        (old, Value::Null) => out.push(format!("- {path}: {old}")),
        (old, new) => out.push(format!("~ {path}: {old} → {new}")),
    }
}

fn plan(node: &Node, checked: Vec<lint::Checked>) -> Result<Vec<Planned>, Stop> {
    let mut planned = Vec::with_capacity(checked.len());
    for lint::Checked { at, document } in checked {
        let Some(id) = document.id.clone() else {
            return Err(Stop::Finding(format!(
                "{at}: has no `id`; `policy apply` needs one to know which policy it is"
            )));
        };
        let answer = node.send("GET", &format!("/v1/policies/{id}"), None)?;
        let step = match answer.status {
            404 => Step::Create,
            200 => {
                let version = answer.body.get("version").and_then(Value::as_u64).and_then(|v| u32::try_from(v).ok());
                let (Some(version), Some(stored)) = (version, stored_document(&answer.body)) else {
                    return Err(Stop::Finding(format!(
                        "policy `{id}`: the node answered a policy this tool cannot read"
                    )));
                };
                let (old, new) = (json!(stored), json!(document));
                let mut found = Vec::new();
                differences("", &old, &new, &mut found);
                if found.is_empty() {
                    Step::Unchanged { version }
                } else {
                    let mode_only = PolicyDocument { mode: document.mode, ..stored } == document;
                    Step::Update { version, differences: found, mode_only }
                }
            }
            _ => return Err(refused(&format!("policy `{id}`"), &answer)),
        };
        planned.push(Planned { at, document, step });
    }
    Ok(planned)
}

fn print_plan(planned: &[Planned]) -> (usize, usize, usize) {
    let (mut create, mut update, mut unchanged) = (0, 0, 0);
    for Planned { at, document, step } in planned {
        let id = document.id.as_ref().map_or("", |id| id.as_str());
        match step {
            Step::Create => {
                create += 1;
                say!("create {id} (from {at})");
            }
            Step::Update { version, differences, .. } => {
                update += 1;
                say!("update {id} version {version} → {} (from {at})", version.saturating_add(1));
                for line in differences {
                    say!("    {line}");
                }
            }
            Step::Unchanged { version } => {
                unchanged += 1;
                say!("unchanged {id} (version {version})");
            }
        }
    }
    (create, update, unchanged)
}

fn execute(node: &Node, planned: &[Planned]) -> Result<(), Stop> {
    for Planned { document, step, .. } in planned {
        let id = document.id.as_ref().map_or("", |id| id.as_str());
        let answer = match step {
            Step::Unchanged { .. } => continue,
            Step::Create => {
                let answer = node.send("POST", "/v1/policies", Some(&json!(document)))?;
                if answer.status != 201 {
                    return Err(refused(&format!("creating `{id}`"), &answer));
                }
                answer
            }
            Step::Update { mode_only: true, .. } => {
                let body = json!({ "mode": document.mode, "reason": "policy apply" });
                let answer = node.send("POST", &format!("/v1/policies/{id}/mode"), Some(&body))?;
                if answer.status != 200 {
                    return Err(refused(&format!("changing the mode of `{id}`"), &answer));
                }
                answer
            }
            Step::Update { version, .. } => {
                let mut body = json!(document);
                body["expected_version"] = json!(version);
                let answer = node.send("PUT", &format!("/v1/policies/{id}"), Some(&body))?;
                if answer.status != 200 {
                    return Err(refused(&format!("updating `{id}`"), &answer));
                }
                answer
            }
        };
        let version = answer.body.get("version").and_then(Value::as_u64).unwrap_or_default();
        let done = if matches!(step, Step::Create) { "created" } else { "updated" };
        say!("{done} {id} (version {version})");
    }
    Ok(())
}

/// `runguard policy apply`.
pub(super) fn apply(args: &ApplyArgs) -> ExitCode {
    let files = match lint::expand(&args.paths) {
        Ok(files) => files,
        Err(why) => {
            complain!("runguard: {why}");
            return ExitCode::from(USAGE);
        }
    };
    let checks = lint::check(&files, &PolicyLimits::default(), &mut |line, problem| {
        if problem {
            complain!("{line}");
        }
    });
    if checks.unreadable || checks.problems > 0 {
        complain!("runguard: nothing applied: the files have problems (see above)");
        return ExitCode::from(if checks.unreadable { USAGE } else { FINDING });
    }
    let node = Node::new(args);
    let result = plan(&node, checks.documents).and_then(|planned| {
        let (create, update, unchanged) = print_plan(&planned);
        if create + update == 0 {
            say!("nothing to do: {unchanged} polic{} unchanged", if unchanged == 1 { "y" } else { "ies" });
            return Ok(());
        }
        if args.dry_run {
            say!("dry run: {create} to create, {update} to update, {unchanged} unchanged; nothing changed");
            return Ok(());
        }
        execute(&node, &planned)?;
        say!("applied: {create} created, {update} updated, {unchanged} unchanged");
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Stop::Usage(why)) => {
            complain!("runguard: {why}");
            ExitCode::from(USAGE)
        }
        Err(Stop::Finding(why)) => {
            complain!("runguard: {why}");
            ExitCode::from(FINDING)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_name_each_changed_field() {
        let old = json!({ "name": "a", "rule": { "max": 10, "warn_at": [80] }, "bind_at": null });
        let new = json!({ "name": "a", "rule": { "max": 20, "warn_at": [80] }, "bind_at": "pre" });
        let mut found = Vec::new();
        differences("", &old, &new, &mut found);
        assert_eq!(found, ["+ bind_at: \"pre\"", "~ rule.max: 10 → 20"]);
    }
}
