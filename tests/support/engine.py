"""A fake model engine that saturates as vLLM's does, for the fairness tests and the fairness benchmark.

`capacity` requests run at once (vLLM's `max_num_seqs`); the rest wait in the engine's own first-come queue,
as vLLM's scheduler keeps them. A running request takes `prompt_tokens * prefill_s` and then `token_s` per
output token (its `max_tokens`, default 16), streamed as chat chunks or answered whole, with OpenAI's usage
(also as the stream's last chunk when asked). Its `/metrics` page reports what vLLM's does:
`vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc` (here the running share
of capacity). Every request is recorded (`Served`: the body fields the proxy may write, when it waited, ran and
ended), so a test can tell who was served when, and how busy the engine was (`utilisation`).

    python -m tests.support.engine PORT [CAPACITY] [TOKEN_MS]
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class Served:
    request_id: str
    user: str | None  # the body's `user`: the tests name the key there
    priority: Any
    cache_salt: Any
    tokens: int
    arrived: float
    started: float = 0.0
    ended: float = 0.0
    cancelled: bool = False


@dataclass
class Engine:
    capacity: int = 4
    token_s: float = 0.005
    prefill_s: float = 0.0
    metrics_down: bool = False  # the metrics page answers 503 (a fallback test)
    served: list[Served] = field(default_factory=list)
    running: int = 0
    url: str = ""
    _waiting: deque[asyncio.Future[None]] = field(default_factory=deque)
    metrics_fetches: int = 0

    def app(self) -> web.Application:
        app = web.Application(handler_args={"handler_cancellation": True})
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        return app

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._waiting if not f.done())

    async def _run_slot(self) -> None:
        if self.running < self.capacity and not self.waiting:
            self.running += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._free()  # handed a slot as it left: pass it on
            raise

    def _free(self) -> None:
        while self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.running -= 1

    async def chat(self, request: web.Request) -> web.StreamResponse:
        doc = await request.json()
        out = int(doc.get("max_tokens") or doc.get("max_completion_tokens") or 16)
        prompt = max(1, len(orjson.dumps(doc.get("messages") or doc.get("prompt") or "")) // 4)
        rec = Served(
            request.headers.get("x-request-id", ""),
            doc.get("user"),
            doc.get("priority"),
            doc.get("cache_salt"),
            prompt + out,
            time.monotonic(),
        )
        self.served.append(rec)
        try:
            await self._run_slot()
        except asyncio.CancelledError:
            rec.cancelled = True
            raise
        rec.started = time.monotonic()
        try:
            return await self._generate(request, doc, prompt, out)
        except (asyncio.CancelledError, ConnectionError):
            rec.cancelled = True
            raise
        finally:
            rec.ended = time.monotonic()
            self._free()

    async def _generate(self, request: web.Request, doc: dict[str, Any], prompt: int, out: int) -> web.StreamResponse:
        if self.prefill_s:
            await asyncio.sleep(prompt * self.prefill_s)
        usage = {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out}
        base = {"id": "chatcmpl-engine", "object": "chat.completion.chunk", "created": 1, "model": doc.get("model")}
        if not doc.get("stream"):
            await asyncio.sleep(out * self.token_s)
            message = {"role": "assistant", "content": "x " * out}
            return web.json_response(
                {**base, "object": "chat.completion", "usage": usage,
                 "choices": [{"index": 0, "message": message, "finish_reason": "length"}]}
            )  # fmt: skip
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(out):
            await asyncio.sleep(self.token_s)
            chunk = {**base, "choices": [{"index": 0, "delta": {"content": "x "}, "finish_reason": None}]}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        if (doc.get("stream_options") or {}).get("include_usage"):
            await resp.write(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "engine-model", "object": "model"}]})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(self, request: web.Request) -> web.Response:
        self.metrics_fetches += 1
        if self.metrics_down:
            return web.Response(status=503, text="down")
        labels = 'engine="0",model_name="engine-model"'
        lines = []
        for name, value in (
            ("vllm:num_requests_running", self.running),
            ("vllm:num_requests_waiting", self.waiting),
            ("vllm:kv_cache_usage_perc", self.running / self.capacity * 0.9),
        ):
            lines += [f"# TYPE {name} gauge", f"{name}{{{labels}}} {float(value)}"]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    def utilisation(self, since: float, until: float) -> float:
        """The share of the engine's capacity that ran requests between `since` and `until` (monotonic)."""
        busy = sum(max(0.0, min(r.ended or until, until) - max(r.started, since)) for r in self.served if r.started)
        return busy / (self.capacity * (until - since))


async def start(engine: Engine, port: int = 0) -> web.AppRunner:
    runner = web.AppRunner(engine.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    engine.url = f"http://127.0.0.1:{bound}"
    return runner


def main() -> None:
    port = int(sys.argv[1])
    capacity = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    token_s = float(sys.argv[3]) / 1000.0 if len(sys.argv) > 3 else 0.005
    engine = Engine(capacity, token_s)
    web.run_app(engine.app(), host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
