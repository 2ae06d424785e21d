#!/usr/bin/env bash
# Profile the sidecar under load with py-spy: mock upstream (../shared/bench) + sidecar + wrk or loadgen.
#   bash bench/profile.sh chat|stream [seconds] [extra sidecar serve args...]
# Writes bench-results/profile-<kind>.txt (py-spy --format raw, collapsed stacks) and prints the top frames.
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:-chat}; secs=${2:-10}; shift 2 || true
SHARED=${SHARED:-../shared/bench}
WORK=$(mktemp -d)
mkdir -p bench-results
.venv/bin/pip install -q py-spy >/dev/null 2>&1 || true
/tmp/bench-venv/bin/python "$SHARED/mock_upstream.py" --port 18100 >/dev/null 2>&1 & MOCK=$!
# The full path: one key with high limits (auth, leases), as bench/target.json.
export SIDECAR_SERVER_DATA_DIR=$WORK SIDECAR_STORE_URL="sqlite:///$WORK/s.db"
BENCH_AUTH="Bearer $(.venv/bin/sidecar keys create --name prof --rpm 100000000 --tpm 100000000000 --concurrency 100000 | grep -o 'sk-[^ ]*' | tail -1)"
.venv/bin/sidecar serve --host 127.0.0.1 --port 18110 \
  --upstream http://127.0.0.1:18100/v1 --db "sqlite:///$WORK/s.db" "$@" 2>"$WORK/stderr.log" & SC=$!
trap 'kill $MOCK $SC 2>/dev/null || true; rm -rf "$WORK"' EXIT
sleep 1.5
printf '{"model":"mock","messages":[{"role":"user","content":"Hello, how are you?"}]%s}' \
  "$([ "$kind" = stream ] && echo ',"stream":true,"max_tokens":64' || true)" > "$WORK/body.json"
.venv/bin/py-spy record -r 500 -d "$((secs + 1))" -p $SC -f raw -o "bench-results/profile-$kind.txt" --nonblocking >/dev/null 2>&1 &
SPY=$!
sleep 0.5
if [ "$kind" = stream ]; then
  gcc -O2 -o "$WORK/loadgen" "$SHARED/loadgen.c"
  "$WORK/loadgen" -c 16 -d "$secs" -S -b "$WORK/body.json" -H "Authorization: ${BENCH_AUTH:-Bearer x}" \
    http://127.0.0.1:18110/v1/chat/completions | tail -1
else
  BENCH_BODY=$WORK/body.json BENCH_AUTH="${BENCH_AUTH:-Bearer x}" wrk -t1 -c16 -d"${secs}s" \
    -s "$SHARED/wrk_post.lua" http://127.0.0.1:18110/v1/chat/completions | tail -1
fi
wait $SPY || true
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
