#!/usr/bin/env bash
# A runguard cluster on this machine, for trying it out: a private PostgreSQL server, three nodes on
# loopback ports and nginx in front of them, configured by deploy/nginx/runguard.conf. Everything comes
# from Debian packages (postgresql, nginx-light) and the runguard binary; nothing is downloaded.
#
#   deploy/local-cluster.sh start    # start (builds the binary only if there is none)
#   deploy/local-cluster.sh status   # what runs, and each node's /readyz
#   deploy/local-cluster.sh stop     # stop everything (the data stays until `clean`)
#   deploy/local-cluster.sh clean    # stop, then remove the state directory
#
# Settings (environment; not RUNGUARD_*, which the nodes would read as their own configuration):
#   LOCAL_CLUSTER_DIR   state directory (default: target/local-cluster in the repository)
#   LOCAL_CLUSTER_PORT  nginx's port; the nodes take the next three, PostgreSQL the fifth (default 8080)
#   LOCAL_CLUSTER_BIN   the runguard binary (default: target/release/runguard, else target/debug/runguard,
#                       else `cargo build --release -p runguard-node --bin runguard`)
#
# The nodes run in development mode (no tokens: loopback only, tenant `default`, admin role). Do not
# expose this cluster; deploy/README.md describes a real deployment.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
state=${LOCAL_CLUSTER_DIR:-$repo/target/local-cluster}
port=${LOCAL_CLUSTER_PORT:-8080}
node_ports=($((port + 1)) $((port + 2)) $((port + 3)))
pg_port=$((port + 5))
db_url="postgres://runguard@127.0.0.1:$pg_port/runguard"

die() { echo "local-cluster: $*" >&2; exit 1; }

pg_bin() {
  local dir
  dir=$(pg_config --bindir 2>/dev/null || true)
  if [[ -z $dir || ! -x $dir/initdb ]]; then
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  fi
  [[ -n $dir && -x $dir/initdb ]] || die "no PostgreSQL server binaries: apt-get install postgresql"
  echo "$dir"
}

# initdb and the server refuse to run as root: as root, they run as Debian's `postgres` user.
as_pg() {
  if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

runguard_bin() {
  if [[ -n ${LOCAL_CLUSTER_BIN:-} ]]; then echo "$LOCAL_CLUSTER_BIN"; return; fi
  for bin in "$repo/target/release/runguard" "$repo/target/debug/runguard"; do
    if [[ -x $bin ]]; then echo "$bin"; return; fi
  done
  echo "local-cluster: building runguard (once)" >&2
  (cd "$repo" && cargo build --quiet --release -p runguard-node --bin runguard) >&2
  echo "$repo/target/release/runguard"
}

nginx_bin() {
  command -v nginx 2>/dev/null || { [[ -x /usr/sbin/nginx ]] && echo /usr/sbin/nginx; } ||
    die "no nginx: apt-get install nginx-light"
}

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for_port() {
  local p=$1 what=$2
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  die "$what did not listen on 127.0.0.1:$p"
}

start_pg() {
  local bin
  bin=$(pg_bin)
  mkdir -p "$state/pg"
  if [[ $(id -u) == 0 ]]; then
    chmod 755 "$state"
    chown postgres "$state/pg"
    runuser -u postgres -- test -w "$state/pg" ||
      die "the postgres user cannot reach $state/pg (a parent directory is private): set LOCAL_CLUSTER_DIR"
  fi
  if [[ ! -f $state/pg/data/PG_VERSION ]]; then
    as_pg "$bin/initdb" -D "$state/pg/data" -U runguard --auth=trust -k --locale=C -E UTF8 >"$state/pg/initdb.log"
  fi
  if ! as_pg "$bin/pg_ctl" -D "$state/pg/data" status >/dev/null 2>&1; then
    as_pg "$bin/pg_ctl" -D "$state/pg/data" -l "$state/pg/log" -w -o \
      "-p $pg_port -k $state/pg -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null
  fi
  as_pg "$bin/psql" -h 127.0.0.1 -p "$pg_port" -U runguard -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = 'runguard'" | grep -q 1 ||
    as_pg "$bin/psql" -h 127.0.0.1 -p "$pg_port" -U runguard -d postgres -qc "CREATE DATABASE runguard"
}

start_nodes() {
  local bin=$1 i
  for i in 0 1 2; do
    local dir="$state/node$((i + 1))"
    mkdir -p "$dir"
    alive "$dir/pid" && continue
    RUNGUARD_STORE=postgres RUNGUARD_POSTGRES_URL=$db_url nohup "$bin" serve \
      --listen "127.0.0.1:${node_ports[$i]}" --data "$dir/data" >"$dir/stdout.log" 2>"$dir/node.log" </dev/null &
    echo $! >"$dir/pid"
  done
  for i in 0 1 2; do wait_for_port "${node_ports[$i]}" "node $((i + 1))"; done
}

start_nginx() {
  local bin dir="$state/nginx"
  bin=$(nginx_bin)
  mkdir -p "$dir"
  chmod 755 "$state" "$dir"
  alive "$dir/nginx.pid" && return 0
  sed -e "s/127\.0\.0\.1:8080/127.0.0.1:$port/" \
    -e "s/127\.0\.0\.1:8081/127.0.0.1:${node_ports[0]}/" \
    -e "s/127\.0\.0\.1:8082/127.0.0.1:${node_ports[1]}/" \
    -e "s/127\.0\.0\.1:8083/127.0.0.1:${node_ports[2]}/" \
    "$repo/deploy/nginx/runguard.conf" >"$dir/runguard.conf"
  cat >"$dir/nginx.conf" <<EOF
pid $dir/nginx.pid;
error_log $dir/error.log;
worker_processes 1;
events { worker_connections 1024; }
http {
  access_log $dir/access.log;
  client_body_temp_path $dir/body;
  proxy_temp_path $dir/proxy;
  fastcgi_temp_path $dir/fastcgi;
  uwsgi_temp_path $dir/uwsgi;
  scgi_temp_path $dir/scgi;
  include $dir/runguard.conf;
}
EOF
  "$bin" -t -q -p "$dir" -c "$dir/nginx.conf"
  "$bin" -p "$dir" -c "$dir/nginx.conf"
  wait_for_port "$port" nginx
}

cmd_start() {
  local bin
  bin=$(runguard_bin)
  mkdir -p "$state"
  start_pg
  "$bin" migrate --postgres-url "$db_url" >"$state/migrate.log"
  start_nodes "$bin"
  start_nginx
  cat <<EOF
runguard cluster up: http://127.0.0.1:$port (nodes on ${node_ports[*]}, PostgreSQL $db_url)
try:
  curl -s -X POST http://127.0.0.1:$port/v1/runs -H 'content-type: application/json' -d '{"run_id": "try-1"}'
  curl -si -X POST http://127.0.0.1:$port/v1/runs/try-1/steps -H 'content-type: application/json' \\
       -d '{"index": 0, "phase": "post", "usage": {"tokens": 10}}'   # x-runguard-node: who answered
state and logs: $state   stop: $0 stop
EOF
}

cmd_stop() {
  local i
  if alive "$state/nginx/nginx.pid"; then
    kill -QUIT "$(cat "$state/nginx/nginx.pid")"
  fi
  for i in 1 2 3; do
    local pidfile="$state/node$i/pid"
    if alive "$pidfile"; then
      local pid
      pid=$(cat "$pidfile")
      kill -TERM "$pid"
      for _ in $(seq 1 450); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$pidfile"
  done
  if [[ -f $state/pg/data/PG_VERSION ]]; then
    as_pg "$(pg_bin)/pg_ctl" -D "$state/pg/data" -m fast -w stop >/dev/null 2>&1 || true
  fi
  echo "runguard cluster stopped"
}

cmd_status() {
  local i
  if [[ -f $state/pg/data/PG_VERSION ]] && as_pg "$(pg_bin)/pg_ctl" -D "$state/pg/data" status >/dev/null 2>&1; then
    echo "postgresql  up    $db_url"
  else
    echo "postgresql  down"
  fi
  for i in 1 2 3; do
    local p=${node_ports[$((i - 1))]}
    if alive "$state/node$i/pid"; then
      echo "node$i       up    http://127.0.0.1:$p  readyz: $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$p/readyz" || echo '-')"
    else
      echo "node$i       down"
    fi
  done
  if alive "$state/nginx/nginx.pid"; then echo "nginx       up    http://127.0.0.1:$port"; else echo "nginx       down"; fi
}

case ${1:-} in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  clean) cmd_stop; rm -rf "$state" ;;
  *) echo "usage: $0 start|stop|status|clean" >&2; exit 2 ;;
esac
