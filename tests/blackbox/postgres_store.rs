//! The node on PostgreSQL (SPEC §14.1), on every pass: the `store` configuration and its errors, the
//! password kept out of every message, `serve` migrating an older schema and refusing a newer one, and
//! `runguard migrate`. Each test gets a fresh database of the test process's private server and is
//! skipped, with a message, when PostgreSQL is not installed (the PostgreSQL pass fails instead).

use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::fixtures::{budget, create_policy, create_run, post, step};
use crate::harness::{Client, Node, fresh_postgres, run_cli};

/// `runguard serve` with this config file on a free port, expected to exit before listening: its exit
/// code and standard error.
fn serve_fails(toml: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("runguard.toml");
    std::fs::write(&file, toml).expect("write the config");
    let out = run_cli(&[
        OsStr::new("serve"),
        OsStr::new("--listen"),
        OsStr::new("127.0.0.1:0"),
        OsStr::new("--config"),
        file.as_os_str(),
    ]);
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn migrate(url: &str) -> (Option<i32>, String, String) {
    let out = run_cli(&[OsStr::new("migrate"), OsStr::new("--postgres-url"), OsStr::new(url)]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_postgres_store_needs_a_url_that_parses_and_never_shows_its_password() {
    let (code, stderr) = serve_fails("store = \"postgres\"\n");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("`postgres_url`"), "{stderr}");

    let (code, stderr) = serve_fails("store = \"postgres\"\npostgres_url = \"postgres://rg:hunter2@db:notaport/rg\"\n");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("postgres_url") && stderr.contains("***"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "the password is shown: {stderr}");

    let (code, stderr) = serve_fails("store = \"mysql\"\n");
    assert_eq!(code, Some(2), "{stderr}");

    // A database that cannot be reached: exit 1, the URL shown without its password.
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    let (code, stderr) =
        serve_fails(&format!("store = \"postgres\"\npostgres_url = \"postgres://rg:hunter2@127.0.0.1:{port}/rg\"\n"));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&format!("postgres://rg:***@127.0.0.1:{port}/rg")), "{stderr}");
    assert!(!stderr.contains("hunter2"), "the password is shown: {stderr}");
}

#[test]
fn a_node_on_postgres_keeps_runs_and_records_across_restarts() {
    let Some(db) = fresh_postgres() else { return };
    let mut node = Node::start_on_postgres(&db.url, None);
    let client = node.client();
    client.get("/readyz").expect(200);
    create_policy(&client, &budget("pol_budget", "tokens", 10));
    create_run(&client, "run-1");
    let blocked = step(&client, "run-1", &post(0, 11)).clone();
    assert_eq!(blocked["action"], "block");
    let record = blocked["prevention_record_id"].as_str().expect("a record").to_owned();

    node.kill();
    node.restart();
    let client = node.client();
    assert_eq!(client.get("/v1/runs/run-1").expect(200)["status"], "stopped");
    client.get(&format!("/v1/prevention-records/{record}")).expect(200);
    let verified = node.cli(&["verify"]);
    let out = String::from_utf8_lossy(&verified.stdout);
    assert_eq!(verified.status.code(), Some(0), "{out}");
    assert!(out.contains("records checked: 1"), "{out}");
    let exported = node.cli(&["export"]);
    assert_eq!(String::from_utf8_lossy(&exported.stdout).lines().count(), 1);
}

#[test]
fn migrate_brings_a_database_to_the_current_schema_once() {
    let Some(db) = fresh_postgres() else { return };
    let (code, stdout, stderr) = migrate(&db.url);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("migrated from version 0"), "{stdout}");
    let (code, stdout, stderr) = migrate(&db.url);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("up to date"), "{stdout}");

    // Neither a URL nor a config: a usage error.
    let out = run_cli(&[OsStr::new("migrate")]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn serve_refuses_a_schema_newer_than_it_knows() {
    let Some(db) = fresh_postgres() else { return };
    let (code, _, stderr) = migrate(&db.url);
    assert_eq!(code, Some(0), "{stderr}");
    let mut client = postgres::Client::connect(&db.url, postgres::NoTls).expect("connect to the test database");
    client.batch_execute("INSERT INTO runguard_schema (version) VALUES (999)").expect("a newer schema version");

    let (code, stderr) = serve_fails(&format!("store = \"postgres\"\npostgres_url = \"{}\"\n", db.url));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("schema version 999") && stderr.contains("newer runguard"), "{stderr}");
    let (code, _, stderr) = migrate(&db.url);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("schema version 999"), "{stderr}");
}

/// The read-only commands never create or migrate a schema: a mistyped URL is not answered with an empty
/// store that verifies clean.
#[test]
fn verify_and_export_refuse_a_database_without_a_store_and_leave_it_untouched() {
    let Some(db) = fresh_postgres() else { return };
    for command in ["verify", "export"] {
        let out = run_cli(&[OsStr::new(command), OsStr::new("--postgres-url"), OsStr::new(&db.url)]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {stderr}");
        assert!(stderr.contains("no runguard store"), "{command}: {stderr}");
    }
    let mut sql = postgres::Client::connect(&db.url, postgres::NoTls).expect("connect to the test database");
    let tables: i64 = sql
        .query_one("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'", &[])
        .expect("count tables")
        .get(0);
    assert_eq!(tables, 0, "a read-only command created tables");

    // An older schema is not migrated by a read-only command either.
    let (code, _, stderr) = migrate(&db.url);
    assert_eq!(code, Some(0), "{stderr}");
    sql.batch_execute("DELETE FROM runguard_schema").expect("forget the schema version");
    let out = run_cli(&[OsStr::new("verify"), OsStr::new("--postgres-url"), OsStr::new(&db.url)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("older than this build") && stderr.contains("runguard migrate"), "{stderr}");
    let versions: i64 = sql.query_one("SELECT count(*) FROM runguard_schema", &[]).expect("count").get(0);
    assert_eq!(versions, 0, "verify migrated the schema");
}

/// Steps `run` from index 0 until `stop`, each call retried until it is answered 200; answers the
/// acknowledged decision ids in order and every other status seen.
fn drive(client: &Client, run: &str, stop: &AtomicBool) -> (Vec<String>, Vec<u16>) {
    let (mut acked, mut refused) = (Vec::new(), Vec::new());
    let mut index = 0;
    while !stop.load(Ordering::Relaxed) {
        let body = post(index, 1).to_string().into_bytes();
        match client.send("POST", &format!("/v1/runs/{run}/steps"), Some(body)) {
            Ok(resp) if resp.status == 200 => {
                acked.push(resp.body["decision_id"].as_str().expect("a decision id").to_owned());
                index += 1;
            }
            Ok(resp) => {
                refused.push(resp.status);
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    (acked, refused)
}

/// Waits up to 30 s for `/readyz` to answer `status`.
fn wait_ready(client: &Client, status: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.get("/readyz").status != status {
        assert!(Instant::now() < deadline, "/readyz never answered {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A run's acknowledged decision ids and its stored ones.
type Decisions = (Vec<String>, Vec<String>);

/// Drives three runs while the test's own PostgreSQL is crashed (`pg_ctl -m immediate stop`) and
/// restarted: checks that every refusal was a 503 and `/readyz` answered 503 while it was down and 200 by
/// itself after; answers, per run, the acknowledged decision ids and the stored ones, and `verify`'s
/// exit code.
fn outage_under_load() -> Option<(Vec<Decisions>, Option<i32>)> {
    let cluster = runguard_testpg::Cluster::start()?;
    let db = cluster.fresh_database();
    let mut node = Node::start_on_postgres(&db.url, None);
    let client = node.client();
    create_policy(&client, &budget("pol_budget", "tokens", 1_000_000));
    let runs = ["run-a", "run-b", "run-c"];
    for run in runs {
        create_run(&client, run);
    }
    let stop = AtomicBool::new(false);
    let driven: Vec<(Vec<String>, Vec<u16>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = runs.iter().map(|run| scope.spawn(|| drive(&client, run, &stop))).collect();
        std::thread::sleep(Duration::from_millis(300));
        // A crash of the database mid-load: connections cut, no checkpoint.
        cluster.stop_immediately();
        wait_ready(&client, 503);
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(client.get("/readyz").status, 503, "not ready while the database is down");
        cluster.restart();
        wait_ready(&client, 200);
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        workers.into_iter().map(|w| w.join().expect("a worker")).collect()
    });
    assert!(driven.iter().any(|(_, refused)| !refused.is_empty()), "no call met the outage");
    let mut out = Vec::new();
    for ((acked, refused), run) in driven.into_iter().zip(runs) {
        assert!(refused.iter().all(|status| *status == 503), "{run}: statuses other than 503: {refused:?}");
        assert!(!acked.is_empty(), "{run} never progressed");
        let stored: Vec<String> = client.get(&format!("/v1/runs/{run}/decisions?limit=1000")).expect(200)["items"]
            .as_array()
            .expect("items")
            .iter()
            .filter(|d| d["phase"] != "run_start")
            .map(|d| d["decision_id"].as_str().expect("a decision id").to_owned())
            .collect();
        out.push((acked, stored));
    }
    node.kill();
    let verified = node.cli(&["verify"]);
    Some((out, verified.status.code()))
}

#[test]
fn stopping_postgres_under_load_answers_503_recovers_and_loses_nothing_acknowledged() {
    let Some((runs, verified)) = outage_under_load() else { return };
    for (acked, stored) in runs {
        // Every acknowledged decision is stored, in order (a subsequence of the ledger).
        let mut rest = stored.iter();
        for id in &acked {
            assert!(rest.any(|s| s == id), "acknowledged decision `{id}` is not stored in order: {stored:?}");
        }
    }
    assert_eq!(verified, Some(0), "verify after the outage");
}

/// A `COMMIT` cut off by the crash can land while its callers are answered 503 (`docs/reliability.md`):
/// the run must read the store again before its next call, so that a retry is answered from the ledger
/// rather than evaluated and appended a second time.
#[test]
fn stopping_postgres_under_load_stores_exactly_the_acknowledged_decisions() {
    let Some((runs, _)) = outage_under_load() else { return };
    for (acked, stored) in runs {
        assert_eq!(stored, acked, "the stored decisions are exactly the acknowledged ones");
    }
}

#[test]
fn verify_names_a_record_edited_with_sql() {
    let Some(db) = fresh_postgres() else { return };
    let mut node = Node::start_on_postgres(&db.url, None);
    let client = node.client();
    create_policy(&client, &budget("pol_budget", "tokens", 5));
    for run in ["run-1", "run-2"] {
        create_run(&client, run);
        step(&client, run, &post(0, 6));
    }
    node.terminate();
    assert_eq!(node.cli(&["verify"]).status.code(), Some(0));

    let mut sql = postgres::Client::connect(&db.url, postgres::NoTls).expect("connect to the test database");
    sql.batch_execute("UPDATE records SET body = jsonb_set(body, '{step_index}', '41') WHERE seq = 2")
        .expect("edit a record");
    let verified = node.cli(&["verify"]);
    let out = String::from_utf8_lossy(&verified.stdout);
    assert_eq!(verified.status.code(), Some(1), "{out}");
    assert!(out.contains("records checked: 1") && out.contains("first broken record"), "{out}");
    assert!(out.contains('2'), "the broken record is named: {out}");
}

#[test]
fn migrate_store_moves_a_sled_node_to_postgres_chain_and_all() {
    let Some(db) = fresh_postgres() else { return };
    // A sled node, whatever the pass.
    let mut sled = Node::start_on_sled(None);
    let client = sled.client();
    create_policy(&client, &budget("pol_budget", "tokens", 10));
    let mut update = budget("pol_budget", "tokens", 5);
    update["expected_version"] = json!(1);
    client.put("/v1/policies/pol_budget", &update).expect(200);
    create_run(&client, "run-1");
    step(&client, "run-1", &post(0, 3));
    // Children of run-1 (SPEC §13.2): its rolled-up totals and a record its budget decided for a child.
    for child in ["run-1-a", "run-1-b"] {
        client.post("/v1/runs", &json!({ "run_id": child, "parent_run_id": "run-1" })).expect(201);
    }
    assert_eq!(step(&client, "run-1-a", &post(0, 1))["action"], "allow");
    let by_parent = step(&client, "run-1-b", &post(0, 2));
    let parent_record = by_parent["prevention_record_id"].as_str().expect("a block by run-1's budget").to_owned();
    create_run(&client, "run-2");
    let blocked = step(&client, "run-2", &post(0, 6));
    let record = blocked["prevention_record_id"].as_str().expect("a block with a record").to_owned();
    client
        .post(&format!("/v1/prevention-records/{record}/regret"), &json!({ "severity": 3, "note": "fine" }))
        .expect(201);
    // A failed run: an incident and its pattern (the learning loop's data).
    create_run(&client, "run-3");
    let failing = json!({ "index": 0, "phase": "post", "usage": { "tokens": 1 }, "skill": "fetch",
                          "api_endpoint": "GET /orders", "input_keys": ["id"],
                          "error": { "type": "Timeout", "code": "e_upstream", "status": 504 } });
    step(&client, "run-3", &failing);
    let ended = client.post("/v1/runs/run-3/end", &json!({ "outcome": "failed" })).expect(200).clone();
    let incident = ended["incident_id"].as_str().expect("an incident").to_owned();
    let paths = |incident: &str| {
        [
            format!("/v1/prevention-records/{record}"),
            format!("/v1/prevention-records/{parent_record}"),
            "/v1/runs/run-1".to_owned(),
            "/v1/runs/run-2/decisions".to_owned(),
            "/v1/policies/pol_budget".to_owned(),
            "/v1/policies/pol_budget?version=1".to_owned(),
            "/v1/policies/pol_budget/audit".to_owned(),
            format!("/v1/incidents/{incident}"),
            "/v1/patterns".to_owned(),
            "/v1/graduation".to_owned(),
        ]
    };
    // Graduation is evaluated when asked: its `evaluated_at` is the time of the question.
    let answers = |client: &Client| {
        paths(&incident).map(|path| {
            let mut answer = client.get(&path).expect(200).clone();
            answer.as_object_mut().map(|answer| answer.remove("evaluated_at"));
            answer
        })
    };
    let before = answers(&client);
    assert!(sled.terminate().success());
    let sled_verify = String::from_utf8_lossy(&sled.cli(&["verify"]).stdout).into_owned();

    let from = format!("sled:{}", sled.data_dir().display());
    let to = format!("postgres:{}", db.url);
    let out = run_cli(&[
        OsStr::new("migrate-store"),
        OsStr::new("--from"),
        OsStr::new(&from),
        OsStr::new("--to"),
        OsStr::new(&to),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // A second copy into the now full database is refused.
    let again = run_cli(&[
        OsStr::new("migrate-store"),
        OsStr::new("--from"),
        OsStr::new(&from),
        OsStr::new("--to"),
        OsStr::new(&to),
    ]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));

    let pg = Node::start_on_postgres(&db.url, None);
    let client = pg.client();
    for ((after, before), path) in answers(&client).iter().zip(&before).zip(paths(&incident)) {
        assert_eq!(after, before, "{path} differs after the move");
    }
    let pg_verify = String::from_utf8_lossy(&pg.cli(&["verify"]).stdout).into_owned();
    assert_eq!(pg_verify, sled_verify, "the same snapshots and records verify on both");
    // The run stopped by the block stays stopped; the other continues from its totals.
    client.post("/v1/runs/run-2/steps", &post(1, 1)).expect_error(409, "");
    assert_eq!(step(&client, "run-1", &post(1, 3))["action"], "block");
}
