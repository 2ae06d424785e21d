#!/usr/bin/env bash
# Profile the sidecar under load with py-spy (installed into .venv from PyPI if missing): the repository's mock
# upstream (bench/mock_upstream.py), the sidecar with one key, wrk (chat) or bench/loadgen.c (stream).
#   bash bench/profile.sh chat|stream [seconds] [extra sidecar serve args...]
# Writes bench-results/profile-<kind>.txt (py-spy --format raw, collapsed stacks) and prints the top frames.
# py-spy attaches with ptrace: run as root, or allow it (sysctl kernel.yama.ptrace_scope=0).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
kind=${1:-chat}; secs=${2:-10}; shift 2 || true
bench_tools
WORK=$(mktemp -d)
mkdir -p bench-results
[ -x .venv/bin/py-spy ] || .venv/bin/python -m pip install -q py-spy
bench_mock 18100
# The full path: one key with high limits (auth, leases), as bench/run.py's sidecar target.
bench_sidecar 18110 http://127.0.0.1:18100 "$WORK" "$WORK/stderr.log" "$@"
trap 'kill $MOCK $SC 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"' EXIT
bench_wait http://127.0.0.1:18100/health && bench_wait http://127.0.0.1:18110/healthz
BENCH_AUTH="Bearer $(bench_key prof)"
printf '{"model":"mock","messages":[{"role":"user","content":"Hello, how are you?"}]%s}' \
  "$([ "$kind" = stream ] && echo ',"stream":true,"max_tokens":64' || true)" > "$WORK/body.json"
bench_loadgen "$WORK"
.venv/bin/py-spy record -r 500 -d "$((secs + 1))" -p $SC -f raw -o "bench-results/profile-$kind.txt" --nonblocking >/dev/null 2>&1 &
SPY=$!
sleep 0.5
cpu() { awk '{print $14+$15}' "/proc/$SC/stat"; }
c0=$(cpu)
if [ "$kind" = stream ]; then
  out=$("$WORK/loadgen" -c 16 -d "$secs" -S -b "$WORK/body.json" -H "Authorization: $BENCH_AUTH" \
    http://127.0.0.1:18110/v1/chat/completions | tail -1)
else
  out=$(BENCH_BODY=$WORK/body.json BENCH_AUTH=$BENCH_AUTH wrk -t1 -c16 -d"${secs}s" \
    -s bench/wrk_post.lua http://127.0.0.1:18110/v1/chat/completions | tail -1)
fi
c1=$(cpu)
echo "$out"
# CPU µs per request (per stream) over the load, utime+stime from /proc: the µs column of the budget table
per=$(python3 -c 'import json,os,sys; j=json.loads(sys.argv[3][sys.argv[3].index("{"):]); n=j.get("requests") or 1; print(round((int(sys.argv[2])-int(sys.argv[1]))/os.sysconf("SC_CLK_TCK")*1e6/n, 1))' "$c0" "$c1" "$out")
echo "cpu µs per request: $per"
wait $SPY || true
python3 bench/profile_table.py "bench-results/profile-$kind.txt" "$per"
python3 - "bench-results/profile-$kind.txt" <<'PY'
import collections, sys
own, incl = collections.Counter(), collections.Counter()
total = 0
for line in open(sys.argv[1]):
    stack, _, n = line.rstrip().rpartition(" ")
    n = int(n); total += n
    frames = stack.split(";")
    own[frames[-1]] += n
    for f in set(frames):
        incl[f] += n
print("total samples", total)
print("-- own --")
for f, n in own.most_common(25): print(f"{100*n/total:5.1f}% {f}")
print("-- inclusive (sidecar) --")
for f, n in incl.most_common(400):
    if "sidecar/" in f: print(f"{100*n/total:5.1f}% {f}")
PY
