//! The `runguard` binary; everything lives in the library.

// With the `jemalloc` feature the node runs on jemalloc: 12 % fewer instructions per durable allow and
// 14 % per block than the system allocator, for about a tenth more memory per idle run; but a tenant
// holding many slow clients stalled another tenant more on it (the noisy-neighbour guard failed once in
// four runs). The default build keeps the system allocator. See `docs/performance.md`, "Issue 16: the
// profile, a write-ahead log, the allocator".
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    runguard_node::cli::main()
}
