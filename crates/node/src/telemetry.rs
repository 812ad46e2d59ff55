//! Structured logs with `tracing`: text or JSON lines on standard error, written by a thread of their
//! own so that a request never waits for a `write` of its access-log line. Every line carries the node's
//! id (`node_id`), so that the logs of a cluster's nodes can be merged and still told apart.

use std::io::{BufWriter, Write};
use std::sync::Arc;
use std::time::Duration;

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::LogFormat;

/// actix-http logs a request it cannot parse (a garbage request line, a bad `Content-Length`, a NUL in a
/// header) or a connection the client broke at ERROR, after answering it inside its codec. That is the
/// client's fault, not the node's, and tracing events cannot be re-levelled: they are silenced unless a
/// `RUST_LOG` filter names `actix_http` itself (e.g. `RUST_LOG=info,actix_http=trace`).
const CLIENT_FAULTS: &str = "actix_http::h1::dispatcher=off";

/// Lines waiting for the log thread; past this the logging call waits (no line is dropped).
const BUFFERED_LINES: usize = 16_384;

/// How long the log thread rests after writing out what it found waiting. Lines arriving meanwhile wait
/// in the channel (at 20,000 lines a second, 100 of them), so that the thread is woken once per batch
/// rather than once per line, and writes each batch with one `write`: a wake-up and a `write` per
/// access-log line cost the node about 3 % of its CPU per allow at full load and 10 % at half load
/// (`docs/performance.md`).
const LOG_PAUSE: Duration = Duration::from_millis(5);

/// The log thread's output: lines gathered in a buffer, written out when the thread has drained the
/// channel (`tracing-appender` flushes its writer then), after which the thread rests for [`LOG_PAUSE`].
struct Paced<W: Write> {
    out: BufWriter<W>,
}

impl<W: Write> Write for Paced<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.out.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let written = self.out.flush();
        std::thread::sleep(LOG_PAUSE);
        written
    }
}

/// Installs the global subscriber once; `RUST_LOG` overrides the configured level. Keep the guard until
/// the process ends: dropping it writes out the lines still buffered.
#[must_use = "dropping the guard stops the log thread"]
pub fn init(format: LogFormat, level: &str, node_id: &str) -> WorkerGuard {
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
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(BUFFERED_LINES)
        .finish(Paced { out: BufWriter::with_capacity(64 * 1024, std::io::stderr()) });
    let writer = Tagged::new(writer, format, node_id);
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

/// Tells the node's metrics who it is: `runguard_node_info{node_id="…"} 1` (call once the recorder is
/// installed), describes the cluster's metrics, and logs the id.
pub fn announce(node_id: &str) {
    metrics::describe_gauge!("runguard_node_info", "This node's identity (`node_id`), always 1.");
    metrics::describe_counter!(
        "runguard_cluster_reloads_total",
        "Runs read back because another node may have changed them, by reason (fenced, refused)."
    );
    metrics::gauge!("runguard_node_info", "node_id" => node_id.to_owned()).set(1.0);
    tracing::info!(node_id, "node identity");
}

/// A log writer that puts the node id into every line: the first field of a JSON object, or a
/// `node_id=…` prefix of a text line. The formatter hands each line over in one write, so the tag is
/// added once per line, without a span entered on every thread.
struct Tagged<W> {
    inner: W,
    tag: Arc<[u8]>,
    json: bool,
}

impl<W> Tagged<W> {
    fn new(inner: W, format: LogFormat, node_id: &str) -> Self {
        let json = matches!(format, LogFormat::Json);
        // The id is checked at load (letters, digits, `.-_:`): nothing in it needs escaping.
        let tag = if json { format!("\"node_id\":\"{node_id}\",") } else { format!("node_id={node_id} ") };
        Self { inner, tag: tag.into_bytes().into(), json }
    }
}

impl<'a, W: MakeWriter<'a>> MakeWriter<'a> for Tagged<W> {
    type Writer = TaggedLine<W::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        TaggedLine { inner: self.inner.make_writer(), tag: Arc::clone(&self.tag), json: self.json }
    }
}

/// One line's writer.
struct TaggedLine<W> {
    inner: W,
    tag: Arc<[u8]>,
    json: bool,
}

impl<W: Write> Write for TaggedLine<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut line = Vec::with_capacity(buf.len() + self.tag.len());
        match buf.split_first() {
            Some((b'{', rest)) if self.json => {
                line.push(b'{');
                line.extend_from_slice(&self.tag);
                line.extend_from_slice(rest);
            }
            _ if self.json => line.extend_from_slice(buf),
            _ => {
                line.extend_from_slice(&self.tag);
                line.extend_from_slice(buf);
            }
        }
        self.inner.write_all(&line)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_thread_writes_a_batch_at_once_when_it_has_drained_the_channel() {
        let mut paced = Paced { out: BufWriter::with_capacity(1024, Vec::new()) };
        paced.write_all(b"first\n").unwrap();
        paced.write_all(b"second\n").unwrap();
        assert!(paced.out.get_ref().is_empty(), "nothing is written before the batch ends");
        paced.flush().unwrap();
        assert_eq!(paced.out.get_ref().as_slice(), b"first\nsecond\n");
    }

    #[test]
    fn every_line_carries_the_node_id() {
        let mut out = Vec::new();
        let mut json = TaggedLine { inner: &mut out, tag: Arc::from(&b"\"node_id\":\"n1\","[..]), json: true };
        json.write_all(b"{\"level\":\"INFO\"}\n").unwrap();
        assert_eq!(out, b"{\"node_id\":\"n1\",\"level\":\"INFO\"}\n");
        let mut out = Vec::new();
        let mut text = TaggedLine { inner: &mut out, tag: Arc::from(&b"node_id=n1 "[..]), json: false };
        text.write_all(b"INFO started\n").unwrap();
        assert_eq!(out, b"node_id=n1 INFO started\n");
    }
}
