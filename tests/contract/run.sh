#!/usr/bin/env bash
# Holds a running concert-server to its own OpenAPI document, as a client's tools would:
#   1. openapi-spec-validator: /api-docs/openapi.json is a valid OpenAPI document;
#   2. schemathesis: every documented route, fed schema-valid and schema-invalid requests,
#      answers only what the document promises (no 5xx, documented statuses and bodies,
#      schema-valid input accepted, invalid input refused, 405 with Allow, ...).
# The tools are installed from PyPI into a virtual environment (.venv, or $CONTRACT_VENV).
# The server is the debug binary `cargo build --workspace --bins` made, on a fresh
# database of the tests' MySQL ($TEST_DATABASE_URL) and their Redis ($TEST_REDIS_URL).
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
port=$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
CONTRACT_ADMIN_KEY="contract-admin-key-$$-$RANDOM$RANDOM"
export CONTRACT_ADMIN_KEY
DATABASE_URL="$mysql/$database" REDIS_URL="$redis" HTTP_ADDR="127.0.0.1:$port" RUST_LOG=warn QUEUE_NAME="$database" QUEUE_ACTIVE_SECONDS=86400 \
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

# Wait for readiness by polling, against a deadline.
deadline=$((SECONDS + 60))
until "$venv/bin/python" -c "import urllib.request, sys; urllib.request.urlopen('$base/health/ready', timeout=2)" 2>/dev/null; do
  if ! kill -0 "$pid" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
    echo "contract: the server did not become ready" >&2
    cat "$work/server.log" >&2
    exit 1
  fi
  sleep 0.2
done

"$venv/bin/python" -c "import urllib.request; open('$work/openapi.json', 'wb').write(urllib.request.urlopen('$base/api-docs/openapi.json').read())"

# A real, ACTIVE queue token for the routes that need one (see schemathesis.toml).
CONTRACT_QUEUE_TOKEN=$("$venv/bin/python" - "$base" <<'PY'
import json, sys, time, urllib.request
base = sys.argv[1]
def call(method, path, body=None, headers=None):
    request = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    return json.load(urllib.request.urlopen(request, timeout=5))
user = call("POST", "/api/v1/users", {"name": "contract"})["id"]
token = call("POST", "/api/v1/queue/tokens", {"userId": user})["token"]
deadline = time.time() + 30
while call("GET", "/api/v1/queue/tokens/me", headers={"Queue-Token": token})["status"] != "ACTIVE":
    if time.time() > deadline:
        sys.exit("the contract run's queue token was never admitted")
    time.sleep(0.1)
print(token)
PY
)
export CONTRACT_QUEUE_TOKEN
echo "contract: openapi-spec-validator"
"$venv/bin/openapi-spec-validator" --validation-errors all "$work/openapi.json"

echo "contract: schemathesis (seed $seed, $examples examples per route)"
# Run from the scratch directory: schemathesis keeps a cache (.schemathesis/) where it runs.
config="$PWD/tests/contract/schemathesis.toml"
if ! (cd "$work" && "$venv/bin/schemathesis" --config-file "$config" \
  run "$base/api-docs/openapi.json" --url "$base" \
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
