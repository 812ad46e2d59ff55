//! The `runguard` binary; everything lives in the library.

// With the `jemalloc` feature the node runs on jemalloc; why the default build keeps the system allocator
// is with the feature, in this crate's `Cargo.toml`.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    runguard_node::cli::main()
}
