#!/usr/bin/env python3
"""A local OTLP/HTTP traces receiver for the tracing benchmark: reads each export and answers 200 with an
empty ExportTraceServiceResponse, nothing else (its CPU is not the sidecar's). Prints the span count at exit.

    .venv/bin/python bench/otlp_sink.py --port 4318
"""

from __future__ import annotations

import argparse
import signal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Sink(BaseHTTPRequestHandler):
    posts = 0
    bytes_in = 0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        Sink.posts += 1
        Sink.bytes_in += len(body)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=4318)
    port = ap.parse_args().port
    server = ThreadingHTTPServer(("127.0.0.1", port), Sink)
    signal.signal(signal.SIGTERM, lambda *_: server.shutdown())
    try:
        server.serve_forever()
    finally:
        print(f"otlp_sink: {Sink.posts} exports, {Sink.bytes_in} bytes", flush=True)


if __name__ == "__main__":
    main()
