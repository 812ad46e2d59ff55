//! Every example in `docs/policies.md` does what the document says: each `json policy` block is created
//! on a real node (201), each `toml policy` block passes `runguard policy lint` and, converted to JSON, is
//! created too, and each `json refused FIELD` block is refused by the node (400 naming FIELD) and by the
//! linter (exit 1 naming FIELD). Every accepted example also validates against the JSON Schema that
//! `runguard policy schema` prints, and documents the schema refuses are refused by the node too.

use std::path::Path;

use serde_json::{Value, json};

use crate::bad_input::lint;
use crate::harness::{Node, run_cli};

/// One fenced example: its language, what the document says of it, and its text.
struct Example {
    language: String,
    claim: Vec<String>,
    text: String,
}

fn examples(markdown: &str) -> Vec<Example> {
    let mut found = Vec::new();
    let mut open: Option<Example> = None;
    for line in markdown.lines() {
        match (&mut open, line.strip_prefix("```")) {
            (None, Some(info)) if !info.is_empty() => {
                let mut words = info.split_whitespace().map(str::to_owned);
                let language = words.next().unwrap_or_default();
                open = Some(Example { language, claim: words.collect(), text: String::new() });
            }
            (Some(_), Some("")) => found.extend(open.take()),
            (Some(example), _) => {
                example.text.push_str(line);
                example.text.push('\n');
            }
            (None, _) => {}
        }
    }
    found.into_iter().filter(|e| matches!(e.claim.first().map(String::as_str), Some("policy" | "refused"))).collect()
}

#[test]
fn every_example_in_the_policy_reference_does_what_it_says() {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/policies.md");
    let markdown = std::fs::read_to_string(&doc).expect("docs/policies.md");
    let examples = examples(&markdown);
    assert!(examples.len() >= 15, "only {} examples found", examples.len());
    let schema = policy_schema();
    let node = Node::start();
    let client = node.client();
    let dir = tempfile::tempdir().expect("temp dir");
    for (i, example) in examples.iter().enumerate() {
        let file = dir.path().join(format!("example-{i}.{}", example.language));
        std::fs::write(&file, &example.text).expect("write the example");
        let (code, said) = lint(&[&file]);
        let json_body = match example.language.as_str() {
            "json" => example.text.clone().into_bytes(),
            "toml" => {
                let value: toml::Value = toml::from_str(&example.text).expect("the TOML example parses");
                serde_json::to_vec(&value).expect("TOML converts to JSON")
            }
            other => panic!("example {i} is in `{other}`"),
        };
        let resp = client.send("POST", "/v1/policies", Some(json_body.clone())).expect("transport");
        match example.claim.as_slice() {
            [claim] if claim == "policy" => {
                let value: Value = serde_json::from_slice(&json_body).expect("the example is JSON");
                let problems: Vec<String> = schema.iter_errors(&value).map(|e| e.to_string()).collect();
                assert!(problems.is_empty(), "the schema refuses example {i}: {problems:?}\n{}", example.text);
                assert_eq!(code, Some(0), "lint refused example {i}: {said}\n{}", example.text);
                assert_eq!(resp.status, 201, "the node refused example {i}: {}\n{}", resp.text, example.text);
            }
            [claim, field] if claim == "refused" => {
                assert_eq!(code, Some(1), "lint accepted refused example {i}: {said}\n{}", example.text);
                assert!(said.contains(field.as_str()), "lint did not name `{field}`: {said}");
                assert_eq!(resp.expect_error(400, "invalid_request")["field"], field.as_str(), "example {i}");
            }
            other => panic!("example {i} claims {other:?}"),
        }
    }
}

/// `runguard policy schema`, compiled.
fn policy_schema() -> jsonschema::Validator {
    let out = run_cli(&["policy".as_ref(), "schema".as_ref()]);
    assert!(out.status.success(), "policy schema failed: {}", String::from_utf8_lossy(&out.stderr));
    let schema: Value = serde_json::from_slice(&out.stdout).expect("policy schema prints JSON");
    assert_eq!(schema["$schema"], "https://json-schema.org/draft/2020-12/schema");
    jsonschema::draft202012::new(&schema).expect("the policy schema is a valid JSON Schema")
}

#[test]
fn documents_the_policy_schema_refuses_are_refused_by_the_node() {
    let schema = policy_schema();
    let rule = |kind: &str| json!({ "name": "x", "rule": { "kind": kind } });
    let mut invalid: Vec<(&str, Value)> = vec![
        (
            "rule.window_s",
            json!({ "name": "x", "rule": { "kind": "rate", "metric": "steps", "max": 1, "window_s": 0 } }),
        ),
        (
            "rule.max",
            json!({ "name": "x", "rule": { "kind": "budget", "metric": "tokens", "per": "run", "max": 9_007_199_254_740_992_u64 } }),
        ),
        (
            "rule.warn_at[0]",
            json!({ "name": "x", "rule": { "kind": "budget", "metric": "tokens", "per": "run", "max": 5, "warn_at": [100] } }),
        ),
        ("rule.deny", json!({ "name": "x", "rule": { "kind": "skill", "allow": ["a"], "deny": ["b"] } })),
        ("rule.detectors", rule("content")),
        ("rule.kind", rule("magic")),
        ("precedence", json!({ "name": "x", "precedence": -1, "rule": { "kind": "expr", "cel": "true" } })),
        ("bind_at", json!({ "name": "x", "bind_at": "sometime", "rule": { "kind": "expr", "cel": "true" } })),
        ("colour", json!({ "name": "x", "colour": "red", "rule": { "kind": "expr", "cel": "true" } })),
    ];
    invalid.push(("name", json!({ "rule": { "kind": "expr", "cel": "true" } })));
    let node = Node::start();
    let client = node.client();
    for (field, document) in invalid {
        assert!(!schema.is_valid(&document), "the schema accepts {document}");
        let resp = client.post("/v1/policies", &document);
        let details = resp.expect_error(400, "invalid_request");
        let named = details["field"].as_str().unwrap_or_default();
        assert!(named == field || resp.text.contains(field), "{document}: the node named `{named}`: {}", resp.text);
    }
}
