#!/usr/bin/env bash
# The cost of one decision in a cluster (docs/scaling.md): starts the local cluster (local-cluster.sh) on
# release binaries, drives whole runs through nginx with `runguard-load calls`, and reads, before and
# after, the CPU time of every node, of nginx and of PostgreSQL (/proc) and PostgreSQL's committed
# transactions (`pg_stat_database.xact_commit`). Prints each per request.
#
#   cargo build --release -p runguard-node -p runguard-loadgen
#   deploy/measure-cluster.sh [RUNS] [STEPS] [CONCURRENCY]     # default 3000 runs × 10 steps, 48 connections
#
# Uses LOCAL_CLUSTER_DIR (default target/measure-cluster, emptied first) and LOCAL_CLUSTER_PORT (default
# 8080) like local-cluster.sh, and stops the cluster at the end.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
runs=${1:-3000}
steps=${2:-10}
concurrency=${3:-48}
export LOCAL_CLUSTER_DIR=${LOCAL_CLUSTER_DIR:-$repo/target/measure-cluster}
export LOCAL_CLUSTER_PORT=${LOCAL_CLUSTER_PORT:-8080}
export LOCAL_CLUSTER_BIN=$repo/target/release/runguard
load=$repo/target/release/runguard-load
state=$LOCAL_CLUSTER_DIR
port=$LOCAL_CLUSTER_PORT
pg_port=$((port + 5))
for bin in "$LOCAL_CLUSTER_BIN" "$load"; do
  [[ -x $bin ]] || { echo "missing $bin: cargo build --release -p runguard-node -p runguard-loadgen" >&2; exit 1; }
done
cluster="$repo/deploy/local-cluster.sh"

psql_() {
  local bin
  bin=$(pg_config --bindir 2>/dev/null || ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  "$bin/psql" -h 127.0.0.1 -p "$pg_port" -U runguard -d runguard -tAc "$1"
}

# User + system CPU of these pids and all their children still alive, in milliseconds (USER_HZ = 100).
cpu_ms() {
  local total=0 pid ticks
  for pid in "$@"; do
    [[ -r /proc/$pid/stat ]] || continue
    ticks=$(sed 's/^.*) //' "/proc/$pid/stat" | awk '{print $12 + $13}')
    total=$((total + ticks * 10))
  done
  echo "$total"
}

node_pids() { cat "$state"/node{1,2,3}/pid; }
nginx_pids() { local m; m=$(cat "$state/nginx/nginx.pid"); echo "$m" $(pgrep -P "$m" || true); }
pg_pids() { local m; m=$(head -n 1 "$state/pg/data/postmaster.pid"); echo "$m" $(pgrep -P "$m" || true); }
commits() { psql_ "SELECT xact_commit FROM pg_stat_database WHERE datname = 'runguard'"; }
db_bytes() { psql_ "CHECKPOINT" >/dev/null; psql_ "SELECT pg_database_size('runguard')"; }

"$cluster" clean >/dev/null 2>&1 || true
"$cluster" start >/dev/null
# Policies first, on one node, then a restart so that every node starts with them: the block scenario's
# four budgets and a skill deny list (allow steps stay allowed, but each is evaluated against all five).
"$load" calls --addr "127.0.0.1:$((port + 1))" --phase policies >/dev/null
"$cluster" stop >/dev/null
"$cluster" start >/dev/null

# A PostgreSQL backend that starts during the load is counted whole in the "after" reading only, which
# errs towards more CPU; one that exits during it is lost, which no pool here does.
read -r -a nodes <<<"$(node_pids | tr '\n' ' ')"
before_nodes=$(cpu_ms "${nodes[@]}")
before_nginx=$(cpu_ms $(nginx_pids))
before_pg=$(cpu_ms $(pg_pids))
before_commits=$(commits)
before_bytes=$(db_bytes)
started=$(date +%s%N)

tag="m$(date +%s)"
"$load" calls --addr "127.0.0.1:$port" --phase create --runs "$runs" --concurrency "$concurrency" --tag "$tag"
"$load" calls --addr "127.0.0.1:$port" --phase steps --runs "$runs" --steps "$steps" --concurrency "$concurrency" --tag "$tag"
"$load" calls --addr "127.0.0.1:$port" --phase end --runs "$runs" --concurrency "$concurrency" --tag "$tag"

elapsed_ms=$(( ($(date +%s%N) - started) / 1000000 ))
after_nodes=$(cpu_ms "${nodes[@]}")
after_nginx=$(cpu_ms $(nginx_pids))
after_pg=$(cpu_ms $(pg_pids))
after_commits=$(commits)
after_bytes=$(db_bytes)
requests=$((runs * (2 * steps + 2)))
decisions=$requests

per() { awk -v cpu_ms="$1" -v n="$requests" 'BEGIN { printf "%.1f", cpu_ms * 1000 / n }'; }
echo "cluster: 3 nodes + nginx + PostgreSQL on $(nproc) cores; $runs runs × $steps steps (pre+post), $concurrency connections"
echo "requests (= decisions: creation, 2 per step, end): $requests in $((elapsed_ms / 1000)) s ($((requests * 1000 / elapsed_ms))/s)"
echo "node CPU:       $(per $((after_nodes - before_nodes))) us/request (all three nodes)"
echo "nginx CPU:      $(per $((after_nginx - before_nginx))) us/request"
echo "PostgreSQL CPU: $(per $((after_pg - before_pg))) us/request"
echo "database:       $(( (after_bytes - before_bytes) / requests )) bytes/request on disk (tables and indexes, after a checkpoint)"
echo "commits:        $(awk -v c=$((after_commits - before_commits)) -v n="$decisions" 'BEGIN { printf "%.3f", c / n }') per request ($((after_commits - before_commits)) in all)"
"$cluster" stop >/dev/null
