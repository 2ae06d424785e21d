# vLLM's preStop: ask the sidecar (same pod, loopback) to drain, then wait until its in-flight requests are done,
# so vLLM gets SIGTERM only after the streams it serves have ended. Bounded: argv[2] seconds at most (the chart
# derives it from the drain settings, within the pod's grace period). Standard library only: runs in vLLM's image.
# POST /drain starts the drain once and answers its state each time: {"draining", "drained", "in_flight"}.
import json
import sys
import time
import urllib.request

port, bound = int(sys.argv[1]), float(sys.argv[2])
deadline = time.monotonic() + bound
url = f"http://127.0.0.1:{port}/drain"
direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # vLLM's HTTP(S)_PROXY is not for loopback
failures, answered = 0, False
while True:
    try:
        with direct.open(urllib.request.Request(url, method="POST"), timeout=3) as answer:
            state = json.load(answer)
        failures, answered = 0, True
    except (OSError, ValueError) as exc:
        state, failures = {"error": str(exc)}, failures + 1
    # A sidecar that never answered five times running is not there: nothing to wait for. One that answered and
    # then stopped answering may still be draining (a restart, a port closed): wait for it, within the bound.
    if state.get("drained") or (failures >= 5 and not answered) or time.monotonic() >= deadline:
        print(f"sidecar drain: {json.dumps(state)}", file=sys.stderr)
        break
    time.sleep(0.5)
