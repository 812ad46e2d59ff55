//! `runguard serve`: open the store, start the writer, the registry and the HTTP server; shut down in
//! order (stop accepting, finish in-flight calls, drain the writer, flush, exit).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use actix::prelude::*;
use actix_web::{App, HttpServer, web};
use anyhow::Context as _;
use metrics_exporter_prometheus::PrometheusBuilder;
use runguard_store::{Store, StoreOptions};

use crate::actors::learning::Learning;
use crate::actors::registry::Registry;
use crate::actors::writer::{Drain, Writer};
use crate::auth::Authenticator;
use crate::config::Config;
use crate::http::{self, AppState};
use crate::shared::Shared;

/// Runs the node until SIGINT or SIGTERM.
pub fn serve(config: Config) -> anyhow::Result<()> {
    actix_rt::System::new().block_on(run(config))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let addr = config.listen_addr()?;
    if config.dev_mode() {
        tracing::warn!(
            listen = %addr,
            "no [[tokens]] configured: AUTHENTICATION IS OFF (development mode: loopback only, tenant `default`, admin role)"
        );
    }
    let store = Arc::new(
        Store::open(
            &config.data_dir,
            &StoreOptions { cache_capacity_bytes: config.store_cache_bytes, ..StoreOptions::default() },
        )
        .with_context(|| format!("cannot open the store in `{}`", config.data_dir.display()))?,
    );
    let (next_seq, _) = store.chain_head().context("cannot read the record chain head")?;
    tracing::info!(data_dir = %config.data_dir.display(), records = next_seq.saturating_sub(1), "store open");
    let metrics = PrometheusBuilder::new().install_recorder().ok();

    let (writer, writer_arbiter) =
        Writer::new(Arc::clone(&store), config.limits.writer_batch, config.limits.writer_queue).start_dedicated();
    let run_arbiters: Vec<Arbiter> = (0..config.run_arbiters).map(|_| Arbiter::new()).collect();
    let handles = run_arbiters.iter().map(Arbiter::handle).collect();
    let workers = config.http_workers;
    let auth = Authenticator::new(&config.tokens);
    let shared = Arc::new(Shared::new(Arc::clone(&store), writer.clone(), config));
    let (learning, learning_arbiter) = Learning::start_dedicated(Arc::clone(&shared));
    let _ = shared.learning.set(learning);
    let registry = Registry::new(Arc::clone(&shared), handles).start();
    let state =
        web::Data::new(AppState { shared: Arc::clone(&shared), registry, auth, metrics, ready: AtomicBool::new(true) });

    let app_state = state.clone();
    let server = HttpServer::new(move || App::new().app_data(app_state.clone()).configure(http::configure))
        .workers(workers)
        .shutdown_timeout(30)
        .bind(addr)
        .with_context(|| format!("cannot listen on `{addr}`"))?;
    for bound in server.addrs() {
        // Tests and scripts read this line to find the port when listening on port 0.
        println!("runguard listening on http://{bound}");
        tracing::info!(listen = %bound, "listening");
    }
    // actix-web stops accepting on SIGINT/SIGTERM and waits for in-flight requests.
    server.run().await.context("the HTTP server failed")?;

    state.ready.store(false, Ordering::SeqCst);
    tracing::info!("draining the writer");
    if writer.send(Drain).await.is_err() {
        tracing::error!("the writer stopped before draining");
    }
    learning_arbiter.stop();
    let _ = learning_arbiter.join();
    writer_arbiter.stop();
    let _ = writer_arbiter.join();
    for arbiter in run_arbiters {
        arbiter.stop();
        let _ = arbiter.join();
    }
    drop(state);
    drop(shared);
    // The last handle closes the database, which flushes it.
    drop(store);
    tracing::info!("stopped");
    System::current().stop();
    Ok(())
}
