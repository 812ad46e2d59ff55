//! Engine benchmarks (written with the performance work).
fn main() {}
