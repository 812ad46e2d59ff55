//! The node's Prometheus metric families in one place: their help texts, the buckets that make latencies
//! true histograms (summaries cannot be aggregated across nodes and read 0 when idle), and the counters
//! that exist from the start at zero, so that a dashboard or an alert never sees a family appear only at
//! its first event.

use metrics::{describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

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
/// one series per run). On every request: the labels are static where they can be.
pub fn record_request(method: &actix_web::http::Method, route: String, status: u16, elapsed: std::time::Duration) {
    let method = static_method(method);
    metrics::counter!("runguard_http_requests_total", "method" => method, "route" => route.clone(), "status" => status.to_string())
        .increment(1);
    metrics::histogram!("runguard_http_request_seconds", "method" => method, "route" => route)
        .record(elapsed.as_secs_f64());
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
