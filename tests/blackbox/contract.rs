//! The node's OpenAPI document as a checker of real answers. The harness's client fetches
//! `/openapi.json` once per node and checks every answer it receives: the status must be declared for the
//! operation, the body must match the schema declared for that status, and `Retry-After` must be present
//! where the document requires it. Drift between the document and the node fails whichever test saw it.

use serde_json::{Value, json};

use crate::harness::Resp;

/// What one declared status promises.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// The JSON body's schema; `None` for a body that is not JSON (`/metrics`).
    schema: Option<jsonschema::Validator>,
    retry_after: bool,
}

/// One documented operation.
#[derive(Debug)]
struct Operation {
    method: String,
    segments: Vec<String>,
    answers: Vec<Answer>,
}

impl Operation {
    fn matches(&self, path: &str) -> bool {
        let segments: Vec<&str> = path.split('/').collect();
        segments.len() == self.segments.len()
            && self
                .segments
                .iter()
                .zip(&segments)
                .all(|(template, segment)| template.starts_with('{') && !segment.is_empty() || template == segment)
    }
}

/// The compiled document.
#[derive(Debug)]
pub struct Contract {
    operations: Vec<Operation>,
    error: jsonschema::Validator,
}

/// A validator for `schema`, whose `$ref`s point into the document's components.
fn compile(schema: &Value, document: &Value) -> jsonschema::Validator {
    let wrapped = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "components": document["components"],
        "allOf": [schema],
    });
    jsonschema::draft202012::new(&wrapped)
        .unwrap_or_else(|err| panic!("the document's schema {schema} compiles: {err}"))
}

impl Contract {
    /// Compiles every response schema of `document`.
    pub fn new(document: &Value) -> Contract {
        let mut operations = Vec::new();
        let paths = document["paths"].as_object().expect("the document has paths");
        for (path, item) in paths {
            for (method, operation) in item.as_object().expect("a path item is an object") {
                let responses = operation["responses"].as_object().expect("an operation has responses");
                let answers = responses
                    .iter()
                    .map(|(status, response)| Answer {
                        status: status.parse().expect("statuses are numbers"),
                        schema: response["content"]["application/json"]
                            .get("schema")
                            .map(|schema| compile(schema, document)),
                        retry_after: response["headers"]["Retry-After"]["required"] == true,
                    })
                    .collect();
                operations.push(Operation {
                    method: method.to_ascii_uppercase(),
                    segments: path.split('/').map(str::to_owned).collect(),
                    answers,
                });
            }
        }
        let error = compile(&json!({ "$ref": "#/components/schemas/Error" }), document);
        Contract { operations, error }
    }

    /// Checks one answer to `method path`; panics with what drifted.
    #[track_caller]
    pub fn check(&self, method: &str, path: &str, resp: &Resp) {
        let path = path.split('?').next().unwrap_or_default();
        let head = method.eq_ignore_ascii_case("HEAD");
        let method = if head { "GET".to_owned() } else { method.to_ascii_uppercase() };
        let Some(operation) = self.operations.iter().find(|op| op.method == method && op.matches(path)) else {
            // Not an operation of the document: an unknown path (404), a method the path does not serve
            // (405) or a route kept out of the document (fault injection). Its errors are still errors.
            if resp.status >= 400 && !resp.text.is_empty() {
                check_body(&self.error, method.as_str(), path, resp);
            }
            return;
        };
        let Some(answer) = operation.answers.iter().find(|answer| answer.status == resp.status) else {
            let declared: Vec<u16> = operation.answers.iter().map(|answer| answer.status).collect();
            panic!(
                "OpenAPI drift: {method} {path} answered {} which the document does not declare ({declared:?}); body: {}",
                resp.status, resp.text
            );
        };
        if answer.retry_after {
            assert!(
                resp.header("retry-after").is_some(),
                "OpenAPI drift: {method} {path} answered {} without the declared `Retry-After`",
                resp.status
            );
        }
        // actix-web answers a request head it cannot parse, or one that does not arrive in time, from its
        // codec with an empty body (docs/api.md).
        let from_codec = resp.text.is_empty() && matches!(resp.status, 400 | 408);
        if let Some(schema) = &answer.schema
            && !head
            && !from_codec
        {
            check_body(schema, &method, path, resp);
        }
    }
}

#[track_caller]
fn check_body(schema: &jsonschema::Validator, method: &str, path: &str, resp: &Resp) {
    let body: Value = serde_json::from_str(&resp.text).unwrap_or_else(|err| {
        panic!(
            "OpenAPI drift: {method} {path} answered {} with a body that is not JSON ({err}): {}",
            resp.status, resp.text
        )
    });
    let problems: Vec<String> =
        schema.iter_errors(&body).map(|err| format!("{} at `{}`", err, err.instance_path())).take(5).collect();
    assert!(
        problems.is_empty(),
        "OpenAPI drift: {method} {path} answered {} with a body its schema refuses:\n  {}\nbody: {}",
        resp.status,
        problems.join("\n  "),
        resp.text.chars().take(2000).collect::<String>()
    );
}
