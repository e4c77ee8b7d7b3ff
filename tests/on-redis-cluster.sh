#!/usr/bin/env bash
# Runs a command with TEST_REDIS_URL naming a three-master Redis Cluster on loopback,
# started for it by deploy/redis-cluster.sh and stopped afterwards whatever happens:
#
#   tests/on-redis-cluster.sh cargo test --package adapters-redis --test it
#
# Ports are chosen at random among the free ones (a cluster node also needs port + 10000);
# a start that loses a port to another process is tried again with others.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$(mktemp -u "${TMPDIR:-/tmp}/concert-redis-cluster-XXXXXX")
trap 'deploy/redis-cluster.sh stop "$dir" >/dev/null 2>&1 || true' EXIT INT TERM

free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
url=
for _ in 1 2 3; do
  ports=()
  while [ "${#ports[@]}" -lt 3 ]; do
    port=$((20000 + RANDOM % 30000))
    if free "$port" && free $((port + 10000)) && [[ " ${ports[*]} " != *" $port "* ]]; then
      ports+=("$port")
    fi
  done
  if url=$(deploy/redis-cluster.sh start "$dir" "${ports[@]}"); then
    break
  fi
  deploy/redis-cluster.sh stop "$dir" >/dev/null 2>&1 || true
  url=
done
[ -n "$url" ] || { echo "on-redis-cluster: could not start a Redis Cluster" >&2; exit 1; }
echo "on-redis-cluster: TEST_REDIS_URL=$url" >&2
TEST_REDIS_URL=$url "$@"
