#!/usr/bin/env bash
# Rows == requests under load: wrk (chat, c16) and bench/loadgen.c (stream, c16) against the sidecar (one key,
# SQLite) on the repository's mock upstream (bench/mock_upstream.py), then a clean stop; every response the load
# generators counted must have its `completed` row, and every row must be accounted for (in-flight requests cut
# by the generators at the end are client_disconnected).
#   bash bench/rows_check.sh [seconds]
# With SIDECAR_AUDIT_CAPTURE=all SIDECAR_AUDIT_SINKS=jsonl set, it also checks one audit record per row.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
secs=${1:-5}
bench_tools
W=$(mktemp -d)
export SIDECAR_SERVER_DRAIN_GRACE=0
bench_mock 18100
bench_sidecar 18110 http://127.0.0.1:18100 "$W" /dev/null
trap 'kill -9 $MOCK $SC 2>/dev/null; wait 2>/dev/null; rm -rf "$W"' EXIT
bench_wait http://127.0.0.1:18100/health && bench_wait http://127.0.0.1:18110/healthz
KEY=$(bench_key rows)
printf '{"model":"mock","messages":[{"role":"user","content":"Hello"}]}' > "$W/chat.json"
printf '{"model":"mock","messages":[{"role":"user","content":"Hello"}],"stream":true,"max_tokens":64}' > "$W/stream.json"
bench_loadgen "$W"
chat=$(BENCH_BODY=$W/chat.json BENCH_AUTH="Bearer $KEY" wrk -t1 -c16 -d"${secs}s" -s bench/wrk_post.lua \
  http://127.0.0.1:18110/v1/chat/completions | tail -1)
stream=$("$W/loadgen" -c 16 -d "$secs" -w 0 -S -b "$W/stream.json" -H "Authorization: Bearer $KEY" \
  http://127.0.0.1:18110/v1/chat/completions | tail -1)
kill -TERM $SC; wait $SC || true
"$PY" - "$chat" "$stream" "$W/s.db" "$W/audit" <<'PY'
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
