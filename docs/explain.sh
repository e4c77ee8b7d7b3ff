#!/usr/bin/env bash
# Writes docs/report/explain.md: the plan MariaDB chooses for every hot booking query, on
# a scratch database filled to a realistic shape (200 dates x 50 seats, 6,000 reservations
# of which 2,000 are live holds, a third of them run out). Run by `make bench`; needs the
# server binary (for the migrations) and the mariadb client; drops what it made.
set -euo pipefail
cd "$(dirname "$0")/.."

server=${CONCERT_SERVER_BIN:-target/release/concert-server}
[ -x "$server" ] || server=target/debug/concert-server
mysql_url=${TEST_DATABASE_URL:-mysql://root@127.0.0.1:3306}
hostport=${mysql_url#mysql://}; hostport=${hostport#*@}; host=${hostport%:*}; port=${hostport##*:}
db="explain_$$"
sql() { mariadb -h"$host" -P"$port" -uroot "$@"; }
work=$(mktemp -d)
cleanup() { [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null; sql -e "DROP DATABASE IF EXISTS $db" || true; rm -rf "$work"; }
trap cleanup EXIT

# The server migrates a fresh database at start-up; stop it once it listens.
DATABASE_URL="$mysql_url/$db" HTTP_ADDR=127.0.0.1:0 SEED_DEMO_DATA=false QUEUE_NAME="$db" RUST_LOG=info \
  "$server" >"$work/log" 2>&1 &
pid=$!
for _ in $(seq 1 300); do grep -q "listening on" "$work/log" && break; sleep 0.1; done
grep -q "listening on" "$work/log" || { cat "$work/log" >&2; exit 1; }
kill "$pid"; wait "$pid" 2>/dev/null || true; pid=

sql "$db" <<'SQL'
INSERT INTO users (id, name, created_at)
  SELECT UNHEX(LPAD(HEX(seq), 32, '0')), CONCAT('u', seq), NOW(6) FROM seq_1_to_2000;
INSERT INTO concerts (id, title, venue, created_at, updated_at)
  SELECT UNHEX(CONCAT('c', LPAD(HEX(seq), 31, '0'))), CONCAT('Concert ', seq), 'Hall', NOW(6), NOW(6) FROM seq_1_to_20;
INSERT INTO schedules (id, concert_id, starts_at, booking_opens_at, booking_closes_at, created_at)
  SELECT UNHEX(CONCAT('d', LPAD(HEX(seq), 31, '0'))), UNHEX(CONCAT('c', LPAD(HEX(seq % 20 + 1), 31, '0'))),
         UTC_TIMESTAMP(6) + INTERVAL 30 DAY, UTC_TIMESTAMP(6) - INTERVAL 1 DAY, UTC_TIMESTAMP(6) + INTERVAL 29 DAY, NOW(6)
  FROM seq_1_to_200;
INSERT INTO seats (schedule_id, seat_number, price)
  SELECT s.id, n.seq, 50000 FROM schedules s JOIN seq_1_to_50 n;
-- 6,000 reservations over 120 dates: the first 2,000 live holds (a third run out), the
-- rest settled (expired, cancelled).
INSERT INTO reservations (id, user_id, schedule_id, seat_number, price, status, held_until, created_at, updated_at)
  SELECT UNHEX(CONCAT('e', LPAD(HEX(seq), 31, '0'))), UNHEX(LPAD(HEX(seq % 2000 + 1), 32, '0')),
         UNHEX(CONCAT('d', LPAD(HEX((seq - 1) DIV 50 + 1), 31, '0'))), (seq - 1) % 50 + 1, 50000,
         CASE WHEN seq <= 2000 THEN 'HELD' WHEN seq % 2 = 0 THEN 'EXPIRED' ELSE 'CANCELLED' END,
         CASE WHEN seq <= 2000 AND seq % 3 = 0 THEN UTC_TIMESTAMP(6) - INTERVAL 1 MINUTE ELSE UTC_TIMESTAMP(6) + INTERVAL 5 MINUTE END,
         NOW(6), NOW(6)
  FROM seq_1_to_6000 WHERE seq <= 2000 OR (seq - 1) DIV 50 + 1 > 40;
UPDATE seats s JOIN reservations r ON r.schedule_id = s.schedule_id AND r.seat_number = s.seat_number AND r.status = 'HELD'
  SET s.status = 'HELD', s.reservation_id = r.id, s.held_until = r.held_until;
ANALYZE TABLE concerts, schedules, seats, reservations;
SQL

schedule="UNHEX(CONCAT('d', LPAD(HEX(7), 31, '0')))"
concert="UNHEX(CONCAT('c', LPAD(HEX(7), 31, '0')))"
reservation="UNHEX(CONCAT('e', LPAD(HEX(7), 31, '0')))"
queries=(
  "Seat map (cache load)|SELECT seat_number, price, status, reservation_id, held_until FROM seats WHERE schedule_id = $schedule ORDER BY seat_number"
  "A date (cache load, hold pre-check)|SELECT id, concert_id, starts_at, booking_opens_at, booking_closes_at FROM schedules WHERE id = $schedule"
  "A concert's dates (cache load)|SELECT id, concert_id, starts_at, booking_opens_at, booking_closes_at FROM schedules WHERE concert_id = $concert ORDER BY starts_at, id"
  "Every concert (cache load)|SELECT id, title, venue FROM concerts ORDER BY title, id"
  "Hold: the seat row, locked|SELECT seat_number, price, status, reservation_id, held_until FROM seats WHERE schedule_id = $schedule AND seat_number = 7 FOR UPDATE"
  "Hold: the conditional take|UPDATE seats SET status = 'HELD', reservation_id = $reservation, held_until = UTC_TIMESTAMP(6), version = version + 1 WHERE schedule_id = $schedule AND seat_number = 7 AND (status = 'AVAILABLE' OR (status = 'HELD' AND held_until <= UTC_TIMESTAMP(6)))"
  "Cancel / expire: the conditional transition|UPDATE reservations SET status = 'CANCELLED', updated_at = UTC_TIMESTAMP(6) WHERE id = $reservation AND status = 'HELD' AND held_until > UTC_TIMESTAMP(6)"
  "Cancel / expire: free the seat if it is still this hold's|UPDATE seats s JOIN reservations r ON r.schedule_id = s.schedule_id AND r.seat_number = s.seat_number SET s.status = 'AVAILABLE', s.reservation_id = NULL, s.held_until = NULL, s.version = s.version + 1 WHERE r.id = $reservation AND s.reservation_id = $reservation"
  "Expiry job: run-out holds, oldest first|SELECT id, user_id, schedule_id, seat_number, price, status, held_until, created_at FROM reservations WHERE status = 'HELD' AND held_until <= UTC_TIMESTAMP(6) ORDER BY held_until LIMIT 200"
  "A reservation|SELECT id, user_id, schedule_id, seat_number, price, status, held_until, created_at FROM reservations WHERE id = $reservation"
)

out=docs/report/explain.md
{
  echo "# Query plans of the hot booking queries"
  echo
  echo "Generated by \`docs/explain.sh\` (run by \`make bench\`); do not edit by hand. $(sql -N -e 'SELECT VERSION()'),"
  echo "on a scratch database of 200 dates x 50 seats and 6,000 reservations (2,000 live holds, a third run out)."
  echo "Every query reads through a key: \`type\` is \`const\`, \`ref\`, \`eq_ref\` or \`range\`, never \`ALL\`, except"
  echo "the concert list (a small table, read once an hour by the cache)."
  for entry in "${queries[@]}"; do
    title=${entry%%|*}; query=${entry#*|}
    echo; echo "## $title"; echo; echo '```sql'; echo "$query"; echo '```'; echo
    sql "$db" --table -e "EXPLAIN $query" | sed 's/^/    /'
  done
} >"$out"
echo "written to $out"
