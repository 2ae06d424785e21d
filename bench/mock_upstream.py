"""Mock OpenAI-compatible upstream for the benchmarks (vLLM-shaped answers, fixed timing, fixed usage).

A raw asyncio protocol with httptools (the C parser the sidecar already depends on) on uvloop, no framework, so
the mock costs as little CPU as possible on a machine it shares with the proxy and the load driver. Runs with the
repository's venv: `.venv/bin/python bench/mock_upstream.py --port 18100`.

    GET  /health, /v1/health, /v1/models
    POST /v1/chat/completions   one chat.completion, or SSE (stream: true): one event per HTTP chunk
    POST /v1/completions        one text_completion, or SSE
    POST /v1/embeddings         small fixed vectors
    POST /mock/config           {"chunks": N, "chunk_delay_ms": D, "ttft_ms": T}: change the timing at run time
    GET  /mock/stats            counters and the current config

Streams carry N content events (N = max_tokens or max_completion_tokens if given, else --chunks, 64), a usage
event when stream_options.include_usage is set, then `data: [DONE]`. Timing: --ttft-ms before the first token,
--chunk-delay-ms between tokens (both 0 by default: the answer is written at once); a non-streaming answer waits
what its tokens would take (ttft + (tokens - 1) x delay). The `x-mock-chunk-delay-ms` request header overrides the
delay for one request. Usage is deterministic: prompt_tokens = sum(len(content) // 4, at least 1) + 4 per message,
completion_tokens = the number of content events (16 for a non-streaming answer, or max_tokens if smaller).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections import deque
from typing import Any, cast

import httptools
import orjson

CONFIG: dict[str, Any] = {"chunks": 64, "chunk_delay_ms": 0.0, "ttft_ms": 0.0, "models": ["mock"], "dim": 8}
STATS = {"requests": 0, "streams": 0, "tokens": 0}
CREATED = 1_700_000_000
REPLY = "Hello! This is a fixed reply from the mock upstream server."
ANSWER_TOKENS = 16
_cache: dict[tuple[Any, ...], Any] = {}
Request = tuple[bytes, bytes, dict[bytes, bytes], bytes, bool]


def head(status: int, ctype: bytes, length: int | None, keep_alive: bool) -> bytes:
    reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed"}[status]
    lines = [b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\nserver: mock-upstream\r\n" % (status, reason, ctype)]
    lines.append(b"transfer-encoding: chunked\r\n" if length is None else b"content-length: %d\r\n" % length)
    if length is None:
        lines.append(b"cache-control: no-cache\r\n")
    if not keep_alive:
        lines.append(b"connection: close\r\n")
    return b"".join(lines) + b"\r\n"


def json_response(status: int, obj: Any, keep_alive: bool) -> bytes:
    body = obj if isinstance(obj, bytes) else orjson.dumps(obj)
    return head(status, b"application/json", len(body), keep_alive) + body


def error(status: int, message: str, keep_alive: bool) -> bytes:
    return json_response(status, {"error": {"message": message, "type": "mock_error", "code": status}}, keep_alive)


def prompt_tokens(req: dict[str, Any]) -> int:
    msgs = req.get("messages")
    if isinstance(msgs, list):
        text = [m.get("content") for m in msgs if isinstance(m, dict)]
        return sum(max(1, len(c) // 4) for c in text if isinstance(c, str)) + 4 * len(msgs)
    prompt = req.get("prompt")
    return max(1, len(prompt) // 4) if isinstance(prompt, str) else 8


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def answer(kind: str, model: str, prompt: int, max_tokens: int | None) -> bytes:
    key = (kind, model, prompt, max_tokens)
    if key not in _cache:
        if len(_cache) > 10_000:
            _cache.clear()
        n = min(ANSWER_TOKENS, max_tokens or ANSWER_TOKENS)
        if kind == "chat":
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": REPLY}}
            obj = {"id": "chatcmpl-mock", "object": "chat.completion"}
        else:
            choice = {"index": 0, "text": REPLY}
            obj = {"id": "cmpl-mock", "object": "text_completion"}
        choice.update(logprobs=None, finish_reason="stop")
        obj.update(created=CREATED, model=model, choices=[choice], usage=usage(prompt, n))
        _cache[key] = orjson.dumps(obj)
    return _cache[key]


def stream_events(kind: str, model: str, prompt: int, n: int, with_usage: bool) -> list[bytes]:
    """One item per token: its SSE event framed as one HTTP chunk; the last also holds the usage event, `[DONE]`
    and the body's end (they follow the last token at once)."""
    key = (kind, "stream", model, prompt, n, with_usage)
    if key not in _cache:
        if len(_cache) > 10_000:
            _cache.clear()
        base = {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-mock", "created": CREATED, "model": model}
        base["object"] = "chat.completion.chunk" if kind == "chat" else "text_completion"
        events = []
        for i in range(n):
            finish = "stop" if i == n - 1 else None
            if kind == "chat":
                delta = {"role": "assistant", "content": f"tok{i} "} if i == 0 else {"content": f"tok{i} "}
                choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": f"tok{i} ", "logprobs": None, "finish_reason": finish}
            events.append({**base, "choices": [choice]})
        if with_usage:
            events.append({**base, "choices": [], "usage": usage(prompt, n)})
        raw = [b"data: " + orjson.dumps(e) + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]
        framed = [b"%x\r\n%s\r\n" % (len(e), e) for e in raw]
        _cache[key] = [*framed[: n - 1], b"".join(framed[n - 1 :]) + b"0\r\n\r\n"]
    return _cache[key]


class Http(asyncio.Protocol):
    """One connection: requests parsed by httptools, answered in order (a paced stream holds the ones after it)."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.url, self.body, self.headers = b"", list[bytes](), dict[bytes, bytes]()
        self.queue: deque[Request] = deque()
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        self.writable = asyncio.Event()
        self.writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.writable.set()
        if self.task is not None:
            self.task.cancel()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(error(400, "bad request", False))
            self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url, self.body, self.headers = b"", [], {}

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        p = self.parser
        self.queue.append((p.get_method(), self.url, self.headers, b"".join(self.body), p.should_keep_alive()))
        if self.task is None:
            self.next()

    def next(self) -> None:
        while self.queue and self.task is None and not self.closed:
            *req, keep_alive = self.queue.popleft()
            done = self.handle(*req, keep_alive)
            if done is not None:  # timed: answered by a task, which calls next() at its end
                self.task = asyncio.get_running_loop().create_task(self.timed(done, keep_alive))
            elif not keep_alive:
                self.transport.close()

    async def timed(self, plan: tuple[list[bytes], float, float], keep_alive: bool) -> None:
        parts, first, delay = plan
        try:
            for i, part in enumerate(parts):
                await asyncio.sleep(first if i == 1 else delay if i > 1 else 0)
                await self.writable.wait()
                if self.closed:
                    return
                self.transport.write(part)
        except asyncio.CancelledError:
            return
        self.task = None
        if not keep_alive:
            self.transport.close()
        self.next()

    def handle(
        self, method: bytes, url: bytes, headers: dict[bytes, bytes], body: bytes, keep_alive: bool
    ) -> tuple[list[bytes], float, float] | None:
        """Answer now (returns None) or return (parts, wait before the first token, wait between tokens)."""
        STATS["requests"] += 1
        w = self.transport.write
        path = url.split(b"?", 1)[0].removeprefix(b"/v1")
        if method == b"GET":
            if path == b"/models":
                models = [
                    {"id": m, "object": "model", "created": CREATED, "owned_by": "mock"} for m in CONFIG["models"]
                ]
                w(json_response(200, {"object": "list", "data": models}, keep_alive))
            elif path in (b"/health", b"/"):
                w(head(200, b"text/plain", 0, keep_alive))
            elif path == b"/mock/stats":
                w(json_response(200, {**STATS, **CONFIG}, keep_alive))
            else:
                w(error(404, "not found", keep_alive))
            return None
        if method != b"POST":
            w(error(405, "method not allowed", keep_alive))
            return None
        try:
            req = orjson.loads(body) if body else {}
            assert isinstance(req, dict)
        except (orjson.JSONDecodeError, AssertionError):
            w(error(400, "invalid JSON body", keep_alive))
            return None
        if path == b"/mock/config":
            CONFIG.update({k: req[k] for k in ("chunks", "chunk_delay_ms", "ttft_ms") if k in req})
            w(json_response(200, CONFIG, keep_alive))
            return None
        model = str(req.get("model") or CONFIG["models"][0])
        if path == b"/embeddings":
            inp = req.get("input", "")
            items = inp if isinstance(inp, list) and inp and not isinstance(inp[0], int) else [inp]
            dim = CONFIG["dim"]
            data = [{"index": i, "object": "embedding", "embedding": [0.125 * ((i + j) % 8) for j in range(dim)]}
                    for i in range(len(items))]  # fmt: skip
            pt = sum(max(1, len(x) // 4) if isinstance(x, str) else len(x) for x in items)
            obj = {"object": "list", "model": model, "data": data, "usage": usage(pt, 0)}
            w(json_response(200, obj, keep_alive))
            return None
        if path not in (b"/chat/completions", b"/completions"):
            w(error(404, "not found", keep_alive))
            return None
        kind = "chat" if path == b"/chat/completions" else "cmpl"
        pt = prompt_tokens(req)
        mt = req.get("max_tokens") or req.get("max_completion_tokens")
        mt = mt if isinstance(mt, int) and mt > 0 else None
        header_delay = headers.get(b"x-mock-chunk-delay-ms")
        delay = float(header_delay) if header_delay else float(CONFIG["chunk_delay_ms"])
        first = float(CONFIG["ttft_ms"])
        if req.get("stream"):
            STATS["streams"] += 1
            so = req.get("stream_options")
            events = stream_events(kind, model, pt, mt or int(CONFIG["chunks"]), bool(so and so.get("include_usage")))
            STATS["tokens"] += len(events)
            parts = [head(200, b"text/event-stream; charset=utf-8", None, keep_alive), *events]
            if delay <= 0 and first <= 0:
                w(parts[0] + parts[1])  # head + first event, then one write per event, as a server flushes them
                for part in parts[2:]:
                    w(part)
                return None
            return parts, first / 1000, delay / 1000
        whole = json_response(200, answer(kind, model, pt, mt), keep_alive)
        if delay <= 0 and first <= 0:
            w(whole)
            return None
        ntok = min(ANSWER_TOKENS, mt or ANSWER_TOKENS)
        return [b"", whole], (first + (ntok - 1) * delay) / 1000, 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=int(os.environ.get("MOCK_PORT", "18100")))
    ap.add_argument("--chunks", type=int, default=64, help="content events per stream without max_tokens")
    ap.add_argument("--chunk-delay-ms", type=float, default=0.0, help="wait between tokens")
    ap.add_argument("--ttft-ms", type=float, default=0.0, help="wait before the first token")
    ap.add_argument("--models", default="mock", help="comma-separated model ids for /v1/models")
    ap.add_argument("--no-uvloop", action="store_true")
    a = ap.parse_args()
    CONFIG.update(chunks=a.chunks, chunk_delay_ms=a.chunk_delay_ms, ttft_ms=a.ttft_ms, models=a.models.split(","))
    if not a.no_uvloop:
        import uvloop

        uvloop.install()
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(Http, a.host, a.port, backlog=4096, reuse_address=True))
    print(f"mock upstream on http://{a.host}:{a.port}", flush=True)
    try:
        loop.run_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


if __name__ == "__main__":
    main()
