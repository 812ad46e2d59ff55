//! Integration tests of runguard-store: one binary, modules inside.

mod crash;
mod fixtures;
mod state_machine;
