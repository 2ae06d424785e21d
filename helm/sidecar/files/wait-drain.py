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
failures = 0
while True:
    try:
        with direct.open(urllib.request.Request(url, method="POST"), timeout=3) as answer:
            state = json.load(answer)
        failures = 0
    except (OSError, ValueError) as exc:
        state, failures = {"error": str(exc)}, failures + 1
    # A sidecar that does not answer five times running is gone: nothing is left to wait for.
    if state.get("drained") or failures >= 5 or time.monotonic() >= deadline:
        print(f"sidecar drain: {json.dumps(state)}", file=sys.stderr)
        break
    time.sleep(0.5)
