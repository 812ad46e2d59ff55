//! Integration tests of runguard-store: one binary, modules inside.

mod crash;
mod fence_cost;
mod fixtures;
mod on_postgres;
mod state_machine;
mod tenant_usage;
