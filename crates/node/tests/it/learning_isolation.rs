//! One tenant's learning work never delays another's: a tenant holding 10,000 incidents that polls its
//! graduation does not hold up another tenant's failed-run ends, and incidents older than the 30-day
//! window cost a graduation nothing.
//!
//! The figures are printed (`cargo test -p runguard-node --test it learning_isolation -- --nocapture`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use runguard_contract::{Incident, IncidentId, PatternId, RunId, Signature, StepError, TenantId};
use runguard_node::actors::learning::{CommitRunEnd, IncidentDraft, Learning, TenantGraduation};
use runguard_node::actors::writer::Writer;
use runguard_node::config::Config;
use runguard_node::shared::{Shared, now};
use runguard_store::{Store, StoreOptions, WriteBatch};

const DAY_MS: i64 = 86_400_000;

/// The store and the learning actor over it.
struct Node {
    store: Arc<Store>,
    learning: actix::Addr<Learning>,
}

impl Node {
    async fn learn<M>(&self, msg: M) -> Result<M::Result, actix::MailboxError>
    where
        M: actix::Message + Send + 'static,
        M::Result: Send,
        Learning: actix::Handler<M>,
    {
        self.learning.send(msg).await
    }
}

fn start() -> (tempfile::TempDir, Arc<Node>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), &StoreOptions { fsync: false, ..StoreOptions::default() }).unwrap());
    let writer = actix::Actor::start(Writer::new(Arc::clone(&store), 256, 1024));
    let shared = Arc::new(Shared::new(Arc::clone(&store), writer.recipient(), Config::default()));
    let (learning, _arbiter) = Learning::start_dedicated(shared);
    (dir, Arc::new(Node { store, learning }))
}

/// `count` incidents of `tenant`, created `age_ms` ago (one millisecond apart), in one commit.
fn fill(store: &Store, tenant: &TenantId, count: u32, age_ms: i64, salt: u128) {
    let signature = Signature::normalize(Some("fetch"), Some("/v1/items/1"), &[]);
    let base = now().plus_millis(-age_ms);
    let mut batch = WriteBatch::new();
    for i in 0..count {
        batch.put_incident(Incident {
            id: IncidentId::from_u128((salt << 64) + u128::from(i)),
            tenant_id: tenant.clone(),
            run_id: RunId::new(format!("old-{i}")).unwrap(),
            signature_hash: signature.hash(),
            signature: signature.clone(),
            error: StepError::default(),
            pattern_id: PatternId::from_u128(1),
            created_at: base.plus_millis(i64::from(i)),
        });
    }
    store.commit(batch).unwrap();
}

fn draft(tenant: &TenantId, n: usize) -> IncidentDraft {
    IncidentDraft {
        tenant: tenant.clone(),
        run_id: RunId::new(format!("end-{n}")).unwrap(),
        signature: Signature::normalize(Some("charge"), Some("/v1/pay"), &[]),
        error: StepError { error_type: Some("timeout".into()), ..StepError::default() },
    }
}

async fn graduation_ms(shared: &Arc<Node>, tenant: &TenantId) -> f64 {
    let started = Instant::now();
    shared.learn(TenantGraduation { tenant: tenant.clone() }).await.unwrap().unwrap();
    started.elapsed().as_secs_f64() * 1000.0
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[actix_rt::test]
async fn a_tenant_polling_graduation_over_many_incidents_does_not_delay_another_tenants_run_ends() {
    let (_dir, shared) = start();
    let (big, small) = (TenantId::new("big").unwrap(), TenantId::new("small").unwrap());
    fill(&shared.store, &big, 10_000, DAY_MS, 1);
    let one_graduation = graduation_ms(&shared, &big).await;

    // `big` keeps four graduation requests in flight while `small` ends failed runs one after another.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut pollers = Vec::new();
    for _ in 0..4 {
        let (shared, big, stop) = (Arc::clone(&shared), big.clone(), Arc::clone(&stop));
        pollers.push(actix_rt::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                shared.learn(TenantGraduation { tenant: big.clone() }).await.unwrap().unwrap();
            }
        }));
    }
    actix_rt::time::sleep(Duration::from_millis(20)).await;
    let mut ends = Vec::new();
    for n in 0..10 {
        let started = Instant::now();
        let incident = shared
            .learn(CommitRunEnd { batch: WriteBatch::new(), incident: Some(draft(&small, n)) })
            .await
            .unwrap()
            .unwrap();
        assert!(incident.is_some());
        ends.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for poller in pollers {
        poller.await.unwrap();
    }
    let end_median = median(ends.clone());
    eprintln!(
        "learning isolation: one graduation of a tenant with 10k incidents {one_graduation:.1} ms; \
         another tenant's failed-run end while it polls: median {end_median:.1} ms, max {:.1} ms",
        ends.iter().copied().fold(0.0, f64::max)
    );
    // Queued behind the other tenant's graduations, an end would wait for at least one of them.
    assert!(
        end_median * 3.0 < one_graduation,
        "another tenant's run end took {end_median:.1} ms (median) while one graduation takes {one_graduation:.1} ms"
    );
}

#[actix_rt::test]
async fn incidents_older_than_the_window_cost_a_graduation_nothing() {
    let (_dir, shared) = start();
    let (old, fresh) = (TenantId::new("old").unwrap(), TenantId::new("fresh").unwrap());
    fill(&shared.store, &old, 10_000, 40 * DAY_MS, 1);
    fill(&shared.store, &old, 3, DAY_MS, 2);
    fill(&shared.store, &fresh, 3, DAY_MS, 3);
    // Warm both up (the first reads of a tree cost more), then compare medians.
    graduation_ms(&shared, &old).await;
    graduation_ms(&shared, &fresh).await;
    let mut with_history = Vec::new();
    let mut without = Vec::new();
    for _ in 0..5 {
        with_history.push(graduation_ms(&shared, &old).await);
        without.push(graduation_ms(&shared, &fresh).await);
    }
    let (with_history, without) = (median(with_history), median(without));
    eprintln!(
        "graduation window: 3 recent + 10k incidents older than 30 days {with_history:.2} ms; 3 recent only {without:.2} ms"
    );
    assert!(
        with_history < without * 5.0 + 5.0,
        "10k incidents outside the window made a graduation take {with_history:.2} ms instead of {without:.2} ms"
    );
}
