//! The `runguard` binary; everything lives in the library.

fn main() -> std::process::ExitCode {
    runguard_node::cli::main()
}
