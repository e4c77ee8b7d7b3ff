#!/usr/bin/env bash
# Runs a throwaway Redis Cluster (masters only, no replicas) on 127.0.0.1 for tests and
# developers. Every node is a daemonized redis-server with its working directory, pid file,
# log and nodes-PORT.conf in DIR/PORT, so `stop` finds and stops exactly what `start` began.
#
#   deploy/redis-cluster.sh start [DIR [PORT1 PORT2 PORT3 [PORT...]]]
#       Starts one node per port (default DIR target/tmp/redis-cluster, ports 7001 7002 7003),
#       joins them into a cluster, waits until every node reports cluster_state:ok with all
#       16384 slots assigned, and prints the fred URL as the only line on stdout:
#         redis-cluster://127.0.0.1:P1?node=127.0.0.1:P2&node=127.0.0.1:P3
#       Each node also needs its cluster bus port, PORT+10000, to be free.
#   deploy/redis-cluster.sh stop [DIR]
#       SIGTERMs every node whose pid file is under DIR (SIGKILL if it lingers), removes DIR.
#       Stopping a DIR that is already stopped or gone succeeds.
#   deploy/redis-cluster.sh kill DIR PORT
#       SIGKILLs the node on PORT (for failure tests) and waits until it is gone.
#
# Progress goes to stderr. REDIS_CLUSTER_TIMEOUT (seconds, default 60) bounds every wait.
set -euo pipefail

DEFAULT_DIR=target/tmp/redis-cluster
DEFAULT_PORTS=(7001 7002 7003)
DEADLINE_SECONDS=${REDIS_CLUSTER_TIMEOUT:-60}
STOP_GRACE_SECONDS=10
POLL=0.2
MARKER=.redis-cluster-dir   # Marks a DIR this script made, so stop never removes anything else.

log() { echo "redis-cluster: $*" >&2; }
die() { log "$*"; exit 1; }

usage() {
  cat >&2 <<'EOF'
usage: deploy/redis-cluster.sh start [DIR [PORT1 PORT2 PORT3 [PORT...]]]
       deploy/redis-cluster.sh stop [DIR]
       deploy/redis-cluster.sh kill DIR PORT
EOF
  exit 2
}

# The helpers shared with the other topology script.
# shellcheck source=deploy/redis-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/redis-lib.sh"

check_port() {
  if ! [[ $1 =~ ^[1-9][0-9]{0,4}$ ]] || (( $1 > 55535 )); then
    die "bad port '$1' (the cluster bus uses PORT+10000, so PORT must be 1..55535)"
  fi
}

log_tails() {
  local dir=$1 port
  for port in "${PORTS[@]}"; do
    [[ -f $dir/$port/redis.log ]] || continue
    log "--- last lines of $dir/$port/redis.log"
    tail -n 15 "$dir/$port/redis.log" >&2 || true
  done
}

# Polls "$@" until it succeeds or the deadline passes.
wait_for() {
  local what=$1; shift
  local end=$((SECONDS + DEADLINE_SECONDS))
  until "$@" >/dev/null 2>&1; do
    (( SECONDS >= end )) && { log "$what: not reached within ${DEADLINE_SECONDS}s"; return 1; }
    sleep "$POLL"
  done
}

node_up() {
  local dir=$1 port=$2 pid
  [[ -s $dir/$port/redis.pid ]] || return 1
  pid=$(<"$dir/$port/redis.pid")
  is_our_redis "$pid" "$dir/$port" || return 1
  [[ $(rcli "$port" PING 2>/dev/null) == PONG ]]
}

# True when every node is ok, knows all nodes, sees all 16384 slots assigned and ok, and
# redis-cli's own consistency check agrees.
cluster_ready() {
  local port info n=${#PORTS[@]}
  for port in "${PORTS[@]}"; do
    info=$(rcli "$port" CLUSTER INFO 2>/dev/null | tr -d '\r') || return 1
    grep -qx 'cluster_state:ok' <<<"$info" || return 1
    grep -qx 'cluster_slots_assigned:16384' <<<"$info" || return 1
    grep -qx 'cluster_slots_ok:16384' <<<"$info" || return 1
    grep -qx "cluster_known_nodes:$n" <<<"$info" || return 1
    grep -qx "cluster_size:$n" <<<"$info" || return 1
  done
  timeout 15 redis-cli --cluster check "127.0.0.1:${PORTS[0]}" >/dev/null 2>&1
}

cmd_start() {
  local dir_arg=${1:-$DEFAULT_DIR}
  (( $# > 0 )) && shift
  if (( $# == 0 )); then PORTS=("${DEFAULT_PORTS[@]}")
  elif (( $# < 3 )); then die "a cluster needs at least 3 ports, got: $*"
  else PORTS=("$@")
  fi
  local port
  local -A distinct=()
  for port in "${PORTS[@]}"; do
    check_port "$port"
    [[ -z ${distinct[$port]:-} ]] || die "port $port given twice"
    distinct[$port]=1
  done
  for port in "${PORTS[@]}"; do
    [[ -z ${distinct[$((port + 10000))]:-} ]] \
      || die "port $((port + 10000)) is both a node port and the bus port of node $port"
  done
  command -v redis-server >/dev/null 2>&1 || die "redis-server not found (apt-get install redis-server)"
  command -v redis-cli >/dev/null 2>&1 || die "redis-cli not found (apt-get install redis-tools)"

  DIR=$(abs_dir "$dir_arg")
  if [[ -e $DIR ]]; then
    [[ -d $DIR ]] || die "$DIR exists and is not a directory"
    if [[ ! -e $DIR/$MARKER ]] && [[ -n $(ls -A "$DIR") ]]; then
      die "$DIR is not empty and was not made by this script; pick another DIR"
    fi
    [[ -z $(our_pids "$DIR") ]] || die "a cluster is already running in $DIR; run: $0 stop $dir_arg"
  fi
  for port in "${PORTS[@]}"; do
    port_in_use "$port" && die "port $port is already in use"
    port_in_use "$((port + 10000))" && die "port $((port + 10000)) (cluster bus of $port) is already in use"
  done

  mkdir -p "$DIR"
  touch "$DIR/$MARKER"
  STARTED=0
  trap on_start_exit EXIT
  trap 'exit 129' HUP; trap 'exit 130' INT; trap 'exit 143' TERM
  log "starting ${#PORTS[@]} nodes in $DIR: ${PORTS[*]}"
  for port in "${PORTS[@]}"; do
    rm -rf "${DIR:?}/$port"
    mkdir -p "$DIR/$port"
    redis-server --port "$port" --bind 127.0.0.1 \
      --cluster-enabled yes --cluster-config-file "nodes-$port.conf" --cluster-node-timeout 2000 \
      --save '' --appendonly no --dir "$DIR/$port" \
      --daemonize yes --pidfile "$DIR/$port/redis.pid" --logfile "$DIR/$port/redis.log" \
      >/dev/null 2>"$DIR/$port/start.err" \
      || { cat "$DIR/$port/start.err" >&2; die "redis-server on port $port did not start"; }
  done
  for port in "${PORTS[@]}"; do
    wait_for "node $port answering PING" node_up "$DIR" "$port" || die "node $port did not come up"
  done

  log "creating the cluster"
  local out addrs=()
  for port in "${PORTS[@]}"; do addrs+=("127.0.0.1:$port"); done
  if ! out=$(timeout "$DEADLINE_SECONDS" redis-cli --cluster create "${addrs[@]}" \
               --cluster-replicas 0 --cluster-yes 2>&1); then
    echo "$out" >&2
    die "redis-cli --cluster create failed"
  fi
  wait_for "cluster_state:ok with all 16384 slots on every node" cluster_ready \
    || die "the cluster did not become ready"
  STARTED=1
  log "cluster up on ports ${PORTS[*]}"

  local url="redis-cluster://127.0.0.1:${PORTS[0]}" sep='?'
  for port in "${PORTS[@]:1}"; do url+="${sep}node=127.0.0.1:$port"; sep='&'; done
  echo "$url"
}

# On a failed or interrupted start: show the logs and stop what was started (keeping DIR,
# with its logs, until `stop`).
on_start_exit() {
  local rc=$?
  [[ ${STARTED:-1} == 1 ]] && return
  trap - EXIT HUP INT TERM
  log_tails "$DIR"
  kill_all "$DIR" || true
  log "start failed; logs kept in $DIR (remove them with: $0 stop $DIR)"
  exit $(( rc == 0 ? 1 : rc ))
}

cmd_stop() {
  (( $# <= 1 )) || usage
  local dir_arg=${1:-$DEFAULT_DIR}
  [[ -e $dir_arg ]] || { log "nothing to stop in $dir_arg"; return 0; }
  DIR=$(abs_dir "$dir_arg")
  [[ -e $DIR/$MARKER ]] || die "$DIR was not made by this script; not touching it"
  kill_all "$DIR"
  rm -rf "${DIR:?}"
  log "stopped; removed $DIR"
}

cmd_kill() {
  (( $# == 2 )) || usage
  local port=$2 pid
  check_port "$port"
  [[ -d $1 ]] || die "no such DIR: $1"
  DIR=$(abs_dir "$1")
  [[ -s $DIR/$port/redis.pid ]] || die "no pid file for port $port under $DIR"
  pid=$(<"$DIR/$port/redis.pid")
  is_our_redis "$pid" "$DIR/$port" || die "node $port (pid $pid) is not running"
  kill -KILL "$pid"
  wait_gone "$STOP_GRACE_SECONDS" "$pid" || die "node $port (pid $pid) survived SIGKILL"
  log "killed node $port (pid $pid)"
}

case ${1:-} in
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  kill) shift; cmd_kill "$@" ;;
  *) usage ;;
esac
