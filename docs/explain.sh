#!/usr/bin/env bash
# Writes docs/report/explain.md: the plan MariaDB chooses for every hot statement, on a
# scratch database filled to a realistic shape (200 dates x 50 seats, 6,000 reservations
# of which 2,000 are live holds, a third of them run out; 2,000 users with point accounts
# and 10,000 idempotency keys). This script makes and fills the database; the explain
# program (tests/src/bin/explain.rs) explains the statements of
# crates/adapters-mysql/src/sql.rs, the very constants the adapters run, with sample values
# bound to their `?`s, and writes the report. Run by `make bench`; needs the server and
# explain binaries (release build if there is one, else debug: `cargo build --bins`) and
# the mariadb client; drops what it made.
set -euo pipefail
cd "$(dirname "$0")/.."

server=${CONCERT_SERVER_BIN:-target/release/concert-server}
[ -x "$server" ] || server=target/debug/concert-server
explain=${EXPLAIN_BIN:-target/release/explain}
[ -x "$explain" ] || explain=target/debug/explain
[ -x "$explain" ] || { echo "no explain binary: cargo build --bins first" >&2; exit 1; }
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
-- Every user has a point account and five idempotency keys ('k-1' .. 'k-5').
INSERT INTO point_accounts (user_id, balance, version, updated_at)
  SELECT id, 100000, 1, NOW(6) FROM users;
INSERT INTO idempotency_keys (user_id, idem_key, fingerprint, response, created_at, expires_at)
  SELECT u.id, CONCAT('k-', n.seq), REPEAT('0', 64), '{}', NOW(6), NOW(6) + INTERVAL 1 DAY
  FROM users u JOIN seq_1_to_5 n;
ANALYZE TABLE users, concerts, schedules, seats, reservations, point_accounts, idempotency_keys;
SQL

# The statements, their sample values and the report are the explain program's: it
# explains the constants of crates/adapters-mysql/src/sql.rs, the SQL the adapters run.
EXPLAIN_DATABASE_URL="$mysql_url/$db" "$explain" docs/report/explain.md
