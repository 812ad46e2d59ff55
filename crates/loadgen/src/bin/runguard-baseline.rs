//! The load generator's baselines: trivial actix-web endpoints that read the request body and answer a
//! fixed small JSON object on every path, with the node's default number of HTTP workers, so that
//! `runguard-load` can drive them with exactly the request mix it sends to the node.
//!
//! With `--durable DIR` the endpoint answers only after the request's body is appended to a file in `DIR`
//! and made durable with `fdatasync`, by one writer thread that commits whatever arrived while the last
//! `fdatasync` ran as one group, the node's commit discipline with nothing else around it. It is the
//! fastest a durable answer can be on this machine with this HTTP stack: what the disk's `fdatasync`
//! rate, one write per group and the thread hand-offs allow.
//!
//! With `--durable-sled DIR` the same writer inserts each body into a sled database in `DIR` instead
//! (the store's `SledFloor`: one `apply_batch` per group, then sled's flush and an `fdatasync` of its
//! file, as the node's store makes a commit durable): the fastest a durable answer can be on sled, with one small write per request and
//! nothing of runguard's checks, encodings or indexes; `--sled-keys N` writes the body under N keys.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc;

use actix_web::{App, HttpResponse, HttpServer, web};
use clap::Parser;
use runguard_store::SledFloor;
use tokio::sync::oneshot;

/// Command line.
#[derive(Debug, Parser)]
#[command(about = "Trivial actix-web endpoints: the baselines of runguard-load")]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// HTTP worker threads (the node's default is 2).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Answer only after the body is appended to a file in this directory and `fdatasync`ed.
    #[arg(long, conflicts_with = "durable_sled")]
    durable: Option<PathBuf>,
    /// Answer only after the body is inserted into a sled database in this directory, flushed and
    /// `fdatasync`ed.
    #[arg(long)]
    durable_sled: Option<PathBuf>,
    /// With `--durable-sled`: sled keys written per request (the body under each), e.g. 8 for what a
    /// block writes (ledger entry, run, live listing, record, four record indexes).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    sled_keys: u64,
}

/// Where a group of bodies is made durable.
trait Sink: Send {
    fn append(&mut self, bodies: &[Append]) -> std::io::Result<()>;
}

/// An append-only file: one `write` and one `fdatasync` per group.
struct LogFile {
    file: File,
    buffer: Vec<u8>,
}

impl Sink for LogFile {
    fn append(&mut self, bodies: &[Append]) -> std::io::Result<()> {
        self.buffer.clear();
        for (body, _) in bodies {
            self.buffer.extend_from_slice(&(body.len() as u64).to_le_bytes());
            self.buffer.extend_from_slice(body);
        }
        self.file.write_all(&self.buffer)?;
        self.file.sync_data()
    }
}

/// A sled tree keyed by arrival, each body under `copies` keys: the store's [`SledFloor`].
struct SledTree {
    floor: SledFloor,
    copies: u64,
}

impl Sink for SledTree {
    fn append(&mut self, bodies: &[Append]) -> std::io::Result<()> {
        self.floor.append(bodies.iter().map(|(body, _)| body.as_ref()), self.copies).map_err(std::io::Error::other)
    }
}

/// A body to append, and where to say whether it is durable.
type Append = (web::Bytes, oneshot::Sender<bool>);

const ANSWER: &str = r#"{"action":"allow"}"#;

async fn answer(body: web::Bytes) -> HttpResponse {
    // Touch the body so that it is read like the node reads it.
    let _ = body.len();
    HttpResponse::Ok().content_type("application/json").body(ANSWER)
}

async fn answer_durably(body: web::Bytes, log: web::Data<mpsc::Sender<Append>>) -> HttpResponse {
    let (done, durable) = oneshot::channel();
    if log.send((body, done)).is_err() {
        return HttpResponse::ServiceUnavailable().finish();
    }
    match durable.await {
        Ok(true) => HttpResponse::Ok().content_type("application/json").body(ANSWER),
        _ => HttpResponse::ServiceUnavailable().finish(),
    }
}

/// Makes each group of bodies (whatever arrived while the last group was made durable) durable in
/// `sink`, then answers the group.
fn group_commit(sink: &mut dyn Sink, appends: &mpsc::Receiver<Append>) {
    let mut waiting = Vec::new();
    while let Ok(first) = appends.recv() {
        waiting.push(first);
        waiting.extend(appends.try_iter());
        let durable = sink.append(&waiting).is_ok();
        for (_, done) in waiting.drain(..) {
            let _ = done.send(durable);
        }
    }
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let sink: Option<Box<dyn Sink>> = match (&args.durable, &args.durable_sled) {
        (Some(dir), _) => {
            std::fs::create_dir_all(dir)?;
            let file = OpenOptions::new().create(true).append(true).open(dir.join("baseline.log"))?;
            Some(Box::new(LogFile { file, buffer: Vec::new() }))
        }
        (None, Some(dir)) => {
            let floor = SledFloor::open(dir).map_err(std::io::Error::other)?;
            Some(Box::new(SledTree { floor, copies: args.sled_keys }))
        }
        (None, None) => None,
    };
    let log = match sink {
        Some(mut sink) => {
            let (sender, appends) = mpsc::channel();
            std::thread::Builder::new()
                .name("group-commit".into())
                .spawn(move || group_commit(sink.as_mut(), &appends))?;
            Some(web::Data::new(sender))
        }
        None => None,
    };
    actix_rt::System::new().block_on(async move {
        let server = HttpServer::new(move || match &log {
            Some(log) => App::new().app_data(log.clone()).default_service(web::to(answer_durably)),
            None => App::new().default_service(web::to(answer)),
        })
        .workers(args.workers.max(1))
        .bind(&args.listen)?;
        for addr in server.addrs() {
            println!("baseline listening on http://{addr}");
        }
        server.run().await
    })
}
