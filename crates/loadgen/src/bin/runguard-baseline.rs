//! The load generator's baseline: a trivial actix-web endpoint. It reads the request body and answers a
//! fixed small JSON object on every path, with the node's default number of HTTP workers, so that
//! `runguard-load` can drive it with exactly the request mix it sends to the node.

use actix_web::{App, HttpResponse, HttpServer, web};
use clap::Parser;

/// Command line.
#[derive(Debug, Parser)]
#[command(about = "Trivial actix-web endpoint: the baseline of runguard-load")]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// HTTP worker threads (the node's default is 2).
    #[arg(long, default_value_t = 2)]
    workers: usize,
}

async fn answer(body: web::Bytes) -> HttpResponse {
    // Touch the body so that it is read like the node reads it.
    let _ = body.len();
    HttpResponse::Ok().content_type("application/json").body(r#"{"action":"allow"}"#)
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    actix_rt::System::new().block_on(async move {
        let server = HttpServer::new(|| App::new().default_service(web::to(answer)))
            .workers(args.workers.max(1))
            .bind(&args.listen)?;
        for addr in server.addrs() {
            println!("baseline listening on http://{addr}");
        }
        server.run().await
    })
}
