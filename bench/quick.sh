#!/usr/bin/env bash
# Quick A/B for one change: sidecar vs the aiohttp floor, CPU µs per request from /proc, same mock, one run.
#   bash bench/quick.sh chat|stream [seconds] [-- extra sidecar serve args]
# Env: SIDECAR_* options apply to the sidecar; BENCH_AUTH sets the Authorization header.
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:-chat}; secs=${2:-5}; shift 2 || true
[ "${1:-}" = "--" ] && shift
SHARED=${SHARED:-../shared/bench}
WORK=$(mktemp -d)
/tmp/bench-venv/bin/python "$SHARED/mock_upstream.py" --port 18100 >/dev/null 2>&1 & MOCK=$!
export SIDECAR_SERVER_DATA_DIR=$WORK
if [ "${SIDECAR_AUTH_ENABLED:-true}" != false ] && [ -z "${BENCH_AUTH:-}" ]; then  # one key, limits never reached
  BENCH_AUTH="Bearer $(SIDECAR_STORE_URL="sqlite:///$WORK/s.db" .venv/bin/sidecar keys create --name quick --rpm 100000000 \
    --tpm 100000000000 --concurrency 100000 2>/dev/null | grep -o 'sk-[^ ]*' | tail -1)"
fi
${SIDECAR_BIN:-.venv/bin/sidecar} serve --host 127.0.0.1 --port 18110 \
  --upstream http://127.0.0.1:18100/v1 --db "sqlite:///$WORK/s.db" "$@" 2>/tmp/quick-sidecar.log & SC=$!
UPSTREAM_KEY=x /tmp/bench-venv/bin/python "$SHARED/aiohttp_passthrough.py" --port 18102 --upstream http://127.0.0.1:18100 >/dev/null 2>&1 & AIO=$!
trap 'kill -9 $MOCK $SC $AIO 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:18110/healthz && curl -s -o /dev/null http://127.0.0.1:18102/ && break; sleep 0.1; done
printf '{"model":"mock","messages":[{"role":"user","content":"Hello, how are you?"}]%s}' \
  "$([ "$kind" = stream ] && echo ',"stream":true,"max_tokens":64' || true)" > "$WORK/body.json"
gcc -O2 -o "$WORK/loadgen" "$SHARED/loadgen.c"
cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }
cpus() { awk '{print $14" "$15}' "/proc/$1/stat"; }
load() {
  if [ "$kind" = stream ]; then
    "$WORK/loadgen" -c 16 -d "$secs" -S -b "$WORK/body.json" -H "Authorization: ${BENCH_AUTH:-Bearer x}" "$1/v1/chat/completions" | tail -1
  else
    BENCH_BODY=$WORK/body.json BENCH_AUTH="${BENCH_AUTH:-Bearer x}" wrk -t1 -c16 -d"${secs}s" -s "$SHARED/wrk_post.lua" "$1/v1/chat/completions" | tail -1
  fi
}
for target in "aiohttp $AIO http://127.0.0.1:18102" "sidecar $SC http://127.0.0.1:18110"; do
  set -- $target
  load "$3" >/dev/null  # warm-up
  s0=$(cpus "$2"); c0=$(cpu "$2"); out=$(load "$3"); c1=$(cpu "$2"); s1=$(cpus "$2"); echo "  utime/stime ticks before: $s0 after: $s1" >&2
  python3 - "$1" "$c0" "$c1" "$out" "$kind" <<'PY'
import json, os, sys
name, c0, c1, out, kind = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
j = json.loads(out[out.index("{"):])
n = j.get("requests") or j.get("streams") or j.get("completed") or 0
tick = os.sysconf("SC_CLK_TCK")
us = (c1 - c0) / tick * 1e6 / max(n, 1)
lat = j.get("latency_ms") or j.get("total_ms") or {}
print(f"{name:8s} n={n:6d} cpu_us_per_req={us:7.1f} p50={lat.get('p50')} p99={lat.get('p99')}")
PY
done
