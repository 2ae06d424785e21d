#!/usr/bin/env bash
# Rows == requests under load: wrk (chat, c16) and loadgen (stream, c16) against the sidecar with a key and
# SQLite, then a clean stop; every response the load generators counted must have its `completed` row, and
# every row must be accounted for (in-flight requests cut by the generators at the end are client_disconnected).
#   bash bench/rows_check.sh [seconds]
# With SIDECAR_AUDIT_CAPTURE=all SIDECAR_AUDIT_SINKS=jsonl set, it also checks one audit record per row.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
SHARED=${SHARED:-../shared/bench}
W=$(mktemp -d)
export SIDECAR_SERVER_DATA_DIR=$W SIDECAR_STORE_URL=sqlite:///$W/s.db SIDECAR_SERVER_DRAIN_GRACE=0
KEY=$(.venv/bin/sidecar keys create --name rows --rpm 100000000 --tpm 100000000000 --concurrency 100000 2>/dev/null)
/tmp/bench-venv/bin/python "$SHARED/mock_upstream.py" --port 18100 >/dev/null 2>&1 & MOCK=$!
.venv/bin/sidecar serve --port 18110 --upstream http://127.0.0.1:18100/v1 2>/dev/null & SC=$!
trap 'kill -9 $MOCK $SC 2>/dev/null || true; rm -rf "$W"' EXIT
for _ in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:18110/healthz && break; sleep 0.1; done
printf '{"model":"mock","messages":[{"role":"user","content":"Hello"}]}' > "$W/chat.json"
printf '{"model":"mock","messages":[{"role":"user","content":"Hello"}],"stream":true,"max_tokens":64}' > "$W/stream.json"
gcc -O2 -o "$W/loadgen" "$SHARED/loadgen.c"
chat=$(BENCH_BODY=$W/chat.json BENCH_AUTH="Bearer $KEY" wrk -t1 -c16 -d"${secs}s" -s "$SHARED/wrk_post.lua" \
  http://127.0.0.1:18110/v1/chat/completions | tail -1)
stream=$("$W/loadgen" -c 16 -d "$secs" -w 0 -S -b "$W/stream.json" -H "Authorization: Bearer $KEY" \
  http://127.0.0.1:18110/v1/chat/completions | tail -1)
kill -TERM $SC; wait $SC || true
python3 - "$chat" "$stream" "$W/s.db" "$W/audit" <<'PY'
import json, pathlib, sqlite3, sys
chat = json.loads(sys.argv[1][sys.argv[1].index("{"):])
stream = json.loads(sys.argv[2][sys.argv[2].index("{"):])
db = sqlite3.connect(sys.argv[3])
rows = dict(db.execute("SELECT stream || ':' || outcome, COUNT(*) FROM request_log GROUP BY 1"))
print("wrk completed:", chat["requests"], " loadgen streams completed:", stream["requests"], " errors:", chat["errors"], stream["errors"])
print("rows:", rows)
# A generator counts the responses it read before its timer ran out; requests still in flight then (at most one
# per connection) were served or cut afterwards, so they have rows the generator did not count.
for kind, counted in (("0", chat["requests"]), ("1", stream["requests"])):
    done, cut = rows.get(f"{kind}:completed", 0), rows.get(f"{kind}:client_disconnected", 0)
    assert done >= counted, f"{kind}: {done} completed rows < {counted} counted responses"
    assert done + cut - counted <= 32, f"{kind}: {done + cut - counted} rows beyond 2 per connection"
    assert sum(rows.values()) == rows.get("0:completed", 0) + rows.get("0:client_disconnected", 0) + \
        rows.get("1:completed", 0) + rows.get("1:client_disconnected", 0), "rows with other outcomes"
print("OK: one row per counted response, plus one per request in flight at the end (at most 2 per connection)")
audit = pathlib.Path(sys.argv[4])
if audit.exists():
    ids = [json.loads(line)["request_id"] for f in sorted(audit.glob("audit-*.jsonl")) for line in f.open()]
    # A request is audited once its key is known (the key's own audit setting decides); one cancelled while
    # its key was still being looked up (the client left at that moment) has no key and no record.
    stored = {r for (r,) in db.execute("SELECT request_id FROM request_log WHERE key_id IS NOT NULL")}
    keyless = db.execute("SELECT outcome, COUNT(*) FROM request_log WHERE key_id IS NULL GROUP BY 1").fetchall()
    print("audit records:", len(ids), " distinct:", len(set(ids)), " rows with a key:", len(stored), " without:", keyless)
    assert len(ids) == len(set(ids)) and set(ids) == stored, "audit records != requests"
    print("OK: one audit record per request, none lost")
PY
