#!/usr/bin/env bash
# Where the machine's CPU goes while a command runs, second by second and per process.
#
#   docs/cpu-split.sh ./target/release/bench-limits
#   BENCH_SEAT_MAP_ONLY=1 docs/cpu-split.sh ./target/release/bench-booking
#
# Samples every CPU with `perf record -a -e cpu-clock` (a software clock: it works in
# virtual machines without hardware counters) at CPU_SPLIT_HZ per CPU while the command
# runs, then prints, per second of the run, the share of all CPUs that each group of
# processes used: `server` (concert-server: its workers `actix-rt|system`, its main thread,
# the acceptor), `load` (the benchmark program itself, the load generator), `mariadb`,
# `redis`, `idle`, and `other`; then the busiest threads of the whole run, and, with
# CPU_SPLIT_FROM/CPU_SPLIT_TO (seconds since the first sample), the server's hottest
# symbols in that window, kernel time as one line. Needs `perf` (Debian's linux-perf) and
# the right to sample every CPU (root, CAP_PERFMON, or perf_event_paranoid <= 0). Writes
# nothing into the repository; the samples stay in a temporary directory that is removed
# at the end. Exits with the command's status. The first and last rows cover part of a
# second and read low.
# Used for docs/report.md 5.2 ("Where a spread charge's CPU goes").
set -euo pipefail

if [[ $# -eq 0 ]]; then
  echo "usage: $0 <command> [args...]" >&2
  exit 2
fi
command -v perf >/dev/null || { echo "$0: perf is not installed (apt-get install linux-perf)" >&2; exit 1; }

hz=${CPU_SPLIT_HZ:-499}
work=$(mktemp -d)
recorder=
# Whatever ends this script (the command failing, Ctrl-C, a kill) stops the recorder.
stop_recorder() {
  if [[ -n "$recorder" ]]; then
    kill -INT "$recorder" 2>/dev/null || true
    wait "$recorder" 2>/dev/null || true
    recorder=
  fi
}
trap 'stop_recorder; rm -rf "$work"' EXIT
trap 'exit 130' INT TERM

perf record -a -e cpu-clock -F "$hz" -o "$work/perf.data" >"$work/perf.log" 2>&1 &
recorder=$!
# perf writes its header before it samples: poll for the file (up to 10 s).
for _ in $(seq 1 100); do
  [[ -s "$work/perf.data" ]] && break
  kill -0 "$recorder" 2>/dev/null || { cat "$work/perf.log" >&2; exit 1; }
  sleep 0.1
done
[[ -s "$work/perf.data" ]] || { echo "$0: perf did not start sampling within 10 s" >&2; cat "$work/perf.log" >&2; exit 1; }
status=0
"$@" || status=$?
stop_recorder
# The report reads what was sampled; a short pipe (head) must not fail the script.
set +o pipefail

perf script -i "$work/perf.data" -F comm,tid,time 2>/dev/null >"$work/samples.txt"
# Every online CPU was sampled, whatever this process's own affinity.
cpus=$(getconf _NPROCESSORS_ONLN)

echo
echo "CPU share per second (percent of all $cpus CPUs; $hz samples/s per CPU)"
awk -v hz="$hz" -v cpus="$cpus" '
  function group(c) {
    if (c ~ /^actix-/ || c == "concert-server") return "server"
    if (c ~ /^bench-/ || c == "soak") return "load"
    if (c == "mariadbd" || c == "mysqld") return "mariadb"
    if (c == "redis-server") return "redis"
    if (c == "swapper") return "idle"
    return "other"
  }
  {
    for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+\.[0-9]+:$/) { t = int($i + 0); break }
    # The command name may contain spaces ("actix-server ac"): it is everything before the tid.
    comm = $1; for (j = 2; j < i - 1; j++) comm = comm " " $j
    if (first == "") first = t
    n[t - first, group(comm)]++; last = t - first
  }
  END {
    printf "%5s %7s %7s %7s %7s %7s %7s\n", "s", "server", "load", "mariadb", "redis", "idle", "other"
    for (s = 0; s <= last; s++) {
      printf "%5d", s
      split("server load mariadb redis idle other", g, " ")
      for (k = 1; k <= 6; k++) printf " %7.1f", 100 * n[s, g[k]] / (hz * cpus)
      printf "\n"
    }
  }' "$work/samples.txt"

echo
echo "Busiest threads of the whole run (samples)"
awk '{
    for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+\.[0-9]+:$/) break
    comm = $1; for (j = 2; j < i - 1; j++) comm = comm " " $j
    print comm " [" $(i - 1) "]"
  }' "$work/samples.txt" | grep -v '^swapper' | sort | uniq -c | sort -rn | head -15

if [[ -n "${CPU_SPLIT_FROM:-}" && -n "${CPU_SPLIT_TO:-}" ]]; then
  echo
  echo "The server's hottest symbols, seconds $CPU_SPLIT_FROM to $CPU_SPLIT_TO (samples)"
  perf script -i "$work/perf.data" -F comm,time,ip,sym,dso 2>/dev/null | awk -v from="$CPU_SPLIT_FROM" -v to="$CPU_SPLIT_TO" '
    {
      for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+\.[0-9]+:$/) { t = int($i + 0); break }
      if (first == "") first = t
      s = t - first
      if (s < from || s > to) next
      comm = $1; for (j = 2; j < i; j++) comm = comm " " $j
      if (comm !~ /^(actix-|concert-server)/) next
      sym = ""; for (j = i + 2; j <= NF; j++) sym = sym (sym == "" ? "" : " ") $j
      sub(/\+0x[0-9a-f]+/, "", sym)
      if (sym ~ /kernel\.kallsyms/) sym = "[kernel]"
      print sym
    }' | sort | uniq -c | sort -rn | head -30
fi
exit "$status"
