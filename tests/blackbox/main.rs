//! Black-box tests of the `runguard` binary: every test starts real nodes on loopback ports with
//! temporary data directories and drives them over HTTP or the command line only.

mod cluster_harness;
mod contract;
mod fixtures;
mod harness;

mod auth;
mod bad_input;
mod cli;
mod cluster;
mod cluster_chaos;
mod cluster_failover;
mod concurrency;
mod corruption;
mod faults;
mod http_edge;
mod isolation;
mod learning;
mod learning_loop;
mod logs;
mod noisy_neighbour;
mod openapi;
mod ops;
mod overload;
mod policies;
mod policy_apply;
mod policy_docs;
mod postgres_store;
mod prevention_contract;
mod readme;
mod records;
mod repeat_rules;
mod restart;
mod run_list;
mod run_tree;
mod runs;
mod security;
mod semantics;
mod soak;
mod tenant_periods;
mod wording;
