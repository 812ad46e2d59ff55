//! The `runguard` binary; everything lives in the library.

// glibc's allocator was about a fifth of a durable allow's CPU (`malloc_consolidate` and arena locks on
// the writer thread); jemalloc takes a fifth off an allow and a third off a block. Its settings, which
// keep 100,000 idle runs under 300 MB, are in `.cargo/config.toml`; see `docs/performance.md`, "Allocator".
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    runguard_node::cli::main()
}
