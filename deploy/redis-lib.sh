#!/usr/bin/env bash
# Sourced by deploy/redis-cluster.sh and deploy/redis-sentinel.sh, not run: talking to a
# local redis-server, telling the processes a script started from any other, and stopping
# everything started under a DIR. The caller defines log, die, MARKER, POLL and
# STOP_GRACE_SECONDS before sourcing it.

# redis-cli against one local port, never hanging on a stuck server.
rcli() { local port=$1; shift; timeout 5 redis-cli -h 127.0.0.1 -p "$port" "$@"; }

# True when something accepts TCP connections on 127.0.0.1:$1.
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# True when pid $1 exists and is not a zombie (nothing may reap daemons in a container).
pid_alive() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ ${stat:0:1} != Z ]]
}

# True when pid $1 is a live redis-server running in directory $2 (its working directory), so a
# stale pid file whose number the kernel has since reused never gets anyone else killed.
is_our_redis() {
  local pid=$1 dir=$2 comm
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  pid_alive "$pid" || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  [[ $comm == redis-server || $comm == redis-sentinel ]] || return 1
  [[ $(readlink "/proc/$pid/cwd" 2>/dev/null) == "$dir" ]]
}

# Pids of the redis processes started under DIR $1: those named by pid files, plus any
# redis-server whose working directory is inside DIR (one that died before writing its pid
# file, or a start interrupted at the wrong moment).
our_pids() {
  local dir=$1 pidfile pid cwd
  local -A seen=()
  while IFS= read -r -d '' pidfile; do
    pid=$(<"$pidfile") || continue
    pid=${pid//[[:space:]]/}
    if is_our_redis "$pid" "$(dirname "$pidfile")" && [[ -z ${seen[$pid]:-} ]]; then
      seen[$pid]=1; echo "$pid"
    fi
  done < <(find "$dir" -name '*.pid' -type f -print0 2>/dev/null)
  for pid in $(pgrep -x redis-server 2>/dev/null; pgrep -x redis-sentinel 2>/dev/null); do
    cwd=$(readlink "/proc/$pid/cwd" 2>/dev/null) || continue
    if [[ $cwd == "$dir"/* ]] && pid_alive "$pid" && [[ -z ${seen[$pid]:-} ]]; then
      seen[$pid]=1; echo "$pid"
    fi
  done
}

# Polls until none of the pids "$@" is alive, for at most $1 seconds; true when all are gone.
wait_gone() {
  local seconds=$1; shift
  local end=$((SECONDS + seconds)) pid
  while :; do
    local alive=0
    for pid in "$@"; do pid_alive "$pid" && alive=1; done
    (( alive == 0 )) && return 0
    (( SECONDS >= end )) && return 1
    sleep "$POLL"
  done
}

# Stops every process started under absolute DIR $1: SIGTERM, then SIGKILL after a grace.
kill_all() {
  local dir=$1 pids
  mapfile -t pids < <(our_pids "$dir")
  (( ${#pids[@]} == 0 )) && return 0
  log "stopping ${#pids[@]} redis process(es) under $dir"
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait_gone "$STOP_GRACE_SECONDS" "${pids[@]}" && return 0
  log "still running after ${STOP_GRACE_SECONDS}s; sending SIGKILL"
  kill -KILL "${pids[@]}" 2>/dev/null || true
  wait_gone "$STOP_GRACE_SECONDS" "${pids[@]}" || die "could not stop: ${pids[*]}"
}

# Absolute, symlink-free path of DIR $1 (which need not exist yet).
abs_dir() {
  local dir=$1
  [[ -n $dir ]] || die "empty DIR"
  if [[ -d $dir ]]; then (cd "$dir" && pwd -P); return; fi
  local parent base
  parent=$(dirname "$dir"); base=$(basename "$dir")
  [[ $base != . && $base != .. && $base != / ]] || die "bad DIR: $dir"
  echo "$(abs_dir "$parent")/$base"
}
