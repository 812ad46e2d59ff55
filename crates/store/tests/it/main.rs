//! Integration tests of runguard-store.

mod fixtures;
