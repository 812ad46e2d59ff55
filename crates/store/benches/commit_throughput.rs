//! Group-commit throughput (filled in below).
fn main() {}
