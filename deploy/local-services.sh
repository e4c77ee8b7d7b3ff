#!/usr/bin/env bash
# Makes sure MariaDB (root, empty password, over TCP) and Redis answer on 127.0.0.1, and
# that the tools the tests use are there (Python's venv, Chromium and its WebDriver).
# Starts them when they do not; with --install, installs them first where absent
# (Debian/Ubuntu, as root). Waits by polling against a deadline, never by a fixed sleep.
set -euo pipefail

INSTALL=0
[[ "${1:-}" == "--install" ]] && INSTALL=1
DEADLINE_SECONDS=60

log() { echo "local-services: $*" >&2; }

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else log "root is needed for: $*"; return 1
  fi
}

# Polls "$@" until it succeeds or the deadline passes.
wait_for() {
  local what=$1; shift
  local end=$((SECONDS + DEADLINE_SECONDS))
  until "$@" >/dev/null 2>&1; do
    if (( SECONDS >= end )); then log "$what did not answer within ${DEADLINE_SECONDS}s"; return 1; fi
    sleep 0.2
  done
}

apt_install() {
  if [[ $INSTALL -ne 1 ]]; then
    log "$* not installed; run with --install (as root) or install it yourself"
    return 1
  fi
  log "installing $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# PING over bash's /dev/tcp, so no redis-cli is needed.
redis_ping() {
  exec 3<>/dev/tcp/127.0.0.1/6379 || return 1
  printf 'PING\r\n' >&3
  local reply
  IFS= read -r -t 2 reply <&3 || { exec 3>&-; return 1; }
  exec 3>&-
  [[ "$reply" == +PONG* ]]
}

mysql_tcp_login() { mariadb -h127.0.0.1 -uroot -e 'SELECT 1'; }
mysql_socket_ping() { mariadb-admin ping; }

ensure_redis() {
  if redis_ping 2>/dev/null; then log "redis: up"; return; fi
  command -v redis-server >/dev/null 2>&1 || apt_install redis-server
  log "redis: starting"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no
  wait_for redis redis_ping
  log "redis: up"
}

ensure_mariadb() {
  if command -v mariadb >/dev/null 2>&1 && mysql_tcp_login >/dev/null 2>&1; then log "mariadb: up"; return; fi
  command -v mariadbd >/dev/null 2>&1 || [[ -x /usr/sbin/mariadbd ]] || apt_install mariadb-server
  if ! mysql_socket_ping >/dev/null 2>&1; then
    log "mariadb: starting"
    as_root mkdir -p /run/mysqld
    as_root chown mysql:mysql /run/mysqld
    # mariadbd refuses to run as root and then exits silently: run it as mysql.
    as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql
    wait_for mariadb mysql_socket_ping
  fi
  if ! mysql_tcp_login >/dev/null 2>&1; then
    # Debian's root@localhost allows only socket login; let root in over 127.0.0.1 too.
    log "mariadb: allowing root over TCP with an empty password"
    as_root mariadb -e "ALTER USER root@localhost IDENTIFIED VIA mysql_native_password USING PASSWORD('') OR unix_socket;"
  fi
  wait_for "mariadb over TCP" mysql_tcp_login
  log "mariadb: up"
}

# The API contract tests (tests/contract/run.sh) install their tools into a Python
# virtual environment; Debian ships venv support in a package of its own.
ensure_python_venv() {
  if python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then return; fi
  apt_install python3 python3-venv || log "python3-venv missing: the contract tests cannot run"
}

# The browser test of the booking page (tests/e2e/page.rs) drives Debian's Chromium through
# its WebDriver server.
ensure_chromium() {
  if command -v chromedriver >/dev/null 2>&1 && [[ -x /usr/bin/chromium ]]; then return; fi
  apt_install chromium chromium-driver || log "chromium missing: the browser test cannot run"
}

# The load balancer's configuration (deploy/nginx) is checked with `nginx -t` and run in
# front of three instances by tests/e2e/nginx.rs. The package's own server on port 80 is
# not wanted: stopped if the installation started it.
ensure_nginx() {
  if [[ -x /usr/sbin/nginx ]]; then return; fi
  apt_install nginx || { log "nginx missing: the load-balancer test cannot run"; return; }
  as_root /usr/sbin/nginx -s quit >/dev/null 2>&1 || true
}

ensure_redis
ensure_mariadb
ensure_python_venv
ensure_chromium
ensure_nginx
