//! The `runguard` binary; everything lives in the library.

// jemalloc instead of the system allocator: 12 % fewer instructions per durable allow and 14 % per block
// (glibc's `malloc`, `free` and `realloc` were a fifth of an allow), for about a tenth more memory per
// idle run; its settings (`.cargo/config.toml`) keep 100,000 idle runs under 300 MB. See
// `docs/performance.md`, "Issue 16: the profile, a write-ahead log, the allocator".
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    runguard_node::cli::main()
}
