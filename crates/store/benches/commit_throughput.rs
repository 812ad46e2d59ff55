//! Group-commit throughput of the store, and the fsync latency of the disk it runs on.
//!
//! Each batch holds `n` durable blocks as the node writes them: a ledger entry, a prevention record
//! (checked against its decision, chained and indexed) and the stopped run. Every commit is one sled
//! transaction, one flush and one fsync. Run with `cargo bench -p runguard-store --bench commit_throughput`.

use std::hint::black_box;
use std::io::{Seek, SeekFrom, Write};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use runguard_store::{Store, StoreOptions, WriteBatch};

#[path = "../tests/it/fixtures.rs"]
mod fixtures;

use fixtures::{World, at};

fn bench_dir() -> tempfile::TempDir {
    // Under the target directory, i.e. on the project's disk rather than a tmpfs.
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

fn group_commit(c: &mut Criterion) {
    let dir = bench_dir();
    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    let world = World::new("acme");
    let run = world.run("bench-run");
    let mut setup = WriteBatch::new();
    world.setup(&mut setup);
    setup.put_run(run.clone());
    store.commit(setup).unwrap();

    let mut step = 0u64;
    let mut group = c.benchmark_group("group_commit");
    group.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    for size in [1u64, 16, 256] {
        group.throughput(Throughput::Elements(size));
        group.bench_with_input(BenchmarkId::new("records_per_batch", size), &size, |b, &size| {
            b.iter_custom(|iters| {
                let batches: Vec<WriteBatch> = (0..iters)
                    .map(|_| {
                        let mut batch = WriteBatch::new();
                        for _ in 0..size {
                            world.push_block(&mut batch, &run, step, at(i64::try_from(step).unwrap_or(0)));
                            step += 1;
                        }
                        batch
                    })
                    .collect();
                let start = Instant::now();
                for batch in batches {
                    black_box(store.commit(batch).unwrap());
                }
                start.elapsed()
            });
        });
    }
    group.finish();
}

fn fsync_latency(c: &mut Criterion) {
    let dir = bench_dir();
    let mut file = std::fs::File::create(dir.path().join("probe")).unwrap();
    let page = [0x5au8; 4096];
    let mut group = c.benchmark_group("disk");
    group.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    group.bench_function("write_4k_fsync", |b| {
        b.iter(|| {
            file.seek(SeekFrom::Start(0)).unwrap();
            file.write_all(&page).unwrap();
            file.sync_all().unwrap();
        });
    });
    group.finish();
}

criterion_group!(benches, group_commit, fsync_latency);
criterion_main!(benches);
