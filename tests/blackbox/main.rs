//! Black-box tests of the `runguard` binary: every test starts real nodes on loopback ports with
//! temporary data directories and drives them over HTTP or the command line only.

mod contract;
mod fixtures;
mod harness;

mod auth;
mod bad_input;
mod cli;
mod concurrency;
mod corruption;
mod faults;
mod http_edge;
mod isolation;
mod learning;
mod learning_loop;
mod noisy_neighbour;
mod openapi;
mod ops;
mod overload;
mod policies;
mod policy_docs;
mod prevention_contract;
mod records;
mod restart;
mod runs;
mod security;
mod semantics;
mod soak;
