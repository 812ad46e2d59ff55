//! Structured logs with `tracing`: text or JSON lines on standard error, written by a thread of their
//! own so that a request never waits for a `write` of its access-log line.

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// actix-http logs a request it cannot parse (a garbage request line, a bad `Content-Length`, a NUL in a
/// header) or a connection the client broke at ERROR, after answering it inside its codec. That is the
/// client's fault, not the node's, and tracing events cannot be re-levelled: they are silenced unless a
/// `RUST_LOG` filter names `actix_http` itself (e.g. `RUST_LOG=info,actix_http=trace`).
const CLIENT_FAULTS: &str = "actix_http::h1::dispatcher=off";

/// Lines waiting for the log thread; past this the logging call waits (no line is dropped).
const BUFFERED_LINES: usize = 16_384;

/// Installs the global subscriber once; `RUST_LOG` overrides the configured level. Keep the guard until
/// the process ends: dropping it writes out the lines still buffered.
#[must_use = "dropping the guard stops the log thread"]
pub fn init(format: LogFormat, level: &str) -> WorkerGuard {
    let from_env = std::env::var("RUST_LOG").ok().filter(|filter| !filter.trim().is_empty());
    let names_actix_http = from_env.as_deref().is_some_and(|filter| filter.contains("actix_http"));
    let filter = from_env.and_then(|filter| EnvFilter::try_new(filter).ok()).unwrap_or_else(|| EnvFilter::new(level));
    let filter = match CLIENT_FAULTS.parse() {
        Ok(directive) if !names_actix_http => filter.add_directive(directive),
        _ => filter,
    };
    // A closed standard error (`runguard serve 2>&1 | head`) loses the log lines; reporting that failure
    // on the same closed stream would panic.
    // Colour codes only for a terminal: in a file or a log collector they are noise.
    let (writer, guard) =
        NonBlockingBuilder::default().lossy(false).buffered_lines_limit(BUFFERED_LINES).finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(writer)
        .with_target(false)
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    guard
}
