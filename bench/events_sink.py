#!/usr/bin/env python3
"""A local CloudEvents batch receiver for the export benchmark: counts the events of each POSTed
`application/cloudevents-batch+json` array and answers 204, nothing else (its CPU is not the sidecar's).
Prints the event count at exit (SIGTERM/SIGINT).

    python3 bench/events_sink.py --port 8788
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Sink(BaseHTTPRequestHandler):
    posts = 0
    events = 0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        Sink.posts += 1
        Sink.events += len(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def do_GET(self) -> None:  # the count so far, for a benchmark polling it
        text = json.dumps({"posts": Sink.posts, "events": Sink.events}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)

    def log_message(self, format: str, *args: object) -> None:
        return


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8788)
    port = ap.parse_args().port
    server = ThreadingHTTPServer(("127.0.0.1", port), Sink)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a KeyboardInterrupt out of serve_forever
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    print(f"events_sink: {Sink.events} events in {Sink.posts} posts", flush=True)


if __name__ == "__main__":
    main()
