//! The node's actors: one per live run, a registry of them, and the single writer.

pub mod registry;
pub mod run;
pub mod writer;
