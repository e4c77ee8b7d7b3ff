#!/usr/bin/env bash
# Runs a throwaway Redis Sentinel setup on 127.0.0.1 for tests and developers: a master, one
# replica and three sentinels (quorum 2), each a daemonized redis-server with its working
# directory, pid file and log under DIR (DIR/PORT for the data nodes, DIR/s-PORT for the
# sentinels, which rewrite their own DIR/s-PORT/sentinel.conf), so `stop` finds and stops
# exactly what `start` began.
#
#   deploy/redis-sentinel.sh start [DIR [MASTER_PORT REPLICA_PORT S1 S2 S3 [NAME]]]
#       Defaults: DIR target/tmp/redis-sentinel, ports 7101 7102, sentinels 27101 27102
#       27103, NAME concert. Waits until the replica is in sync and every sentinel knows the
#       master, the replica and the 2 other sentinels, then prints the fred URL as the only
#       line on stdout:
#         redis-sentinel://127.0.0.1:S1?node=127.0.0.1:S2&node=127.0.0.1:S3&sentinelServiceName=NAME
#   deploy/redis-sentinel.sh stop [DIR]
#       SIGTERMs every process whose pid file is under DIR (SIGKILL if it lingers), removes
#       DIR. Stopping a DIR that is already stopped or gone succeeds.
#   deploy/redis-sentinel.sh master [DIR]
#       Prints the current master's host:port as the first sentinel that answers reports it.
#   deploy/redis-sentinel.sh kill-master [DIR]
#       SIGKILLs whichever redis-server the sentinels report as master (after a failover that
#       is no longer MASTER_PORT) and prints its port.
#
# Progress goes to stderr. REDIS_SENTINEL_TIMEOUT (seconds, default 60) bounds every wait.
set -euo pipefail

DEFAULT_DIR=target/tmp/redis-sentinel
DEFAULT_PORTS=(7101 7102 27101 27102 27103)
DEFAULT_NAME=concert
DEADLINE_SECONDS=${REDIS_SENTINEL_TIMEOUT:-60}
STOP_GRACE_SECONDS=10
POLL=0.2
# Marks a DIR this script made (so stop never removes anything else) and records the
# master name and sentinel ports for master and kill-master.
MARKER=.redis-sentinel-dir

log() { echo "redis-sentinel: $*" >&2; }
die() { log "$*"; exit 1; }

usage() {
  cat >&2 <<'EOF'
usage: deploy/redis-sentinel.sh start [DIR [MASTER_PORT REPLICA_PORT S1 S2 S3 [NAME]]]
       deploy/redis-sentinel.sh stop [DIR]
       deploy/redis-sentinel.sh master [DIR]
       deploy/redis-sentinel.sh kill-master [DIR]
EOF
  exit 2
}

# The helpers shared with the other topology script.
# shellcheck source=deploy/redis-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/redis-lib.sh"

check_port() {
  if ! [[ $1 =~ ^[1-9][0-9]{0,4}$ ]] || (( $1 > 65535 )); then die "bad port '$1'"; fi
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

# True when the process whose pid file is $1/$2 is ours and answers PING on port $3.
node_up() {
  local dir=$1 pidfile=$2 port=$3 pid
  [[ -s $dir/$pidfile ]] || return 1
  pid=$(<"$dir/$pidfile")
  is_our_redis "$pid" "$dir" || return 1
  [[ $(rcli "$port" PING 2>/dev/null) == PONG ]]
}

replica_in_sync() {
  rcli "$1" INFO replication 2>/dev/null | tr -d '\r' | grep -qx 'master_link_status:up'
}

# Value of field $3 in `SENTINEL MASTER $2` as sentinel $1 reports it (key and value lines
# alternate in redis-cli's output).
sentinel_master_field() {
  rcli "$1" SENTINEL MASTER "$2" 2>/dev/null | tr -d '\r' \
    | awk -v key="$3" 'NR % 2 == 1 { k = $0; next } k == key { print; found = 1 } END { exit !found }'
}

# True when sentinel $1 reports master $2 at 127.0.0.1:$3, healthy, with 1 replica and 2
# other sentinels, and can reach quorum and failover authorization.
sentinel_ready() {
  local s=$1 name=$2 mport=$3 addr
  addr=$(rcli "$s" SENTINEL GET-MASTER-ADDR-BY-NAME "$name" 2>/dev/null | tr -d '\r' | paste -sd ' ')
  [[ $addr == "127.0.0.1 $mport" ]] || return 1
  [[ $(sentinel_master_field "$s" "$name" flags) == master ]] || return 1
  [[ $(sentinel_master_field "$s" "$name" num-slaves) == 1 ]] || return 1
  [[ $(sentinel_master_field "$s" "$name" num-other-sentinels) == 2 ]] || return 1
  rcli "$s" SENTINEL REPLICAS "$name" 2>/dev/null | tr -d '\r' \
    | awk 'NR % 2 == 1 { k = $0; next } k == "flags" && $0 == "slave" { ok = 1 } END { exit !ok }' \
    || return 1
  rcli "$s" SENTINEL CKQUORUM "$name" 2>/dev/null | grep -q '^OK'
}

# Reads NAME and the sentinel ports that start recorded in DIR's marker.
read_marker() {
  local key value
  NAME='' SENTINELS=()
  [[ -f $DIR/$MARKER ]] || die "$DIR was not made by this script (no $MARKER)"
  while read -r key value; do
    case $key in
      name) NAME=$value ;;
      sentinels) read -r -a SENTINELS <<<"$value" ;;
    esac
  done <"$DIR/$MARKER"
  [[ -n $NAME && ${#SENTINELS[@]} -gt 0 ]] || die "$DIR/$MARKER is incomplete"
}

# host:port of the current master per the first sentinel that answers.
current_master() {
  local s addr
  for s in "${SENTINELS[@]}"; do
    addr=$(rcli "$s" SENTINEL GET-MASTER-ADDR-BY-NAME "$NAME" 2>/dev/null | tr -d '\r' | paste -sd ':') \
      || continue
    [[ $addr =~ ^[^:]+:[0-9]+$ ]] && { echo "$addr"; return 0; }
  done
  return 1
}

log_tails() {
  local log
  for log in "$DIR"/*/*.log; do
    [[ -f $log ]] || continue
    log "--- last lines of $log"
    tail -n 15 "$log" >&2 || true
  done
}

# On a failed or interrupted start: show the logs and stop what was started (keeping DIR,
# with its logs, until `stop`).
on_start_exit() {
  local rc=$?
  [[ ${STARTED:-1} == 1 ]] && return
  trap - EXIT HUP INT TERM
  log_tails
  kill_all "$DIR" || true
  log "start failed; logs kept in $DIR (remove them with: $0 stop $DIR)"
  exit $(( rc == 0 ? 1 : rc ))
}

cmd_start() {
  local dir_arg=${1:-$DEFAULT_DIR} ports
  (( $# > 0 )) && shift
  if (( $# == 0 )); then ports=("${DEFAULT_PORTS[@]}"); NAME=$DEFAULT_NAME
  elif (( $# == 5 || $# == 6 )); then ports=("${@:1:5}"); NAME=${6:-$DEFAULT_NAME}
  else usage
  fi
  local mport=${ports[0]} rport=${ports[1]} port s
  SENTINELS=("${ports[@]:2}")
  local -A distinct=()
  for port in "${ports[@]}"; do
    check_port "$port"
    [[ -z ${distinct[$port]:-} ]] || die "port $port given twice"
    distinct[$port]=1
  done
  [[ $NAME =~ ^[A-Za-z0-9._-]+$ ]] || die "bad master name '$NAME' (letters, digits, . _ - only)"
  command -v redis-server >/dev/null 2>&1 || die "redis-server not found (apt-get install redis-server)"
  command -v redis-cli >/dev/null 2>&1 || die "redis-cli not found (apt-get install redis-tools)"

  DIR=$(abs_dir "$dir_arg")
  # The sentinel config quotes DIR; keep it simple enough to quote.
  [[ $DIR != *[\"\\\'$'\n']* ]] || die "DIR must not contain quotes, backslashes or newlines"
  if [[ -e $DIR ]]; then
    [[ -d $DIR ]] || die "$DIR exists and is not a directory"
    if [[ ! -e $DIR/$MARKER ]] && [[ -n $(ls -A "$DIR") ]]; then
      die "$DIR is not empty and was not made by this script; pick another DIR"
    fi
    [[ -z $(our_pids "$DIR") ]] || die "already running in $DIR; run: $0 stop $dir_arg"
  fi
  for port in "${ports[@]}"; do
    port_in_use "$port" && die "port $port is already in use"
  done

  mkdir -p "$DIR"
  printf 'name %s\nsentinels %s\n' "$NAME" "${SENTINELS[*]}" >"$DIR/$MARKER"
  STARTED=0
  trap on_start_exit EXIT
  trap 'exit 129' HUP; trap 'exit 130' INT; trap 'exit 143' TERM

  log "starting master $mport and replica $rport in $DIR"
  local replicaof
  for port in "$mport" "$rport"; do
    replicaof=()
    [[ $port == "$rport" ]] && replicaof=(--replicaof 127.0.0.1 "$mport")
    rm -rf "${DIR:?}/$port"
    mkdir -p "$DIR/$port"
    # Redis 7 syncs replicas diskless and by default waits 5 s for more replicas first.
    redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no "${replicaof[@]}" \
      --repl-diskless-sync-delay 0 \
      --dir "$DIR/$port" --daemonize yes --pidfile "$DIR/$port/redis.pid" \
      --logfile "$DIR/$port/redis.log" >/dev/null 2>"$DIR/$port/start.err" \
      || { cat "$DIR/$port/start.err" >&2; die "redis-server on port $port did not start"; }
  done
  for port in "$mport" "$rport"; do
    wait_for "redis $port answering PING" node_up "$DIR/$port" redis.pid "$port" \
      || die "redis $port did not come up"
  done
  wait_for "replica $rport in sync (master_link_status:up)" replica_in_sync "$rport" \
    || die "the replica did not sync with the master"

  log "starting sentinels ${SENTINELS[*]} monitoring '$NAME'"
  local sdir
  for s in "${SENTINELS[@]}"; do
    sdir=$DIR/s-$s
    rm -rf "$sdir"
    mkdir -p "$sdir"
    # Sentinel rewrites this file (ids, known replicas and sentinels, epochs).
    cat >"$sdir/sentinel.conf" <<EOF
port $s
bind 127.0.0.1
daemonize yes
pidfile "$sdir/sentinel.pid"
logfile "$sdir/sentinel.log"
dir "$sdir"
sentinel monitor $NAME 127.0.0.1 $mport 2
sentinel down-after-milliseconds $NAME 1000
sentinel failover-timeout $NAME 5000
sentinel parallel-syncs $NAME 1
EOF
    redis-server "$sdir/sentinel.conf" --sentinel >/dev/null 2>"$sdir/start.err" \
      || { cat "$sdir/start.err" >&2; die "sentinel on port $s did not start"; }
  done
  for s in "${SENTINELS[@]}"; do
    wait_for "sentinel $s answering PING" node_up "$DIR/s-$s" sentinel.pid "$s" \
      || die "sentinel $s did not come up"
  done
  for s in "${SENTINELS[@]}"; do
    wait_for "sentinel $s seeing master $mport, 1 replica and 2 other sentinels" \
      sentinel_ready "$s" "$NAME" "$mport" || {
        log "sentinel $s reports: master $(rcli "$s" SENTINEL GET-MASTER-ADDR-BY-NAME "$NAME" 2>&1 | paste -sd ' ')," \
          "flags $(sentinel_master_field "$s" "$NAME" flags)," \
          "replicas $(sentinel_master_field "$s" "$NAME" num-slaves)," \
          "other sentinels $(sentinel_master_field "$s" "$NAME" num-other-sentinels)," \
          "ckquorum: $(rcli "$s" SENTINEL CKQUORUM "$NAME" 2>&1)"
        die "sentinel $s is not ready"
      }
  done
  STARTED=1
  log "up: master 127.0.0.1:$mport, replica 127.0.0.1:$rport, sentinels ${SENTINELS[*]}"

  local url="redis-sentinel://127.0.0.1:${SENTINELS[0]}?"
  for s in "${SENTINELS[@]:1}"; do url+="node=127.0.0.1:$s&"; done
  echo "${url}sentinelServiceName=$NAME"
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

cmd_master() {
  (( $# <= 1 )) || usage
  [[ -d ${1:-$DEFAULT_DIR} ]] || die "no such DIR: ${1:-$DEFAULT_DIR}"
  DIR=$(abs_dir "${1:-$DEFAULT_DIR}")
  read_marker
  current_master || die "no sentinel of ${SENTINELS[*]} answered for '$NAME'"
}

cmd_kill_master() {
  (( $# <= 1 )) || usage
  [[ -d ${1:-$DEFAULT_DIR} ]] || die "no such DIR: ${1:-$DEFAULT_DIR}"
  DIR=$(abs_dir "${1:-$DEFAULT_DIR}")
  read_marker
  local addr port pid
  addr=$(current_master) || die "no sentinel of ${SENTINELS[*]} answered for '$NAME'"
  port=${addr##*:}
  [[ -s $DIR/$port/redis.pid ]] || die "master $addr was not started under $DIR"
  pid=$(<"$DIR/$port/redis.pid")
  is_our_redis "$pid" "$DIR/$port" \
    || die "master $addr (pid $pid) is not running (killed already, failover not done yet?)"
  kill -KILL "$pid"
  wait_gone "$STOP_GRACE_SECONDS" "$pid" || die "master $addr (pid $pid) survived SIGKILL"
  log "killed master $addr (pid $pid)"
  echo "$port"
}

case ${1:-} in
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  master) shift; cmd_master "$@" ;;
  kill-master) shift; cmd_kill_master "$@" ;;
  *) usage ;;
esac
