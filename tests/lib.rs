//! Black-box tests of the `runguard` binary.
//!
//! The tests live in `blackbox/` (one integration-test binary, `cargo test -p runguard-tests`). They start
//! the real binary on a loopback port with a temporary data directory and talk to it over HTTP only; see
//! `blackbox/harness.rs` for how nodes are started, stopped and restarted.
