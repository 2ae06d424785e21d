-- bench/wrk_post.lua: wrk script for the repository's benchmarks (bench/run.py, bench/*.sh).
-- POST a JSON body read from $BENCH_BODY, optional auth header
-- from $BENCH_AUTH (full header value, e.g. "Bearer sk-..."), optional extra
-- header $BENCH_HDR ("Name: value"). done() prints one JSON line prefixed
-- with "JSON " so the harness can parse it.
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
local auth = os.getenv("BENCH_AUTH")
if auth and auth ~= "" then wrk.headers["Authorization"] = auth end
local extra = os.getenv("BENCH_HDR")
if extra and extra ~= "" then
  local k, v = extra:match("^([^:]+):%s*(.*)$")
  if k then wrk.headers[k] = v end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'JSON {"tool":"wrk","requests":%d,"duration_s":%.3f,"rps":%.2f,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_ms":{"mean":%.3f,"p50":%.3f,"p90":%.3f,"p99":%.3f,"max":%.3f}}\n',
    summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6), summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean / 1e3, latency:percentile(50) / 1e3, latency:percentile(90) / 1e3,
    latency:percentile(99) / 1e3, latency.max / 1e3))
end
