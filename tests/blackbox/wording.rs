//! Errors in the project's words: no framework or serde phrasing ("Query deserialize error", "invalid
//! type: sequence, expected struct StepCall", "`cursor` cursor `zz`") reaches a client, and
//! `details.field` names the parameter or JSON path at fault.

use serde_json::json;

use crate::fixtures::budget;
use crate::harness::Node;

/// Phrases of serde, serde_json, serde_urlencoded, actix-web and the `time` crate.
const FOREIGN: [&str; 9] = [
    "deserialize",
    "invalid type",
    "invalid value",
    "unknown field",
    "unknown variant",
    "expected u",
    "struct ",
    "component could not be parsed",
    "character literal",
];

#[track_caller]
fn in_our_words(message: &str) {
    for phrase in FOREIGN {
        assert!(!message.contains(phrase), "`{phrase}` in {message}");
    }
}

/// Every list endpoint answers a bad query string or cursor in the project's words, naming the
/// parameter in `details.field` — not the HTTP framework's ("Query deserialize error", "`cursor` cursor").
#[test]
fn list_endpoints_answer_bad_queries_in_our_words() {
    let node = Node::start();
    let client = node.client();
    client.post("/v1/policies", &budget("pol_q", "tokens", 100)).expect(201);
    client.post("/v1/runs", &json!({ "run_id": "run-q" })).expect(201);
    for path in [
        "/v1/policies",
        "/v1/policies/pol_q/audit",
        "/v1/policies/pol_q/versions",
        "/v1/runs",
        "/v1/runs/run-q/decisions",
        "/v1/prevention-records",
        "/v1/incidents",
        "/v1/patterns",
    ] {
        let resp = client.get(&format!("{path}?bogus=1"));
        let details = resp.expect_error(400, "invalid_request");
        assert_eq!(details["field"], "bogus", "{path}: {}", resp.text);
        let message = resp.body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("is not a parameter of this endpoint"), "{path}: {message}");
        in_our_words(message);

        let resp = client.get(&format!("{path}?cursor=zz"));
        let details = resp.expect_error(400, "invalid_request");
        assert_eq!(details["field"], "cursor", "{path}: {}", resp.text);
        let message = resp.body["error"]["message"].as_str().unwrap_or_default();
        assert_eq!(message, "`cursor` `zz` is not a cursor this list gave", "{path}");

        let resp = client.get(&format!("{path}?limit=1&limit=2"));
        assert_eq!(resp.expect_error(400, "invalid_request")["field"], "limit", "{path}: {}", resp.text);
    }
    let resp = client.get("/v1/policies?mode=sometimes");
    assert_eq!(resp.expect_error(400, "invalid_request")["field"], "mode", "{}", resp.text);
}

/// Bodies with the wrong shapes, types, values and names answer in the project's words too.
#[test]
fn bad_bodies_answer_in_our_words() {
    let node = Node::start();
    let client = node.client();
    client.post("/v1/runs", &json!({ "run_id": "run-w" })).expect(201);
    for (body, field, message) in [
        (json!({ "index": "x", "phase": "post" }), "index", "`index` must be a whole number ≥ 0, not a string"),
        (json!({ "index": 0, "phase": "later" }), "phase", "`phase` `later` is not one of `pre`, `post`"),
        (
            json!({ "index": 0, "phase": "post", "usage": { "tokens": -1 } }),
            "usage.tokens",
            "`usage.tokens` is -1; it must be a whole number ≥ 0",
        ),
        (
            json!({ "index": 0, "phase": "post", "usage": { "tokens": 1.5 } }),
            "usage.tokens",
            "`usage.tokens` must be a whole number ≥ 0, not 1.5",
        ),
        (json!([0, "post"]), "", "must be an object, not a list"),
        (
            json!({ "index": 0, "phase": "post", "colour": 1 }),
            "colour",
            "`colour` is not a known field (known: `index`, `phase`, ",
        ),
    ] {
        let resp = client.post("/v1/runs/run-w/steps", &body);
        assert_eq!(resp.expect_error(400, "invalid_request")["field"], field, "{body}: {}", resp.text);
        let got = resp.body["error"]["message"].as_str().unwrap_or_default();
        assert!(got.starts_with(message), "{body}: {got}");
        in_our_words(got);
    }
    let resp = client.post("/v1/runs/run-w/end", &json!({ "outcome": "meh" }));
    in_our_words(resp.body["error"]["message"].as_str().unwrap_or_default());
    let resp = client.get("/v1/prevention-records?since=2020");
    assert_eq!(resp.expect_error(400, "invalid_request")["field"], "since");
    let got = resp.body["error"]["message"].as_str().unwrap_or_default();
    assert_eq!(got, "`since` `2020` is not an RFC 3339 timestamp such as `2026-01-31T09:30:00Z`");
}
