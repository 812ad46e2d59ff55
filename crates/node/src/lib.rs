//! # runguard-node
//!
//! The `runguard` binary: run actors, the group-committing writer, the HTTP API (`docs/api.md`), bearer-token
//! auth, configuration, Prometheus metrics and the command line. The evaluation itself is
//! `runguard-engine`; persistence is `runguard-store`.
//!
//! ```no_run
//! use runguard_node::config::{Config, Overrides};
//!
//! let config = Config::load(None, &Overrides { listen: Some("127.0.0.1:7070".into()), ..Overrides::default() }).unwrap();
//! runguard_node::server::serve(config).unwrap();
//! ```

pub mod actors;
pub mod auth;
pub mod background;
pub mod cli;
pub mod commit;
pub mod config;
pub mod current_snapshots;
pub mod decision_log;
pub mod error;
pub mod http;
pub mod metric_families;
pub mod node_error;
pub mod openapi;
pub mod policy_change;
pub mod run_tree;
pub mod server;
pub mod shared;
pub mod simulation;
pub mod telemetry;
pub mod tenant_lanes;
pub mod tenant_state;
pub mod ticket;
