#!/usr/bin/env bash
# Before/after of the seat-map read path: builds <commit> (in a scratch worktree, its own
# target directory) and the working tree (release), then runs the seat-map part of the
# booking benchmark (`BENCH_SEAT_MAP_ONLY=1 bench-booking`: cached seat map, uncached, and
# `/health/live`, 64 clients x 20,000 requests) alternately, before then after, <runs>
# times each, so both sides see the same machine state. Prints every run's figures.
#
#   docs/compare-seat-map.sh 29090e7 5
#
# Needs the local MariaDB and Redis (make services). The first build of <commit> takes
# about ten minutes on two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
before=${1:?usage: docs/compare-seat-map.sh <commit> [runs]}
runs=${2:-5}
export TEST_DATABASE_URL=${TEST_DATABASE_URL:-mysql://root@127.0.0.1:3306}
export TEST_REDIS_URL=${TEST_REDIS_URL:-redis://127.0.0.1:6379}
root=$(pwd)
tree=$(mktemp -d)/before
target="$root/${COMPARE_TARGET_DIR:-target/compare-before}"
git worktree add --detach "$tree" "$before" >/dev/null
trap 'git worktree remove --force "$tree"' EXIT
(cd "$tree" && CARGO_TARGET_DIR="$target" cargo build --release --workspace --bins --locked)
cargo build --release --workspace --bins --locked
for i in $(seq 1 "$runs"); do
  echo "== before ($before), run $i"
  (cd "$tree" && CONCERT_SERVER_BIN="$target/release/concert-server" BENCH_SEAT_MAP_ONLY=1 \
    "$target/release/bench-booking" | grep -E '^  (seat map|`/health)')
  echo "== after (working tree), run $i"
  BENCH_SEAT_MAP_ONLY=1 target/release/bench-booking | grep -E '^  (seat map|`/health)'
done
