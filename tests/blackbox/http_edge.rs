//! The HTTP edge under hostile clients (SPEC §12.11): malformed requests, trickled bodies, idle and
//! non-reading connections, method and media-type errors — driven over raw TCP where an HTTP client
//! library would refuse to misbehave.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fixtures::{budget, create_run, post};
use crate::harness::{ACME_OPERATOR, ACME_WORKER, BETA_WORKER, Node, tokens_config};

fn addr(node: &Node) -> String {
    node.base().trim_start_matches("http://").to_owned()
}

fn connect(node: &Node) -> TcpStream {
    let stream = TcpStream::connect(addr(node)).expect("connect to the node");
    stream.set_read_timeout(Some(Duration::from_secs(20))).expect("read timeout");
    stream
}

/// Sends raw bytes and reads until the node closes the connection (or the read times out).
fn exchange(node: &Node, request: &[u8]) -> String {
    let mut stream = connect(node);
    // The node may answer and close before reading everything (a head too large): a failed write is
    // not the test's concern, the answer is.
    let _ = stream.write_all(request);
    read_all(&mut stream)
}

fn read_all(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let mut buf = [0_u8; 8192];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

fn status_of(answer: &str) -> Option<u16> {
    answer.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

fn body_of(answer: &str) -> Value {
    answer.split_once("\r\n\r\n").and_then(|(_, body)| serde_json::from_str(body).ok()).unwrap_or(Value::Null)
}

/// Lines of the node's log at ERROR (the text format prints the level before the message).
fn error_lines(node: &Node) -> Vec<String> {
    node.logs().lines().filter(|line| line.contains("ERROR")).map(str::to_owned).collect()
}

#[test]
fn malformed_requests_are_refused_without_error_logs() {
    let node = Node::start();
    let long_url = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70 * 1024));
    let many_headers = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\n{}\r\n",
        (0..200).map(|i| format!("X-H{i}: v\r\n")).collect::<String>()
    );
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("bad content-length", b"POST /v1/runs HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n{}".to_vec()),
        (
            "two content-lengths",
            b"POST /v1/runs HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}".to_vec(),
        ),
        ("NUL in a header", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n".to_vec()),
        ("garbage request line", b"THIS IS NOT HTTP\r\n\r\n".to_vec()),
        ("70 KB URL", long_url.into_bytes()),
        ("too many headers", many_headers.into_bytes()),
    ];
    for (what, request) in cases {
        let answer = exchange(&node, &request);
        let status = status_of(&answer);
        // actix-web answers these inside its HTTP/1 codec, before any handler: a status line without a
        // JSON body is all the node can give (docs/api.md lists them).
        assert!(status.is_some_and(|s| (400..500).contains(&s)), "{what}: {answer:?}");
    }
    node.client().get("/healthz").expect(200);
    assert_eq!(error_lines(&node), Vec::<String>::new(), "a client's malformed request is not an ERROR");
}

#[test]
fn wrong_methods_name_the_allowed_ones_and_head_answers_get_routes() {
    let node = Node::start();
    let client = node.client();
    let delete = client.send("DELETE", "/v1/policies", None).expect("transport");
    delete.expect_error(405, "method_not_allowed");
    assert_eq!(delete.header("allow").as_deref(), Some("GET, HEAD, POST"));
    let put = client.send("PUT", "/v1/runs", Some(b"{}".to_vec())).expect("transport");
    put.expect_error(405, "method_not_allowed");
    assert_eq!(put.header("allow").as_deref(), Some("GET, HEAD, POST"));
    let post = client.send("POST", "/healthz", Some(b"{}".to_vec())).expect("transport");
    assert_eq!(post.header("allow").as_deref(), Some("GET, HEAD"));

    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json", "/v1/policies"] {
        let head = client.send("HEAD", path, None).expect("transport");
        assert_eq!(head.status, 200, "HEAD {path}: {}", head.text);
        assert!(head.text.is_empty(), "HEAD {path} has no body");
    }
    let head = client.send("HEAD", "/v1/runs/run-none", None).expect("transport");
    assert_eq!(head.status, 404);
}

#[test]
fn only_json_content_types_are_accepted() {
    let node = Node::start();
    let client = node.client();
    let body = || Some(json!({ "run_id": "run-ct" }).to_string().into_bytes());
    for refused in ["application/jsonfoo", "application/json-patch+json", "text/json"] {
        let resp = client.send_with("POST", "/v1/runs", body(), &[("content-type", refused)]).expect("transport");
        resp.expect_error(415, "unsupported_media_type");
    }
    let resp = client
        .send_with("POST", "/v1/runs", body(), &[("content-type", "application/json; charset=utf-8")])
        .expect("transport");
    resp.expect(201);
    // A body without any `Content-Type` is not JSON either; no body at all needs none.
    let bare =
        exchange(&node, b"POST /v1/runs HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}");
    assert_eq!(status_of(&bare), Some(415), "{bare:?}");
    assert_eq!(body_of(&bare)["error"]["code"], "unsupported_media_type");
    let empty = exchange(&node, b"POST /v1/runs HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status_of(&empty), Some(201), "{empty:?}");
}

/// A started request whose body never completes.
fn trickle(node: &Node, token: &str) -> TcpStream {
    let mut stream = connect(node);
    let head = format!(
        "POST /v1/runs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n{{}}"
    );
    stream.write_all(head.as_bytes()).expect("send the head and 2 of 10 bytes");
    stream
}

#[test]
fn trickled_bodies_are_answered_408_while_other_tenants_are_served() {
    const TRICKLERS: usize = 40;
    let node = Node::start_with_config(&format!("{}\n[http]\nbody_timeout_ms = 500\n", tokens_config()));
    let started = Instant::now();
    let mut tricklers: Vec<TcpStream> = (0..TRICKLERS).map(|_| trickle(&node, ACME_WORKER.secret)).collect();
    // Another tenant is served at once, while the trickled bodies are pending.
    let beta = node.client_as(BETA_WORKER);
    let served = Instant::now();
    beta.post("/v1/runs", &json!({ "run_id": "run-beta" })).expect(201);
    assert!(served.elapsed() < Duration::from_secs(2), "beta waited {:?}", served.elapsed());
    let mut slowest = Duration::ZERO;
    for stream in &mut tricklers {
        let answer = read_all(stream);
        slowest = slowest.max(started.elapsed());
        assert_eq!(status_of(&answer), Some(408), "{answer:?}");
        assert_eq!(body_of(&answer)["error"]["code"], "request_timeout", "{answer:?}");
    }
    eprintln!("{TRICKLERS} trickled bodies answered 408 within {slowest:?} (body_timeout_ms = 500)");
    assert!(slowest < Duration::from_secs(5), "408s took {slowest:?}");
    node.client_as(ACME_OPERATOR).post("/v1/policies", &budget("pol_after", "tokens", 5)).expect(201);
    assert_eq!(error_lines(&node), Vec::<String>::new());
}

#[test]
fn connections_are_bounded_and_idle_ones_are_closed() {
    let config = "http_workers = 1\n[http]\nmax_connections = 4\nrequest_head_timeout_ms = 700\n";
    let node = Node::start_with_config(config);
    // Four connections that never send a request fill the node's connection limit.
    let mut idle: Vec<TcpStream> = (0..4).map(|_| connect(&node)).collect();
    std::thread::sleep(Duration::from_millis(100));
    let waited = Instant::now();
    node.client().get("/healthz").expect(200);
    let waited = waited.elapsed();
    // The fifth client was accepted only once the idle connections timed out and were closed.
    assert!(waited >= Duration::from_millis(400), "the fifth connection was accepted at once ({waited:?})");
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    for stream in &mut idle {
        let answer = read_all(stream);
        assert!(answer.is_empty() || status_of(&answer) == Some(408), "{answer:?}");
    }
}

#[test]
fn unknown_runs_answer_404_without_holding_live_run_slots() {
    let node = Node::start_with_config(&format!("run_idle_s = 300\n{}\n[limits]\nlive_runs = 8\n", tokens_config()));
    let acme = node.client_as(ACME_WORKER);
    for n in 0..40 {
        acme.post(&format!("/v1/runs/run-nope-{n}/steps"), &post(0, 1)).expect_error(404, "not_found");
        acme.post(&format!("/v1/runs/run-nope-{n}/end"), &json!({ "outcome": "succeeded" }))
            .expect_error(404, "not_found");
    }
    // Another tenant can still create (and so hold) every slot.
    let beta = node.client_as(BETA_WORKER);
    for n in 0..8 {
        create_run(&beta, &format!("run-beta-{n}"));
    }
    let metrics = node.client().get("/metrics").text;
    assert!(metrics.lines().any(|line| line == "runguard_live_runs 8"), "{metrics}");
}

/// The node's open HTTP connections (Linux): its sockets whose local port is the node's listening port.
/// Only these count, so that a store's own connections (a PostgreSQL pool that grows under load) do not.
fn open_fds(node: &Node) -> usize {
    let pid = node.pid().expect("the node runs");
    let port: u16 = node.base().rsplit(':').next().and_then(|p| p.parse().ok()).expect("the node's port");
    let sockets: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.filter_map(Result::ok)
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .filter_map(|link| {
                    let link = link.to_string_lossy().into_owned();
                    link.strip_prefix("socket:[").and_then(|rest| rest.strip_suffix(']')).map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default();
    let port_hex = format!(":{port:04X}");
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).ok())
        .flat_map(|text| text.lines().skip(1).map(str::to_owned).collect::<Vec<_>>())
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_is_node = fields.get(1).is_some_and(|local| local.ends_with(&port_hex));
            local_is_node && fields.get(9).is_some_and(|inode| sockets.contains(*inode))
        })
        .count()
}

#[test]
fn clients_that_stop_reading_are_dropped_while_others_are_served() {
    const SLOW: usize = 20;
    let config = format!("{}\n[http]\nsend_timeout_ms = 1000\nkeep_alive_ms = 60000\n", tokens_config());
    let node = Node::start_with_config(&config);
    let acme_op = node.client_as(ACME_OPERATOR);
    // Eight shadow content policies of 1024 long keywords: a policy list of about 2 MB.
    for n in 0..8 {
        let keywords: Vec<String> = (0..1024).map(|i| format!("k{n}-{i}-{}", "x".repeat(240))).collect();
        let doc = json!({ "id": format!("pol_big_{n}"), "name": "big", "mode": "shadow",
            "rule": { "kind": "content", "target": "output", "keywords": keywords } });
        acme_op.post("/v1/policies", &doc).expect(201);
    }
    let baseline = open_fds(&node);
    let request = format!(
        "GET /v1/policies?limit=1000 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        ACME_OPERATOR.secret
    );
    let slow: Vec<TcpStream> = (0..SLOW)
        .map(|_| {
            let mut stream = connect(&node);
            stream.write_all(request.as_bytes()).expect("send the request, then never read");
            stream
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    node.client_as(BETA_WORKER).post("/v1/runs", &json!({ "run_id": "run-beta" })).expect(201);
    assert!(started.elapsed() < Duration::from_secs(5), "beta waited {:?}", started.elapsed());
    // The node gives up on the stalled answers and closes those connections, though the clients keep theirs.
    let deadline = Instant::now() + Duration::from_secs(60);
    while open_fds(&node) > baseline + 2 {
        assert!(Instant::now() < deadline, "{} descriptors still open (baseline {baseline})", open_fds(&node));
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!("{SLOW} non-reading connections dropped after {:?}", started.elapsed());
    drop(slow);
}

#[test]
fn failed_creations_hold_no_live_run_slot() {
    let node = Node::start_with_config("fault_injection = true\nrun_idle_s = 300\n[limits]\nlive_runs = 4\n");
    let client = node.client();
    client.post("/v1/faults/store", &json!({ "commit_failure": true })).expect(200);
    for n in 0..12 {
        client.post("/v1/runs", &json!({ "run_id": format!("run-failed-{n}") })).expect_error(503, "unavailable");
    }
    client.post("/v1/faults/store", &json!({ "commit_failure": false })).expect(200);
    // The refused creations left nothing behind: every slot is free for runs that exist.
    for n in 0..4 {
        create_run(&client, &format!("run-ok-{n}"));
    }
    client.get("/v1/runs/run-failed-0").expect_error(404, "not_found");
}

#[test]
fn answers_held_for_clients_that_do_not_read_are_bounded() {
    // 24 policies of 1024 long keywords: a list of about 6 MB, more than the kernel buffers of a stalled
    // loopback connection take, against a budget of 8 MB for unsent large answers.
    let node = Node::start_with_config("[http]\nanswer_budget_bytes = 8000000\nsend_timeout_ms = 0\n");
    let client = node.client();
    for n in 0..24 {
        let keywords: Vec<String> = (0..1024).map(|i| format!("k{n}-{i}-{}", "x".repeat(240))).collect();
        let doc = json!({ "id": format!("pol_big_{n}"), "name": "big", "mode": "shadow",
            "rule": { "kind": "content", "target": "output", "keywords": keywords } });
        client.post("/v1/policies", &doc).expect(201);
    }
    let list = "/v1/policies?limit=1000";
    assert_eq!(client.get(list).status, 200, "a reading client gets the list");
    let mut stalled = connect(&node);
    stalled.write_all(format!("GET {list} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).expect("send, never read");
    std::thread::sleep(Duration::from_millis(1500));
    // The stalled answer holds most of the budget: another large answer is refused at once, small ones
    // are served.
    client.get(list).expect_error(503, "unavailable");
    client.get("/healthz").expect(200);
    let refused = client.get("/metrics").text;
    assert!(refused.contains(r#"runguard_refused_calls_total{reason="answer_budget"} 1"#), "{refused}");
    // Once the stalled client goes, its answer is freed and the budget with it.
    drop(stalled);
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.get(list).status != 200 {
        assert!(Instant::now() < deadline, "the budget was never given back");
        std::thread::sleep(Duration::from_millis(100));
    }
}
