# bench/lib.sh: what bench/quick.sh, profile.sh and rows_check.sh share (sourced, not run). The Debian tools
# (wrk, gcc: installed when missing and run as root), the repository's mock upstream and aiohttp floor run with
# .venv's python, and a sidecar on a fresh SQLite store whose one key is made through its admin API.
# SIDECAR_BIN replaces the sidecar command (default .venv/bin/sidecar).

BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=$BENCH_ROOT/.venv/bin/python
SIDECAR_BIN=${SIDECAR_BIN:-$BENCH_ROOT/.venv/bin/sidecar}

bench_tools() {  # gcc for loadgen.c, wrk for non-streaming load; .venv for everything else
  local need=()
  command -v wrk >/dev/null || need+=(wrk)
  command -v gcc >/dev/null || need+=(gcc libc6-dev)
  if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
      echo "missing ${need[*]}: sudo apt-get install -y wrk gcc libc6-dev" >&2
      exit 1
    fi
  fi
  if [ ! -x "$PY" ]; then
    echo "no .venv: run \`bash scripts/dev.sh install\` first" >&2
    exit 1
  fi
}

bench_loadgen() {  # DIR: builds DIR/loadgen
  gcc -O2 -o "$1/loadgen" "$BENCH_ROOT/bench/loadgen.c"
}

bench_wait() {  # URL: until it answers HTTP (any status), 20 s at most
  "$PY" - "$1" <<'PY'
import sys, time, urllib.error, urllib.request
for _ in range(200):
    try:
        urllib.request.urlopen(sys.argv[1], timeout=2)
        sys.exit(0)
    except urllib.error.HTTPError:
        sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit(f"{sys.argv[1]} did not answer")
PY
}

bench_mock() {  # PORT [mock args...] -> $MOCK (pid); answers on http://127.0.0.1:PORT
  local port=$1
  shift
  "$PY" "$BENCH_ROOT/bench/mock_upstream.py" --port "$port" "$@" >/dev/null 2>&1 &
  MOCK=$!
  disown "$MOCK"  # no "Killed" line from bash when the script's trap ends it
}

bench_floor() {  # PORT UPSTREAM -> $AIO (pid); no key check (PROXY_KEY unset)
  UPSTREAM_KEY=x "$PY" "$BENCH_ROOT/bench/aiohttp_passthrough.py" --port "$1" --upstream "$2" >/dev/null 2>&1 &
  AIO=$!
  disown "$AIO"
}

bench_sidecar() {  # PORT UPSTREAM DATA_DIR LOG [serve args...] -> $SC (pid)
  # The pepper is given (not generated), so any later CLI command on this store agrees with the server; the admin
  # token turns the admin API on (on this port unless SIDECAR_SERVER_OPS_PORT says otherwise).
  local port=$1 upstream=$2 dir=$3 logf=$4
  shift 4
  export SIDECAR_SERVER_DATA_DIR=$dir
  export SIDECAR_STORE_URL=${SIDECAR_STORE_URL:-sqlite:///$dir/s.db}
  export SIDECAR_SERVER_ADMIN_TOKEN=${SIDECAR_SERVER_ADMIN_TOKEN:-bench-admin-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')}
  export SIDECAR_AUTH_PEPPER=${SIDECAR_AUTH_PEPPER:-$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')}
  # shellcheck disable=SC2086  # SIDECAR_BIN may be a command with arguments
  $SIDECAR_BIN serve --host 127.0.0.1 --port "$port" --upstream "$upstream/v1" "$@" 2>"$logf" &
  SC=$!
  BENCH_ADMIN=http://127.0.0.1:${SIDECAR_SERVER_OPS_PORT:-$port}
}

bench_key() {  # NAME: prints a new key with limits never reached, made by the running sidecar's admin API
  "$PY" - "$BENCH_ADMIN/admin/keys" "$1" <<'PY'
import json, os, sys, time, urllib.error, urllib.request
body = {"name": sys.argv[2], "rpm": 100_000_000, "tpm": 100_000_000_000, "concurrency": 100_000}
req = urllib.request.Request(sys.argv[1], data=json.dumps(body).encode(), method="POST", headers={
    "Content-Type": "application/json", "Authorization": "Bearer " + os.environ["SIDECAR_SERVER_ADMIN_TOKEN"]})
for _ in range(100):
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            print(json.load(r)["key"])
            sys.exit(0)
    except urllib.error.HTTPError as e:
        sys.exit(f"POST {sys.argv[1]}: {e.code} {e.read()[:300]!r}")
    except OSError:
        time.sleep(0.2)
sys.exit(f"POST {sys.argv[1]}: no answer")
PY
}
