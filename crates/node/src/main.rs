//! The `runguard` binary; everything lives in the library.

// With the `jemalloc` feature the node runs on jemalloc (settings in `.cargo/config.toml`): about a fifth
// less CPU per durable allow and a third less per block than the system allocator, for about a tenth
// more memory per idle run, which puts 100,000 idle runs at the 300 MB limit rather than well under it.
// See `docs/performance.md`, "Issue 16: the profile, a write-ahead log, the allocator".
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    runguard_node::cli::main()
}
