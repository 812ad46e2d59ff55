//! Every example in `docs/policies.md` does what the document says: each `json policy` block is created
//! on a real node (201), each `toml policy` block passes `runguard policy lint` and, converted to JSON, is
//! created too, and each `json refused FIELD` block is refused by the node (400 naming FIELD) and by the
//! linter (exit 1 naming FIELD).

use std::path::Path;

use crate::bad_input::lint;
use crate::harness::Node;

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
        let resp = client.send("POST", "/v1/policies", Some(json_body)).expect("transport");
        match example.claim.as_slice() {
            [claim] if claim == "policy" => {
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
