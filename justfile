# runguard tasks. Install just with `cargo install just`; every recipe is a plain cargo command too.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Run the node with its embedded default store (sled in ./runguard-data).
run *ARGS:
    cargo run --release -p runguard-node --bin runguard -- serve {{ARGS}}

# The test command of README.md: the Rust tests, then the Python SDK's (venv under target/py).
test:
    cargo xtask test

# Only the Python SDK's tests (clients/python, examples/python) against a freshly built node.
test-python:
    cargo xtask test-python

# Deeper property testing.
test-slow:
    PROPTEST_CASES=2048 cargo test --workspace --release

# Formatting check and clippy with warnings as errors.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
    cargo clippy -p runguard-node --features jemalloc -- -D warnings

fmt:
    cargo fmt --all

# Engine criterion benchmarks (medians go into docs/performance.md).
bench:
    cargo bench -p runguard-engine --bench evaluate

# Engine beside cedar-policy and regorus (internal crate, outside CI).
bench-peers:
    cd bench/peers && cargo bench --bench peers

# Node load generator against a bare actix-web baseline (both started by it, on 127.0.0.1, bounded).
# Extra arguments go to `runguard-load http`, e.g. `just load --scenario allow --repeats 5`.
load *ARGS:
    cargo build --release -p runguard-node -p runguard-loadgen
    cargo run --release -p runguard-loadgen --bin runguard-load -- http {{ARGS}}

# The node on sled and on a private PostgreSQL side by side, with PostgreSQL's CPU per request
# (docs/performance.md, "The node on PostgreSQL beside sled"). Needs the Debian postgresql package.
load-postgres:
    cargo build --release -p runguard-node -p runguard-loadgen
    cargo run --release -p runguard-loadgen --bin runguard-load -- http --scenario allow,block --store sled,postgres --duration-s 6 --repeats 3 --block-runs 10000

# Three release nodes, nginx and PostgreSQL on this machine: CPU and commits per request
# (docs/scaling.md). RUNS STEPS CONNECTIONS.
cluster-measure RUNS="3000" STEPS="10" CONNECTIONS="48":
    cargo build --release -p runguard-node -p runguard-loadgen
    deploy/measure-cluster.sh {{RUNS}} {{STEPS}} {{CONNECTIONS}}

# RSS of the node holding 100,000 idle live runs.
mem *ARGS:
    cargo build --release -p runguard-node -p runguard-loadgen
    cargo run --release -p runguard-loadgen --bin runguard-load -- mem {{ARGS}}

# Time to ready after a restart over a store holding 1,000,000 records (filled once under target/loadgen).
restart-time *ARGS:
    cargo build --release -p runguard-node -p runguard-loadgen
    cargo run --release -p runguard-loadgen --bin runguard-load -- restart {{ARGS}}

# Bounded cargo-fuzz runs of every target (FUZZ_SECS each, default 60) on the nightly toolchain;
# installs cargo-fuzz if missing. Crashes land in fuzz/artifacts/<target>/ (see docs/reliability.md).
fuzz:
    command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
    cd fuzz && for target in $(cargo +nightly fuzz list); do echo "== $target (${FUZZ_SECS:-60} s)"; cargo +nightly fuzz run "$target" -- -max_total_time="${FUZZ_SECS:-60}" -rss_limit_mb=2048; done

# Crash soak: SIGKILL the node at random moments under load, KILLS times (release build; the normal test
# run does 3). Replay a failure with RUNGUARD_SOAK_SEED=<printed seed>.
soak KILLS="200":
    RUNGUARD_SOAK_KILLS={{KILLS}} cargo test --release -p runguard-tests --test blackbox soak::crash_soak -- --exact --nocapture

# Overload: CLIENTS concurrent callers for SECS seconds against a node with small limits (release build).
overload SECS="60" CLIENTS="256":
    RUNGUARD_OVERLOAD_SECS={{SECS}} RUNGUARD_OVERLOAD_CLIENTS={{CLIENTS}} cargo test --release -p runguard-tests --test blackbox overload:: -- --nocapture

# Noisy neighbours: one tenant floods each hostile pattern while another's p99 is measured (run alone).
neighbours SECS="2":
    RUNGUARD_NEIGHBOUR_SECS={{SECS}} cargo test -p runguard-tests --test blackbox noisy_neighbour -- --ignored --test-threads=1 --nocapture

# Dependency policy: advisories, licenses and the architectural bans in deny.toml.
deny:
    command -v cargo-deny >/dev/null || cargo install cargo-deny --locked
    cargo deny check

# The whole CI script.
ci:
    bash .ci/run

# Schemathesis (pinned, in its own venv under target/) against a node with a token on loopback: every
# documented operation with `--checks all`, then the stateful phase that follows the document's links.
# Not in CI; the last result is quoted in docs/api.md. MAX is schemathesis' `--max-examples`.
api-fuzz MAX="25":
    #!/usr/bin/env bash
    set -euo pipefail
    cargo build -p runguard-node --bin runguard
    venv=target/api-fuzz/venv
    [ -x "$venv/bin/schemathesis" ] || { python3 -m venv "$venv" && "$venv/bin/pip" install -q "schemathesis==4.32.5"; }
    work=$(mktemp -d)
    node=""
    trap '[ -n "$node" ] && kill "$node" 2>/dev/null; rm -rf "$work"' EXIT
    secret=fuzz-admin-secret
    printf '[[tokens]]\nname = "fuzz"\ntenant = "fuzz"\nrole = "admin"\nsha256 = "%s"\n' \
        "$(printf %s "$secret" | sha256sum | cut -d' ' -f1)" > "$work/runguard.toml"
    target/debug/runguard serve --listen 127.0.0.1:0 --data "$work/data" --config "$work/runguard.toml" \
        > "$work/stdout" 2> "$work/node.log" &
    node=$!
    for _ in $(seq 100); do grep -q 'listening on' "$work/stdout" && break; sleep 0.1; done
    base=$(sed -n 's/^runguard listening on //p' "$work/stdout" | head -n1)
    # Run from target/api-fuzz, where schemathesis keeps its cache (`.schemathesis/`) and report.
    cd target/api-fuzz
    venv/bin/schemathesis run "$base/openapi.json" --url "$base" --checks all \
        --header "Authorization: Bearer $secret" --max-examples "{{MAX}}" --seed 1 \
        --report junit --report-dir report

# Cluster chaos: three nodes on one PostgreSQL behind nginx (deploy/nginx/runguard.conf), random SIGKILL
# and restart of a node under load for SECS seconds (default 180), then every acknowledged decision checked
# and `runguard verify` (docs/reliability.md). Needs postgresql and nginx-light. Replay a kill schedule with
# RUNGUARD_CLUSTER_CHAOS_SEED=<printed seed>.
cluster-soak SECS="180":
    RUNGUARD_TEST_STORE=postgres RUNGUARD_CLUSTER_CHAOS_SECS={{SECS}} cargo test -p runguard-tests --test blackbox cluster_chaos -- --nocapture
