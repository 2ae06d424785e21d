#!/usr/bin/env bash
# Quick A/B for one change: the sidecar vs the aiohttp floor (bench/aiohttp_passthrough.py) on the repository's
# mock upstream, one run each, CPU µs per request from /proc/PID/stat (utime+stime).
#   bash bench/quick.sh chat|stream [seconds] [-- extra sidecar serve args]
# Env: SIDECAR_* options apply to the sidecar (SIDECAR_BIN replaces its command); BENCH_AUTH sets the
# Authorization header (default: one key with limits never reached, made through the admin API).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
kind=${1:-chat}; secs=${2:-5}; shift 2 || true
[ "${1:-}" = "--" ] && shift
bench_tools
WORK=$(mktemp -d)
bench_mock 18100
bench_sidecar 18110 http://127.0.0.1:18100 "$WORK" "$WORK/sidecar.log" "$@"
disown "$SC"
bench_floor 18102 http://127.0.0.1:18100
trap 'kill -9 $MOCK $SC $AIO 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"' EXIT
bench_wait http://127.0.0.1:18110/healthz && bench_wait http://127.0.0.1:18102/ && bench_wait http://127.0.0.1:18100/health
if [ -z "${BENCH_AUTH:-}" ]; then
  BENCH_AUTH="Bearer $(bench_key quick)"
fi
printf '{"model":"mock","messages":[{"role":"user","content":"Hello, how are you?"}]%s}' \
  "$([ "$kind" = stream ] && echo ',"stream":true,"max_tokens":64' || true)" > "$WORK/body.json"
bench_loadgen "$WORK"
cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }
cpus() { awk '{print $14" "$15}' "/proc/$1/stat"; }
load() {
  if [ "$kind" = stream ]; then
    "$WORK/loadgen" -c 16 -d "$secs" -w 0 -S -b "$WORK/body.json" -H "Authorization: $BENCH_AUTH" "$1/v1/chat/completions" | tail -1
  else
    BENCH_BODY=$WORK/body.json BENCH_AUTH=$BENCH_AUTH wrk -t1 -c16 -d"${secs}s" -s bench/wrk_post.lua "$1/v1/chat/completions" | tail -1
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
n = j.get("requests") or 0
tick = os.sysconf("SC_CLK_TCK")
us = (c1 - c0) / tick * 1e6 / max(n, 1)
lat = j.get("latency_ms") or j.get("total_ms") or {}
ttft = f" ttft_p50={j['ttfb_ms']['p50']}" if "ttfb_ms" in j else ""
print(f"{name:8s} n={n:6d} cpu_us_per_req={us:7.1f} p50={lat.get('p50')} p99={lat.get('p99')}{ttft}")
PY
done
