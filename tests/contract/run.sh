#!/usr/bin/env bash
# Holds a running concert-server to its own OpenAPI document, as a client's tools would:
#   1. openapi-spec-validator: /api-docs/openapi.json is a valid OpenAPI document;
#   2. schemathesis: every documented route, fed schema-valid and schema-invalid requests,
#      answers only what the document promises (no 5xx, documented statuses and bodies,
#      schema-valid input accepted, invalid input refused, 405 with Allow, ...).
# The tools are installed from PyPI into a virtual environment (.venv, or $CONTRACT_VENV).
# The server is the debug binary `cargo build --workspace --bins` made, on a fresh
# database of the tests' MySQL ($TEST_DATABASE_URL) and their Redis ($TEST_REDIS_URL);
# its public listener is fuzzed, its operations listener (health, metrics) only polled.
# Every request carries a real user's access token and ACTIVE queue token, so that the
# routes behind them are fuzzed, not just refused.
# CONTRACT_SEED picks schemathesis's seed (fixed by default, so CI is repeatable);
# CONTRACT_EXAMPLES how many cases per route.
set -euo pipefail
cd "$(dirname "$0")/../.."

venv=${CONTRACT_VENV:-.venv}
case $venv in /*) ;; *) venv="$PWD/$venv" ;; esac
server=${CONCERT_SERVER_BIN:-target/debug/concert-server}
mysql=${TEST_DATABASE_URL:-mysql://root@127.0.0.1:3306}
redis=${TEST_REDIS_URL:-redis://127.0.0.1:6379}
seed=${CONTRACT_SEED:-20261122}
examples=${CONTRACT_EXAMPLES:-100}

if ! "$venv/bin/python" -c 'import schemathesis, openapi_spec_validator' 2>/dev/null \
  || ! cmp -s tests/contract/requirements.txt "$venv/.requirements"; then
  echo "contract: installing the tools into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/contract/requirements.txt
  cp tests/contract/requirements.txt "$venv/.requirements"
fi
[ -x "$server" ] || { echo "contract: no $server; run cargo build --workspace --bins first" >&2; exit 1; }

work=$(mktemp -d)
database="contract_$(date +%s)_$$"
# Two free ports, both bound at once so that they differ: the public listener's and the
# operations listener's.
ports=$("$venv/bin/python" -c '
import socket
sockets = [socket.socket() for _ in range(2)]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in sockets))
')
read -r port ops_port <<<"$ports"
[ -n "$port" ] && [ -n "$ops_port" ] || { echo "contract: no free ports" >&2; exit 1; }
base="http://127.0.0.1:$port"
ops="http://127.0.0.1:$ops_port"
# At least 16 characters, at least 8 of them distinct (the server refuses weaker keys):
# the fixed prefix alone has 19, 13 distinct.
CONTRACT_ADMIN_KEY="contract-admin-key-$$-$RANDOM$RANDOM"
export CONTRACT_ADMIN_KEY
# Per-client rate limits off (0): every request of the run comes from this one address.
# Room for the fuzzer's holds (one user makes them all), and an access token that outlives
# the run, as the queue token does.
DATABASE_URL="$mysql/$database" REDIS_URL="$redis" HTTP_ADDR="127.0.0.1:$port" OPS_ADDR="127.0.0.1:$ops_port" \
  RUST_LOG=warn QUEUE_NAME="$database" QUEUE_ACTIVE_SECONDS=86400 AUTH_TOKEN_SECONDS=86400 \
  RATE_LIMIT_SIGNUPS_PER_MINUTE=0 RATE_LIMIT_AUTH_PER_MINUTE=0 RATE_LIMIT_QUEUE_TOKENS_PER_MINUTE=0 \
  RATE_LIMIT_CHARGES_PER_MINUTE=0 MAX_HOLDS_PER_USER=50 \
  ADMIN_API_KEY="$CONTRACT_ADMIN_KEY" \
  "$server" >"$work/server.log" 2>&1 &
pid=$!
cleanup() {
  kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  mariadb -h127.0.0.1 -uroot -e "DROP DATABASE IF EXISTS \`$database\`" 2>/dev/null \
    || mysql -h127.0.0.1 -uroot -e "DROP DATABASE IF EXISTS \`$database\`" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# Wait for readiness by polling the operations listener, against a deadline.
deadline=$((SECONDS + 60))
until "$venv/bin/python" -c "import urllib.request, sys; urllib.request.urlopen('$ops/health/ready', timeout=2)" 2>/dev/null; do
  if ! kill -0 "$pid" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
    echo "contract: the server did not become ready" >&2
    cat "$work/server.log" >&2
    exit 1
  fi
  sleep 0.2
done

"$venv/bin/python" -c "import urllib.request; open('$work/openapi.json', 'wb').write(urllib.request.urlopen('$base/api-docs/openapi.json').read())"

# A real user for the run: its access token goes with every request, and its queue token,
# once ACTIVE, with every request too (the routes that take none ignore it; see also
# schemathesis.toml). A generated payment may spend the queue token (a completed payment
# expires it): the booking routes answer 401 from then on, which the document allows. That
# is accepted: the routes were fuzzed with a live token until then, and the order is the
# fuzzer's.
credentials=$("$venv/bin/python" - "$base" <<'PY'
import json, sys, time, urllib.error, urllib.request
base = sys.argv[1]
def call(method, path, body=None, headers=None):
    data = None if body is None else json.dumps(body).encode()
    headers = dict(headers or {})
    if data is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(base + path, method=method, data=data, headers=headers)
    try:
        return json.load(urllib.request.urlopen(request, timeout=5))
    except urllib.error.HTTPError as error:
        sys.exit(f"{method} {path}: {error.code} {error.read().decode(errors='replace')}")
api_key = call("POST", "/api/v1/users", {"name": "contract"})["apiKey"]
access = call("POST", "/api/v1/auth/tokens", headers={"Authorization": f"Bearer {api_key}"})["accessToken"]
bearer = {"Authorization": f"Bearer {access}"}
token = call("POST", "/api/v1/queue/tokens", {}, headers=bearer)["token"]
deadline = time.time() + 60
while call("GET", "/api/v1/queue/tokens/me", headers={**bearer, "Queue-Token": token})["status"] != "ACTIVE":
    if time.time() > deadline:
        sys.exit("the contract run's queue token was never admitted")
    time.sleep(0.1)
print(access, token)
PY
)
read -r CONTRACT_ACCESS_TOKEN CONTRACT_QUEUE_TOKEN <<<"$credentials"
[ -n "$CONTRACT_ACCESS_TOKEN" ] && [ -n "$CONTRACT_QUEUE_TOKEN" ] \
  || { echo "contract: no credentials for the run" >&2; exit 1; }
export CONTRACT_ACCESS_TOKEN CONTRACT_QUEUE_TOKEN
echo "contract: openapi-spec-validator"
"$venv/bin/openapi-spec-validator" --validation-errors all "$work/openapi.json"

echo "contract: schemathesis (seed $seed, $examples examples per route)"
# Run from the scratch directory: schemathesis keeps a cache (.schemathesis/) where it runs.
config="$PWD/tests/contract/schemathesis.toml"
if ! (cd "$work" && "$venv/bin/schemathesis" --config-file "$config" \
  run "$base/api-docs/openapi.json" --url "$base" \
  -H "Authorization: Bearer $CONTRACT_ACCESS_TOKEN" -H "Queue-Token: $CONTRACT_QUEUE_TOKEN" \
  --checks all --max-examples "$examples" --seed "$seed" --no-color); then
  echo "contract: schemathesis found contract breaks; server log follows" >&2
  tail -n 50 "$work/server.log" >&2
  exit 1
fi
# Our own failure lines: a 5xx answered ("request failed") or a panic. (actix-http logs
# malformed requests it refuses with 400 at ERROR; those are the fuzzer's doing.)
if grep -E 'request failed|panicked' "$work/server.log" >&2; then
  echo "contract: the server logged failures during the run (above)" >&2
  exit 1
fi
echo "contract: OK"
