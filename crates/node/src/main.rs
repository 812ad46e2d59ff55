//! placeholder until the node issue lands
fn main() {}
