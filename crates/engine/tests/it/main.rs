//! Integration tests of runguard-engine: one binary, one module per concern.

mod budgets;
mod cel_bounds;
mod conflicts;
mod content_skill_pattern;
mod expr_and_errors;
mod order;
mod properties;
mod rates;
mod repeat;
mod run_lifecycle;
mod run_model;
mod support;
mod tenant_periods;
