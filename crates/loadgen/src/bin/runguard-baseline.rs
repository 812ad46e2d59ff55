//! The load generator's baselines: trivial actix-web endpoints that read the request body and answer a
//! fixed small JSON object on every path, with the node's default number of HTTP workers, so that
//! `runguard-load` can drive them with exactly the request mix it sends to the node.
//!
//! With `--durable DIR` the endpoint answers only after the request's body is appended to a file in `DIR`
//! and made durable with `fdatasync`, by one writer thread that commits whatever arrived while the last
//! `fdatasync` ran as one group, the node's commit discipline with nothing else around it. It is the
//! fastest a durable answer can be on this machine with this HTTP stack: what the disk's `fdatasync`
//! rate, one write per group and the thread hand-offs allow.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc;

use actix_web::{App, HttpResponse, HttpServer, web};
use clap::Parser;
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
    #[arg(long)]
    durable: Option<PathBuf>,
}

/// A body to append, and where to say it is durable.
type Append = (web::Bytes, oneshot::Sender<std::io::Result<()>>);

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
        Ok(Ok(())) => HttpResponse::Ok().content_type("application/json").body(ANSWER),
        _ => HttpResponse::ServiceUnavailable().finish(),
    }
}

/// Appends each group of bodies with one write and one `fdatasync`, then answers the group.
fn group_commit(mut file: File, appends: &mpsc::Receiver<Append>) {
    let mut buffer = Vec::new();
    let mut waiting = Vec::new();
    while let Ok(first) = appends.recv() {
        waiting.push(first);
        waiting.extend(appends.try_iter());
        buffer.clear();
        for (body, _) in &waiting {
            buffer.extend_from_slice(&(body.len() as u64).to_le_bytes());
            buffer.extend_from_slice(body);
        }
        let outcome = file.write_all(&buffer).and_then(|()| file.sync_data());
        for (_, done) in waiting.drain(..) {
            let reply = match &outcome {
                Ok(()) => Ok(()),
                Err(err) => Err(std::io::Error::new(err.kind(), err.to_string())),
            };
            let _ = done.send(reply);
        }
    }
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let log = match &args.durable {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            let file = OpenOptions::new().create(true).append(true).open(dir.join("baseline.log"))?;
            let (sender, appends) = mpsc::channel();
            std::thread::Builder::new().name("group-commit".into()).spawn(move || group_commit(file, &appends))?;
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
