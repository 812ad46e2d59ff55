//! The node's actors: one per live run, a registry of them, the single writer, and the learning loop.

pub mod learning;
pub mod registry;
pub mod run;
#[cfg(test)]
mod test_support;
pub mod writer;
