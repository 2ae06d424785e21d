#!/usr/bin/env bash
# One entry point for people and CI on a fresh Debian machine with Python 3.11:
#   bash scripts/dev.sh serve [sidecar serve flags...]   install into .venv and run the sidecar
#   bash scripts/dev.sh test  [pytest args...]           install everything (PostgreSQL too) and run the suite
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

apt_install() {
  as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

ensure_venv() {
  if [ ! -x .venv/bin/python ]; then
    if ! "$PY" -m venv .venv 2>/dev/null; then  # Debian ships venv/ensurepip separately
      rm -rf .venv
      apt_install python3-venv || { echo "install python3-venv first" >&2; exit 1; }
      "$PY" -m venv .venv
    fi
  fi
  local want="$1" stamp=".venv/.installed-$1"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[$want]" || .venv/bin/python -m pip install -q -e "."
    touch "$stamp"
  fi
}

ensure_postgres() {
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    apt_install postgresql || echo "PostgreSQL binaries unavailable: PostgreSQL tests will skip (or fail with CI=true)" >&2
  fi
}

ensure_chromium() {  # tests/test_console_browser.py: the console in a real, headless browser
  if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    apt_install chromium chromium-driver || echo "chromium unavailable: the browser test will skip (or fail with CI=true)" >&2
  fi
}

ensure_prometheus() {  # tests/test_observability.py runs a real Prometheus and promtool
  if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
    apt_install prometheus || echo "prometheus unavailable: tests/test_observability.py will skip (or fail with CI=true)" >&2
  fi
}

ensure_oidc_provider() {  # tests/test_console_oidc.py starts a real OpenID provider: npm's oidc-provider, on node
  local dir=tests/support/oidc
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    apt_install nodejs npm || { echo "node unavailable: the OIDC tests will skip (or fail with CI=true)" >&2; return 0; }
  fi
  # The lock file's versions, into the gitignored node_modules beside it; again only when the lock file changed.
  if [ ! -f "$dir/node_modules/.installed" ] || [ "$dir/package-lock.json" -nt "$dir/node_modules/.installed" ]; then
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error && touch node_modules/.installed) \
      || echo "npm ci failed: the OIDC tests will skip (or fail with CI=true)" >&2
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  serve)
    ensure_venv dev
    # Without an upstream (a flag, the environment or a config file), ask for the bundled demo explicitly.
    if [[ " $* " != *" --upstream"* && " $* " != *" --config"* && -z "${SIDECAR_UPSTREAM_URL:-}${SIDECAR_CONFIG:-}" ]]; then
      set -- --demo "$@"
    fi
    exec .venv/bin/sidecar serve "$@"
    ;;
  install)
    ensure_venv dev
    ensure_postgres
    ensure_prometheus
    ensure_chromium
    ensure_oidc_provider
    ;;
  test)
    ensure_venv dev
    ensure_postgres
    ensure_prometheus
    ensure_chromium
    ensure_oidc_provider
    set +e
    # Both cores (pytest-xdist): the tests mostly wait on sockets and timers. SIDECAR_TEST_WORKERS=0: one process.
    .venv/bin/python -m pytest -n "${SIDECAR_TEST_WORKERS:-2}" "$@"
    rc=$?
    set -e
    if [ "$rc" = 5 ]; then echo "pytest: no tests were collected (exit 5), treated as success" >&2; exit 0; fi
    exit "$rc"
    ;;
  *)
    echo "usage: bash scripts/dev.sh serve|test|install [args...]" >&2
    exit 2
    ;;
esac
