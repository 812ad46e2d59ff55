//! `runguard serve`: open the store, start the writer, the registry and the HTTP server; shut down in
//! order (stop accepting, finish in-flight calls, drain the writer, flush, exit).

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::metric_families;
use actix::prelude::*;
use actix_web::dev::Service as _;
use actix_web::http::KeepAlive;
use actix_web::{App, HttpServer, web};
use anyhow::Context as _;
use runguard_store::{Store, StoreOptions};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::signal::unix::{SignalKind, signal};

use crate::actors::learning::Learning;
use crate::actors::registry::{Registry, RunTable};
use crate::actors::writer::{Drain, Writer};
use crate::auth::Authenticator;
use crate::config::{Config, HttpEdge, StoreKind};
use crate::http::metered::AnswerBudget;
use crate::http::{self, AppState};
use crate::shared::Shared;

/// Clients beyond `http.max_connections` wait here until a connection closes.
const LISTEN_BACKLOG: i32 = 1024;
/// The response header naming the node that answered: its `node_id`.
pub const NODE_HEADER: &str = "x-runguard-node";
/// How long in-flight calls may take to finish once shutdown has begun.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Runs the node until SIGINT, SIGTERM or SIGHUP, each of which shuts it down gracefully.
pub fn serve(config: Config) -> anyhow::Result<()> {
    // Bound before anything starts, so that a port in use is a plain error with nothing to unwind.
    let addr = config.listen_addr()?;
    let listener = listen(addr).with_context(|| format!("cannot listen on `{addr}`"))?;
    // Opened outside the async runtime: the PostgreSQL client is sync and drives a runtime of its own,
    // which cannot start inside another.
    let store = Arc::new(open_store(&config)?);
    store.index_snapshot_bindings().context("cannot index the snapshot bindings of stored runs")?;
    let (next_seq, _) = store.chain_head().context("cannot read the record chain head")?;
    tracing::info!(store = store.backend_name(), records = next_seq.saturating_sub(1), "store open");
    actix_rt::System::new().block_on(run(config, listener, store))
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Applies the per-connection socket options of the HTTP edge to a new client connection.
fn on_connect(edge: &HttpEdge, connection: &dyn std::any::Any) {
    let Some(stream) = connection.downcast_ref::<actix_web::rt::net::TcpStream>() else { return };
    if edge.send_timeout_ms > 0 {
        // A client that stops reading leaves its answer in the node's write buffer; the kernel gives up on
        // it after this long (zero-window probes included), which closes the connection and frees it.
        let timeout = Duration::from_millis(edge.send_timeout_ms);
        if let Err(err) = SockRef::from(stream).set_tcp_user_timeout(Some(timeout)) {
            tracing::debug!(error = %err, "cannot set TCP_USER_TIMEOUT on a client connection");
        }
    }
}

/// Resolves at the first SIGINT, SIGTERM or SIGHUP. actix-web's own handling is off: it stops the whole
/// actix system shortly after the HTTP workers, which can stop the writer before it drains, and it
/// treats SIGINT as a forced stop. SIGHUP (a closed terminal) would otherwise kill the node undrained.
async fn shutdown_signal() -> &'static str {
    let mut streams = Vec::new();
    for (kind, name) in
        [(SignalKind::terminate(), "SIGTERM"), (SignalKind::interrupt(), "SIGINT"), (SignalKind::hangup(), "SIGHUP")]
    {
        match signal(kind) {
            Ok(stream) => streams.push((stream, name)),
            Err(err) => tracing::warn!(signal = name, error = %err, "cannot handle the signal"),
        }
    }
    if streams.is_empty() {
        return std::future::pending().await;
    }
    let waits = streams.iter_mut().map(|(stream, name)| {
        let name: &'static str = name;
        Box::pin(async move {
            stream.recv().await;
            name
        })
    });
    futures_util::future::select_all(waits).await.0
}

/// Opens the configured backend: sled under `data_dir`, or PostgreSQL at `postgres_url` (migrating an
/// older schema; a newer one is refused). Messages show the URL with its password masked.
pub fn open_store(config: &Config) -> anyhow::Result<Store> {
    open_store_with(config, &config.pg_options())
}

/// As [`open_store`], with these PostgreSQL options (the read-only commands never migrate).
pub fn open_store_with(config: &Config, pg: &runguard_store::PgOptions) -> anyhow::Result<Store> {
    match (config.store, &config.postgres_url) {
        (StoreKind::Postgres, Some(url)) => {
            Store::open_postgres(url.expose(), pg).with_context(|| format!("cannot open the postgres store at `{url}`"))
        }
        (StoreKind::Postgres, None) => anyhow::bail!("`store` = `postgres` needs `postgres_url`"),
        (StoreKind::Sled, _) => Store::open(
            &config.data_dir,
            &StoreOptions { cache_capacity_bytes: config.store_cache_bytes, ..StoreOptions::default() },
        )
        .with_context(|| format!("cannot open the store in `{}`", config.data_dir.display())),
    }
}

async fn run(config: Config, listener: TcpListener, store: Arc<Store>) -> anyhow::Result<()> {
    let node_id = config.node_id.clone();
    let addr = listener.local_addr().context("the listening socket has no address")?;
    if config.dev_mode() {
        tracing::warn!(
            listen = %addr,
            "no [[tokens]] configured: AUTHENTICATION IS OFF (development mode: loopback only, tenant `default`, admin role)"
        );
    }
    let metrics = match metric_families::install() {
        Ok(handle) => Some(handle),
        Err(err) => {
            // A second node in one process (tests) finds the recorder installed; the first one serves it.
            tracing::warn!(error = %err, "metrics are not recorded by this node");
            None
        }
    };
    crate::telemetry::announce(&config.node_id);

    let (writer, writer_arbiter) =
        Writer::new(Arc::clone(&store), config.limits.writer_batch, config.limits.writer_queue).start_dedicated();
    let run_arbiters: Vec<Arbiter> = (0..config.run_arbiters).map(|_| Arbiter::new()).collect();
    let handles = run_arbiters.iter().map(Arbiter::handle).collect();
    let workers = config.http_workers;
    let edge = config.http.clone();
    let auth = Authenticator::new(&config.tokens);
    // Collaborators are passed in, lowest layer first: the writer's commit handle to the shared context,
    // the learning loop to the registry (for its run actors), and all of them to the HTTP state.
    let shared = Arc::new(Shared::new(Arc::clone(&store), writer.clone().recipient(), config));
    let (learning, learning_arbiter) = Learning::start_dedicated(Arc::clone(&shared));
    let runs = Arc::new(RunTable::default());
    let registry = Registry::new(Arc::clone(&shared), Arc::clone(&runs), learning.clone().recipient(), handles).start();
    let state = web::Data::new(AppState {
        shared: Arc::clone(&shared),
        registry,
        runs,
        learning,
        auth,
        metrics,
        ready: AtomicBool::new(true),
        openapi: crate::openapi::rendered(),
    });

    let app_state = state.clone();
    let connect_edge = edge.clone();
    let keep_alive = match edge.keep_alive_ms {
        0 => KeepAlive::Disabled,
        ms => KeepAlive::Timeout(Duration::from_millis(ms)),
    };
    let budget = AnswerBudget::new(edge.answer_budget_bytes);
    // Which node answered, for operators and tests behind a load balancer (`deploy/README.md`).
    let identity = node_id.clone();
    let server = HttpServer::new(move || {
        let budget = Arc::clone(&budget);
        App::new()
            .app_data(app_state.clone())
            .wrap_fn(move |request, service| {
                let answer = service.call(request);
                let budget = Arc::clone(&budget);
                async move { Ok(budget.meter(answer.await?)) }
            })
            .wrap_fn(|request, service| {
                let (started, method) = (Instant::now(), request.method().clone());
                let answer = service.call(request);
                async move {
                    let answer = answer.await?;
                    let route = answer.request().match_pattern().unwrap_or_else(|| "unmatched".to_owned());
                    metric_families::record_request(&method, route, answer.status().as_u16(), started.elapsed());
                    Ok(answer)
                }
            })
            .wrap(actix_web::middleware::from_fn(http::access_log::log))
            .wrap(actix_web::middleware::DefaultHeaders::new().add((NODE_HEADER, identity.clone())))
            .configure(http::configure)
    })
    .workers(workers)
    // actix counts connections per worker.
    .max_connections(edge.max_connections.div_ceil(workers).max(1))
    .keep_alive(keep_alive)
    .client_request_timeout(Duration::from_millis(edge.request_head_timeout_ms))
    .client_disconnect_timeout(Duration::from_millis(edge.disconnect_timeout_ms))
    .on_connect(move |connection, _| on_connect(&connect_edge, connection))
    .shutdown_timeout(SHUTDOWN_GRACE.as_secs())
    .disable_signals()
    .listen(listener)
    .with_context(|| format!("cannot serve on `{addr}`"))?;
    for bound in server.addrs() {
        // Tests and scripts read this line to find the port when listening on port 0. A closed standard
        // output loses the line and nothing else.
        let _ = writeln!(std::io::stdout(), "runguard listening on http://{bound}");
        tracing::info!(listen = %bound, "listening");
    }
    let server = server.run();
    let handle = server.handle();
    actix_rt::spawn(async move {
        let signal = shutdown_signal().await;
        tracing::info!(signal, "shutting down: no new connections; finishing in-flight calls");
        handle.stop(true).await;
    });
    server.await.context("the HTTP server failed")?;

    state.ready.store(false, Ordering::SeqCst);
    tracing::info!("draining the writer");
    // The writer answers only after committing everything queued, so the store holds every
    // acknowledged call before the process exits.
    match writer.send(Drain).await {
        Ok(()) => tracing::info!("writer drained"),
        Err(err) => {
            tracing::error!(error = %err, "the writer stopped before draining; calls it held were not acknowledged")
        }
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
