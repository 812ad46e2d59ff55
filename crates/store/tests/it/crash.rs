//! Crash test: a child process group-commits records and prints each acknowledged seq; the parent kills
//! it with SIGKILL at random points, reopens the store, and checks that every acknowledged record is
//! there and the chain verifies. On sled and on PostgreSQL.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use runguard_contract::RunId;
use runguard_store::{PgOptions, Store, StoreOptions, WriteBatch};

use crate::fixtures::{World, at};

const CHILD_ENV: &str = "RUNGUARD_STORE_CRASH_CHILD_DIR";
/// Set instead of the directory when the child writes to PostgreSQL.
const CHILD_URL_ENV: &str = "RUNGUARD_STORE_CRASH_CHILD_URL";
const KILLS: usize = 4;

/// The child's body; runs only when the parent starts this binary with `--ignored` and the directory.
#[test]
#[ignore = "run by `a_killed_writer_loses_no_acknowledged_record` in a child process"]
fn crash_child_process() {
    let store = match std::env::var(CHILD_URL_ENV) {
        Ok(url) => Store::open_postgres(&url, &PgOptions::default()).unwrap(),
        Err(_) => {
            let dir = std::env::var(CHILD_ENV).expect("the parent names the store directory");
            Store::open(&dir, &StoreOptions::default()).unwrap()
        }
    };
    let world = World::new("acme");
    let mut run = world.run("crash-run");
    if store.get_run(&world.tenant, &run.run_id).unwrap().is_none() {
        let mut batch = WriteBatch::new();
        world.setup(&mut batch);
        batch.put_run(run.clone());
        store.commit(batch).unwrap();
    }
    run.run_id = RunId::new("crash-run").unwrap();
    let mut stdout = std::io::stdout().lock();
    let mut round: u64 = 0;
    loop {
        let (head, _) = store.chain_head().unwrap();
        let size = 1 + (round % 8);
        let mut batch = WriteBatch::new();
        for i in 0..size {
            // The step number only has to be unique: it names the record.
            world.push_block(&mut batch, &run, head + i, at(i64::try_from(head + i).unwrap()));
        }
        let receipt = store.commit(batch).unwrap();
        for record in &receipt.records {
            writeln!(stdout, "ack {}", record.seq).unwrap();
        }
        stdout.flush().unwrap();
        round += 1;
    }
}

fn jitter(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// Where the killed writer's store lives.
enum Place {
    Sled(tempfile::TempDir),
    Postgres(String),
}

impl Place {
    fn open(&self) -> Store {
        match self {
            Place::Sled(dir) => Store::open(dir.path(), &StoreOptions::default()).unwrap(),
            Place::Postgres(url) => Store::open_postgres(url, &PgOptions::default()).unwrap(),
        }
    }

    fn tell(&self, child: &mut Command) {
        match self {
            Place::Sled(dir) => child.env(CHILD_ENV, dir.path()),
            Place::Postgres(url) => child.env(CHILD_URL_ENV, url),
        };
    }
}

#[test]
fn a_killed_writer_loses_no_acknowledged_record() {
    kill_writers(&Place::Sled(tempfile::tempdir().unwrap()));
}

#[test]
fn a_killed_writer_loses_no_acknowledged_record_on_postgres() {
    let Some(db) = runguard_testpg::fresh_database() else { return };
    kill_writers(&Place::Postgres(db.url));
}

fn kill_writers(place: &Place) {
    let exe = std::env::current_exe().unwrap();
    let mut seed = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    let mut total_acks = 0usize;
    for kill in 0..KILLS {
        let mut command = Command::new(&exe);
        command.args(["--ignored", "--exact", "crash::crash_child_process", "--nocapture", "--test-threads=1"]);
        place.tell(&mut command);
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let acks = Arc::new(Mutex::new(Vec::<u64>::new()));
        let reader = {
            let acks = Arc::clone(&acks);
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Some(seq) = line.strip_prefix("ack ") {
                        acks.lock().unwrap().push(seq.trim().parse().unwrap());
                    }
                }
            })
        };
        // Wait until the child has acknowledged something, then kill it at a random point after that.
        let started = std::time::Instant::now();
        while acks.lock().unwrap().is_empty() && started.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(20 + jitter(&mut seed) % 250));
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        reader.join().unwrap();
        let acked = acks.lock().unwrap().clone();
        assert!(!acked.is_empty(), "child {kill} acknowledged nothing");
        total_acks += acked.len();

        let store = place.open();
        let (head, _) = store.chain_head().unwrap();
        let max_acked = *acked.iter().max().unwrap();
        assert!(head >= max_acked, "after kill {kill}: head {head} is behind acknowledged seq {max_acked}");
        for seq in &acked {
            let record = store.record_at(*seq).unwrap();
            assert!(record.is_some_and(|r| r.seq == *seq), "acknowledged seq {seq} is missing after kill {kill}");
        }
        let report = store.verify().unwrap();
        assert!(report.is_ok(), "after kill {kill}: {report:?}");
        assert_eq!(report.records_checked, head);
    }
    assert!(total_acks >= KILLS);
}
