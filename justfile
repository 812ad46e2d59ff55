# runguard tasks. Install just with `cargo install just`; every recipe is a plain cargo command too.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Run the node with its embedded default store (sled in ./runguard-data).
run *ARGS:
    cargo run --release -p runguard-node --bin runguard -- serve {{ARGS}}

# The test command of README.md.
test:
    cargo test --workspace

# Deeper property testing.
test-slow:
    PROPTEST_CASES=2048 cargo test --workspace --release

# Formatting check and clippy with warnings as errors.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

fmt:
    cargo fmt --all

# Engine criterion benchmarks (medians go into docs/performance.md).
bench:
    cargo bench -p runguard-engine --bench evaluate

# Engine beside cedar-policy and regorus (internal crate, outside CI).
bench-peers:
    @echo "the peer benchmark crate lands with the performance issue" && exit 1

# Node load generator against a bare actix-web baseline.
load:
    @echo "the load generator lands with the performance issue" && exit 1

# Bounded cargo-fuzz runs of every target.
fuzz:
    @echo "fuzz targets land with the reliability issue" && exit 1

# Dependency policy: advisories, licenses and the architectural bans in deny.toml.
deny:
    command -v cargo-deny >/dev/null || cargo install cargo-deny --locked
    cargo deny check

# The whole CI script.
ci:
    bash .ci/run
