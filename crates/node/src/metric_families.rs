//! The node's Prometheus metric families in one place: their help texts, the buckets that make latencies
//! true histograms (summaries cannot be aggregated across nodes and read 0 when idle), and the counters
//! that exist from the start at zero, so that a dashboard or an alert never sees a family appear only at
//! its first event.

use std::cell::{OnceCell, RefCell};
use std::collections::HashMap;

use metrics::{Counter, Histogram, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use runguard_contract::Action;

/// Engine evaluation: microseconds for budgets, up to tens of milliseconds for CEL over large texts.
const EVALUATION_BUCKETS: [f64; 12] =
    [0.000_001, 0.000_002_5, 0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.001, 0.005, 0.025, 0.1];
/// Group commits and HTTP requests: a fsync is about a millisecond on a good disk.
const LATENCY_BUCKETS: [f64; 12] =
    [0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5];
/// Calls per group commit, up to the default `limits.writer_batch` of 1,024.
const BATCH_BUCKETS: [f64; 11] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

/// Every reason `runguard_refused_calls_total` counts (see `docs/operations.md`).
pub const REFUSAL_REASONS: [&str; 9] = [
    "order",
    "step_limit",
    "run_busy",
    "timeout",
    "live_runs",
    "body_timeout",
    "answer_budget",
    "commit_timeout",
    "tenant_busy",
];

/// Installs the Prometheus recorder with the node's buckets, help texts and zeroed counters.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full("runguard_evaluation_seconds".into()), &EVALUATION_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full("runguard_writer_commit_seconds".into()), &LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full("runguard_http_request_seconds".into()), &LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full("runguard_writer_batch_size".into()), &BATCH_BUCKETS)?
        .install_recorder()?;
    describe();
    zero();
    Ok(handle)
}

fn describe() {
    describe_counter!("runguard_decisions_total", "Decisions answered, by action.");
    describe_histogram!("runguard_evaluation_seconds", "Engine evaluation time of one step call, in seconds.");
    describe_counter!("runguard_prevention_records_total", "Prevention records written.");
    describe_counter!("runguard_shadow_would_block_total", "Blocks that shadow policies would have made.");
    describe_counter!("runguard_fail_open_total", "Policies skipped because they failed with on_error allow.");
    describe_counter!("runguard_throttles_total", "Step calls answered throttle.");
    describe_histogram!("runguard_writer_batch_size", "Calls committed together by one group commit.");
    describe_histogram!("runguard_writer_commit_seconds", "Group commit time: transaction, flush and fdatasync.");
    describe_counter!("runguard_writer_commit_failures_total", "Group commits that failed to write.");
    describe_counter!("runguard_writer_abandoned_total", "Commits dropped because their caller had given up.");
    describe_gauge!("runguard_live_runs", "Run actors in memory.");
    describe_counter!("runguard_refused_calls_total", "Calls refused before evaluation, by reason.");
    describe_counter!(
        "runguard_tenant_total_reevaluations_total",
        "Step calls evaluated again because the tenant's shared totals moved before their commit."
    );
    describe_counter!(
        "runguard_family_total_reevaluations_total",
        "Step calls of a run family evaluated again because another node committed to the family before their commit."
    );
    describe_counter!("runguard_http_requests_total", "HTTP requests answered, by method, route and status.");
    describe_histogram!("runguard_http_request_seconds", "HTTP request time, by method and route, in seconds.");
}

fn zero() {
    for action in ["allow", "warn", "throttle", "block"] {
        metrics::counter!("runguard_decisions_total", "action" => action).increment(0);
    }
    for reason in REFUSAL_REASONS {
        metrics::counter!("runguard_refused_calls_total", "reason" => reason).increment(0);
    }
    for name in [
        "runguard_prevention_records_total",
        "runguard_shadow_would_block_total",
        "runguard_fail_open_total",
        "runguard_throttles_total",
        "runguard_writer_commit_failures_total",
        "runguard_writer_abandoned_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    metrics::gauge!("runguard_live_runs").set(0.0);
}

/// Counts one answered HTTP request under its route template (never the raw path, whose ids would make
/// one series per run), through this thread's handle for the series.
pub fn record_request(method: &actix_web::http::Method, route: String, status: u16, elapsed: std::time::Duration) {
    let method = static_method(method);
    with_hot(|hot| {
        let mut requests = hot.requests.borrow_mut();
        let key = (method, status, route);
        if let Some((count, time)) = requests.get(&key) {
            count.increment(1);
            time.record(elapsed.as_secs_f64());
            return;
        }
        let (method, status, route) = key;
        let count = metrics::counter!("runguard_http_requests_total", "method" => method, "route" => route.clone(), "status" => status.to_string());
        let time = metrics::histogram!("runguard_http_request_seconds", "method" => method, "route" => route.clone());
        count.increment(1);
        time.record(elapsed.as_secs_f64());
        requests.insert((method, status, route), (count, time));
    });
}

/// A request series: method, status and route template.
type RequestSeries = (&'static str, u16, String);

/// Handles of the series every call touches, taken once per thread. `counter!(name, labels)` finds its
/// series in the recorder on every use (building the key, hashing it, taking a read lock, and for the
/// request series allocating its label values); a handle is the series itself. Per thread, so that the
/// request series need no lock; each thread takes its handles on first use, after the recorder is
/// installed at start (a thread that used them before would keep counting into nothing).
pub struct Hot {
    decisions: [Counter; 4],
    // Histograms are taken at their first sample: a histogram series shows in a scrape from the moment it
    // is taken, and a family must not show samples that never happened (no evaluation before a step).
    evaluation: OnceCell<Histogram>,
    /// `runguard_prevention_records_total`.
    pub prevention_records: Counter,
    /// `runguard_throttles_total`.
    pub throttles: Counter,
    /// `runguard_shadow_would_block_total`.
    pub shadow_would_block: Counter,
    /// `runguard_fail_open_total`.
    pub fail_open: Counter,
    writer_batch_size: OnceCell<Histogram>,
    writer_commit_seconds: OnceCell<Histogram>,
    /// The request series by method, status and route: bounded by the route table.
    requests: RefCell<HashMap<RequestSeries, (Counter, Histogram)>>,
}

impl std::fmt::Debug for Hot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hot").field("request_series", &self.requests.borrow().len()).finish_non_exhaustive()
    }
}

impl Hot {
    fn register() -> Self {
        let decision = |action: Action| metrics::counter!("runguard_decisions_total", "action" => action.as_str());
        Self {
            decisions: [
                decision(Action::Allow),
                decision(Action::Warn),
                decision(Action::Throttle),
                decision(Action::Block),
            ],
            evaluation: OnceCell::new(),
            prevention_records: metrics::counter!("runguard_prevention_records_total"),
            throttles: metrics::counter!("runguard_throttles_total"),
            shadow_would_block: metrics::counter!("runguard_shadow_would_block_total"),
            fail_open: metrics::counter!("runguard_fail_open_total"),
            writer_batch_size: OnceCell::new(),
            writer_commit_seconds: OnceCell::new(),
            requests: RefCell::new(HashMap::new()),
        }
    }

    /// `runguard_evaluation_seconds`.
    pub fn evaluation(&self) -> &Histogram {
        self.evaluation.get_or_init(|| metrics::histogram!("runguard_evaluation_seconds"))
    }

    /// `runguard_writer_batch_size`.
    pub fn writer_batch_size(&self) -> &Histogram {
        self.writer_batch_size.get_or_init(|| metrics::histogram!("runguard_writer_batch_size"))
    }

    /// `runguard_writer_commit_seconds`.
    pub fn writer_commit_seconds(&self) -> &Histogram {
        self.writer_commit_seconds.get_or_init(|| metrics::histogram!("runguard_writer_commit_seconds"))
    }

    /// `runguard_decisions_total` of `action`.
    pub fn decisions(&self, action: Action) -> &Counter {
        let [allow, warn, throttle, block] = &self.decisions;
        match action {
            Action::Allow => allow,
            Action::Warn => warn,
            Action::Throttle => throttle,
            Action::Block => block,
        }
    }
}

thread_local! {
    static HOT: Hot = Hot::register();
}

/// Runs `f` with this thread's handles.
pub fn with_hot<R>(f: impl FnOnce(&Hot) -> R) -> R {
    HOT.with(f)
}

fn static_method(method: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::HEAD => "HEAD",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use actix_web::http::Method;
    use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

    use super::*;

    /// Counts the series looked up in the recorder.
    #[derive(Default)]
    struct Lookups(Arc<AtomicUsize>);

    impl Recorder for Lookups {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
            self.0.fetch_add(1, Ordering::Relaxed);
            Counter::noop()
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            self.0.fetch_add(1, Ordering::Relaxed);
            Gauge::noop()
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            self.0.fetch_add(1, Ordering::Relaxed);
            Histogram::noop()
        }
    }

    #[test]
    fn a_request_series_is_looked_up_once_per_thread() {
        // A fresh thread: its handles are taken under this test's recorder.
        std::thread::spawn(|| {
            let recorder = Lookups::default();
            let lookups = Arc::clone(&recorder.0);
            metrics::with_local_recorder(&recorder, || {
                let route = || "/v1/runs/{id}/steps".to_owned();
                record_request(&Method::POST, route(), 200, Duration::from_micros(50));
                let first = lookups.load(Ordering::Relaxed);
                for _ in 0..100 {
                    record_request(&Method::POST, route(), 200, Duration::from_micros(50));
                }
                assert_eq!(lookups.load(Ordering::Relaxed), first, "later requests use the handles");
                record_request(&Method::POST, route(), 409, Duration::from_micros(50));
                assert_eq!(lookups.load(Ordering::Relaxed), first + 2, "a new status is a new series");
            });
        })
        .join()
        .unwrap();
    }
}
