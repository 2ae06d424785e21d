"""A scriptable fake OpenAI-compatible upstream on 127.0.0.1, recording everything it receives.

Tests set `fake.script` (or pass a per-request script through the `x-fake-script` request header, JSON)
to choose JSON or SSE answers, chunk count and pacing, delays before headers, error statuses, dropping the
connection mid-stream, or hanging. Every request is recorded with its path, headers, body, and when the
sidecar closed the connection (`closed_at`), so tests can see the upstream request being cancelled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from aiohttp import web


@dataclass
class Script:
    chunks: int = 5  # content deltas in a stream (one token each)
    usage: bool = True  # whether the upstream supports stream usage at all
    continuous_usage: bool = False  # vLLM's continuous_usage_stats: usage on every chunk
    delay_headers: float = 0.0
    delay_first: float = 0.0  # after headers, before the first event
    delay_chunks: float = 0.0
    status: int = 200
    drop_after: int | None = None  # abort the TCP connection after this many content chunks
    hang_after: int | None = None  # stop sending (keep the connection) after this many content chunks
    prompt_tokens: int = 11
    cached_tokens: int | None = None  # prompt_tokens_details.cached_tokens, as vLLM reports it
    reasoning_tokens: int | None = None  # completion_tokens_details.reasoning_tokens
    crlf: bool = False  # use \r\n\r\n event separators
    no_done: bool = False
    content_length_stream: bool = False  # send the SSE body with a content-length instead of chunked
    delay_before_usage: float = 0.0  # pause between the finish event and the usage event
    # The Responses API (`/v1/responses`, `/responses`): reasoning and function-call argument deltas before and
    # after the text (`chunks`), and an `incomplete` ending (max_output_tokens) instead of `completed`.
    reasoning_chunks: int = 0
    tool_chunks: int = 0
    incomplete: bool = False
    # Anthropic Messages (`/v1/messages`): input_tokens is prompt_tokens less the cache's part, as Anthropic counts
    cache_read_tokens: int | None = 3  # usage.cache_read_input_tokens
    cache_write_tokens: int | None = 4  # usage.cache_creation_input_tokens
    thinking: int = 0  # thinking deltas before the text (a `thinking` block, closed by a `signature_delta`)
    tool: bool = False  # a `tool_use` block after the text, its input streamed in `input_json_delta`s
    delta_input: bool = False  # message_delta repeats input_tokens (vLLM, which has no cache figures, does)


@dataclass
class Received:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    started_at: float
    closed_at: float | None = None  # set when the sidecar went away before the response finished
    finished_at: float | None = None

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)


@web.middleware
async def reject_bad_bodies(request: web.Request, handler: Any) -> web.StreamResponse:
    """A body the fake cannot use gets the 400 a real server would give, not a 500."""
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except (ValueError, TypeError, AttributeError, KeyError, IndexError):
        return web.json_response(
            {"error": {"message": "fake: invalid request", "type": "invalid_request_error", "code": None}}, status=400
        )


# Answers of the shapes other servers use, each with a usage of its own kind (tests/test_routes.py).
SHAPED_ANSWERS: dict[str, Any] = {
    "/completion": {"content": "hi there", "tokens_evaluated": 7, "tokens_predicted": 2, "stop": True},
    "/completions": {"content": "hi there", "tokens_evaluated": 7, "tokens_predicted": 2, "stop": True},
    "/infill": {"content": "x", "tokens_evaluated": 5, "tokens_predicted": 1},
    "/generate": {"text": "hi", "meta_info": {"prompt_tokens": 6, "completion_tokens": 3}},
    "/tokenize": {"tokens": [1, 2, 3, 4]},
    "/detokenize": {"content": "hello"},
    "/apply-template": {"prompt": "<s>hi"},
    "/v1/rerank": {"results": [{"index": 0, "relevance_score": 0.5}], "usage": {"total_tokens": 9}},
    "/rerank": {"results": [{"index": 0, "relevance_score": 0.5}], "usage": {"prompt_tokens": 9, "total_tokens": 9}},
    "/v2/rerank": {"results": [], "usage": {"total_tokens": 9}},
    "/reranking": {"results": [], "usage": {"prompt_tokens": 9, "total_tokens": 9}},
    "/v1/reranking": {"results": [], "usage": {"prompt_tokens": 9, "total_tokens": 9}},
    "/score": {"data": [{"score": 0.1}], "usage": {"prompt_tokens": 8, "total_tokens": 8}},
    "/v1/score": {"data": [{"score": 0.1}], "usage": {"prompt_tokens": 8, "total_tokens": 8}},
    "/pooling": {"data": [{"data": [0.1]}], "usage": {"prompt_tokens": 4, "total_tokens": 4}},
    "/classify": {"data": [{"label": "a"}], "usage": {"prompt_tokens": 4, "total_tokens": 4}},
    "/encode": {"embedding": [0.1], "meta_info": {"prompt_tokens": 4, "completion_tokens": 0}},
    "/embedding": [{"index": 0, "embedding": [[0.1]]}],
    "/embeddings": {"data": [{"embedding": [0.1]}], "usage": {"prompt_tokens": 3, "total_tokens": 3}},
    "/chat/completions": {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}},
    "/v1/messages/count_tokens": {"input_tokens": 12},
    # an upload the sidecar does not read, answered with a usage object (transcriptions are answered without)
    "/v1/audio/translations": {
        "text": "hi",
        "usage": {"prompt_tokens": 300, "completion_tokens": 40, "total_tokens": 340},
    },
}


FAKE_DATE = "Mon, 01 Jan 2001 00:00:00 GMT"
FAKE_CONTENT_TYPE = "application/json;charset=UTF-8"


def openai_usage(s: Script, completion: int) -> dict[str, Any]:
    """A chat or completions usage object as vLLM reports it, with the details the script sets."""
    usage: dict[str, Any] = {
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": s.prompt_tokens + completion,
    }
    if s.cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": s.cached_tokens}
    if s.reasoning_tokens is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": s.reasoning_tokens}
    return usage


def anthropic_usage(s: Script, output: int) -> dict[str, Any]:
    """A Messages `usage` as llama-server reports it: `input_tokens` leaves out the cache's part, so the three
    input figures add up to the script's `prompt_tokens`."""
    read, written = s.cache_read_tokens, s.cache_write_tokens
    usage: dict[str, Any] = {"input_tokens": s.prompt_tokens - (read or 0) - (written or 0), "output_tokens": output}
    if read is not None:
        usage["cache_read_input_tokens"] = read
    if written is not None:
        usage["cache_creation_input_tokens"] = written
    return usage


TOOL_INPUT = ('{"city": ', '"Paris"', "}")  # a tool_use block's input, in the partial_json pieces streamed


def anthropic_message(doc: dict[str, Any], s: Script) -> dict[str, Any]:
    """The whole `message` a Messages request is answered with (the stream's events fold into the same)."""
    content: list[dict[str, Any]] = []
    if s.thinking:
        content.append(
            {"type": "thinking", "thinking": "".join(f"think{i} " for i in range(s.thinking)), "signature": ""}
        )
    content.append({"type": "text", "text": "".join(token(i) for i in range(s.chunks))})
    if s.tool:
        content.append(
            {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": orjson.loads("".join(TOOL_INPUT))}
        )
    output = s.thinking + s.chunks + (len(TOOL_INPUT) if s.tool else 0)
    return {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "content": content,
        "model": doc.get("model"),
        "stop_reason": "tool_use" if s.tool else "end_turn",
        "stop_sequence": None,
        "usage": anthropic_usage(s, output),
    }


def anthropic_events(doc: dict[str, Any], s: Script) -> list[tuple[bool, bytes]]:
    """A Messages stream as (carries output, event bytes): message_start, a ping, each content block's start,
    deltas and stop, message_delta (stop_reason and the output count) and message_stop."""
    message = anthropic_message(doc, s)
    out: list[tuple[bool, bytes]] = []

    def ev(name: str, obj: dict[str, Any], output: bool = False) -> None:
        out.append((output, b"event: " + name.encode() + b"\ndata: " + orjson.dumps({"type": name, **obj}) + b"\n\n"))

    start = {**message, "content": [], "stop_reason": None, "usage": {**message["usage"], "output_tokens": 0}}
    ev("message_start", {"message": start})
    ev("ping", {})
    pieces: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    if s.thinking:
        deltas = [{"type": "thinking_delta", "thinking": f"think{i} "} for i in range(s.thinking)]
        pieces.append(({"type": "thinking", "thinking": ""}, [*deltas, {"type": "signature_delta", "signature": ""}]))
    pieces.append(({"type": "text", "text": ""}, [{"type": "text_delta", "text": token(i)} for i in range(s.chunks)]))
    if s.tool:
        block = {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {}}
        pieces.append((block, [{"type": "input_json_delta", "partial_json": p} for p in TOOL_INPUT]))
    for index, (block, deltas) in enumerate(pieces):
        ev("content_block_start", {"index": index, "content_block": block})
        for delta in deltas:
            ev("content_block_delta", {"index": index, "delta": delta}, delta["type"] != "signature_delta")
        ev("content_block_stop", {"index": index})
    usage = {"output_tokens": message["usage"]["output_tokens"]}
    if s.delta_input:  # vLLM says the input again (with no cache figures)
        usage = {"input_tokens": message["usage"]["input_tokens"], **usage}
    ev("message_delta", {"delta": {"stop_reason": message["stop_reason"], "stop_sequence": None}, "usage": usage})
    ev("message_stop", {})
    return out


def token(i: int) -> str:
    return f"tok{i} "


def vllm_metrics(served: int) -> str:
    """A few of vLLM's series, as its V1 engine names them (vllm/v1/metrics/loggers.py)."""
    labels = 'engine="0",model_name="fake-model"'
    lines = []
    for name, kind, value in (
        ("vllm:num_requests_running", "gauge", 1.0),
        ("vllm:num_requests_waiting", "gauge", 0.0),
        ("vllm:kv_cache_usage_perc", "gauge", 0.25),
        ("vllm:prompt_tokens_total", "counter", 11.0 * served),
        ("vllm:generation_tokens_total", "counter", 5.0 * served),
    ):
        lines += [f"# HELP {name} {name}.", f"# TYPE {name} {kind}", f"{name}{{{labels}}} {value}"]
    ttft = "vllm:time_to_first_token_seconds"
    lines += [f"# HELP {ttft} Histogram of time to first token in seconds.", f"# TYPE {ttft} histogram"]
    lines += [f'{ttft}_bucket{{{labels},le="{le}"}} {served}' for le in ("0.02", "+Inf")]
    lines += [f"{ttft}_count{{{labels}}} {served}", f"{ttft}_sum{{{labels}}} {0.01 * served}"]
    return "\n".join(lines) + "\n"


@dataclass
class FakeUpstream:
    script: Script = field(default_factory=Script)
    received: list[Received] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    url: str = ""
    sent: dict[str, bytes] = field(default_factory=dict)  # x-request-id -> exact body bytes sent
    metrics_fetches: int = 0
    # A test's own handler for every request, instead of the scripted routes below (set any time); with it, the
    # connections served (`peers`) and the requests cancelled by the client's leaving (`cancelled`) are counted.
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None
    peers: list[Any] = field(default_factory=list)
    cancelled: int = 0
    max_model_len: int | None = None  # listed in /v1/models when set, as vLLM lists it

    def app(self) -> web.Application:
        middlewares = [self._own_handler, reject_bad_bodies]
        app = web.Application(
            handler_args={"handler_cancellation": True}, middlewares=middlewares, client_max_size=64 << 20
        )
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_post("/responses", self.responses)  # llama-server's second path
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/invocations", self.chat)  # vLLM dispatches a chat body there
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_route("*", "/{tail:.*}", self.anything)
        return app

    @web.middleware
    async def _own_handler(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.handler is None:
            return await handler(request)  # type: ignore[no-any-return]
        assert request.transport is not None
        self.peers.append(request.transport.get_extra_info("peername"))
        await request.read()
        try:
            return await self.handler(request)
        except (asyncio.CancelledError, ConnectionError):
            self.cancelled += 1
            raise

    def last(self) -> Received:
        return self.received[-1]

    async def _begin(self, request: web.Request) -> tuple[Received, Script]:
        rec = Received(
            request.method,
            request.path,
            request.query_string,
            {k.lower(): v for k, v in request.headers.items()},
            await request.read(),
            time.monotonic(),
        )
        self.received.append(rec)
        raw = request.headers.get("x-fake-script")
        script = replace(self.script, **orjson.loads(raw)) if raw else self.script
        return rec, script

    async def _guard(self, rec: Received, coro: Any) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            resp: web.StreamResponse = await coro
            rec.finished_at = time.monotonic()
            return resp
        except (asyncio.CancelledError, ConnectionError):
            rec.closed_at = time.monotonic()
            raise
        finally:
            self.in_flight -= 1

    async def chat(self, request: web.Request) -> web.StreamResponse:
        rec, script = await self._begin(request)
        return await self._guard(rec, self._chat(request, rec, script))

    async def _chat(self, request: web.Request, rec: Received, s: Script) -> web.StreamResponse:
        if s.delay_headers:
            await asyncio.sleep(s.delay_headers)
        if s.status != 200:
            return web.json_response(
                {"error": {"message": "fake failure", "type": "server_error", "code": None}}, status=s.status
            )
        doc = rec.json
        if doc.get("stream"):
            return await self._stream(request, doc, s)
        usage = openai_usage(s, s.chunks)
        body = orjson.dumps(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": 1700000000,
                "model": doc.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(token(i) for i in range(s.chunks))},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
        )
        self.sent[request.headers.get("x-request-id", "")] = body
        # A date of its own and its own spelling of the content type: what a relay must pass on unchanged.
        return web.Response(body=body, headers={"content-type": FAKE_CONTENT_TYPE, "date": FAKE_DATE})

    def _events(self, doc: dict[str, Any], s: Script) -> list[bytes]:
        base = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": doc.get("model"),
        }
        options = doc.get("stream_options") or {}
        with_usage = s.usage and options.get("include_usage")
        events = []

        def ev(obj: dict[str, Any]) -> bytes:
            if with_usage and s.continuous_usage:
                obj = {**obj, "usage": openai_usage(s, obj.pop("_n", 0))}
            obj.pop("_n", None)
            return b"data: " + orjson.dumps(obj) + (b"\r\n\r\n" if s.crlf else b"\n\n")

        events.append(
            ev(
                {
                    **base,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                    "_n": 0,
                }
            )
        )
        for i in range(s.chunks):
            events.append(
                ev(
                    {
                        **base,
                        "choices": [
                            {"index": 0, "delta": {"content": token(i)}, "logprobs": None, "finish_reason": None}
                        ],
                        "_n": i + 1,
                    }
                )
            )
        events.append(
            ev(
                {
                    **base,
                    "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
                    "_n": s.chunks,
                }
            )
        )
        if with_usage:
            events.append(ev({**base, "choices": [], "usage": openai_usage(s, s.chunks)}))
        if not s.no_done:
            events.append(b"data: [DONE]" + (b"\r\n\r\n" if s.crlf else b"\n\n"))
        return events

    async def _stream(self, request: web.Request, doc: dict[str, Any], s: Script) -> web.StreamResponse:
        events = self._events(doc, s)
        self.sent[request.headers.get("x-request-id", "")] = b"".join(events)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        if s.content_length_stream:
            resp.content_length = sum(map(len, events))
        await resp.prepare(request)
        if s.delay_first:
            await asyncio.sleep(s.delay_first)
        for i, event in enumerate(events):
            content_index = i - 1  # events[0] is the role chunk
            if s.drop_after is not None and content_index == s.drop_after:
                assert request.transport is not None
                request.transport.abort()
                return resp
            if s.hang_after is not None and content_index == s.hang_after:
                await asyncio.sleep(3600)
            if s.delay_before_usage and b'"choices":[]' in event:
                await asyncio.sleep(s.delay_before_usage)
            await resp.write(event)
            if s.delay_chunks:
                await asyncio.sleep(s.delay_chunks)
        await resp.write_eof()
        return resp

    async def responses(self, request: web.Request) -> web.StreamResponse:
        rec, script = await self._begin(request)
        return await self._guard(rec, self._responses(request, rec, script))

    async def _responses(self, request: web.Request, rec: Received, s: Script) -> web.StreamResponse:
        """The Responses API as vLLM serves it: a `response` object, or its events (`event:` lines, no [DONE]);
        `drop_after`/`hang_after` count the `response.output_text.delta` events sent."""
        if s.delay_headers:
            await asyncio.sleep(s.delay_headers)
        if s.status != 200:
            return web.json_response(
                {"error": {"message": "fake failure", "type": "server_error", "code": None}}, status=s.status
            )
        doc = rec.json
        if not doc.get("stream"):
            body = orjson.dumps(response_object(doc, s))
            self.sent[request.headers.get("x-request-id", "")] = body
            return web.Response(body=body, content_type="application/json")
        events = [sse_event(kind, fields, n, s.crlf) for n, (kind, fields) in enumerate(response_events(doc, s))]
        self.sent[request.headers.get("x-request-id", "")] = b"".join(events)
        counted = [(e.startswith(b"event: response.output_text.delta"), e) for e in events]
        return await self._send_events(request, counted, s, delay_all=True)

    async def _send_events(
        self, request: web.Request, events: list[tuple[bool, bytes]], s: Script, delay_all: bool
    ) -> web.StreamResponse:
        """A stream of (counts as output, event): `drop_after`/`hang_after` count the output events sent,
        `delay_chunks` follows each event (`delay_all`) or each output event."""
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        await resp.prepare(request)
        if s.delay_first:
            await asyncio.sleep(s.delay_first)
        outputs = 0
        for output, event in events:
            if output and s.drop_after is not None and outputs == s.drop_after:
                assert request.transport is not None
                request.transport.abort()
                return resp
            if output and s.hang_after is not None and outputs == s.hang_after:
                await asyncio.sleep(3600)
            await resp.write(event)
            outputs += output
            if s.delay_chunks and (output or delay_all):
                await asyncio.sleep(s.delay_chunks)
        await resp.write_eof()
        return resp

    async def messages(self, request: web.Request) -> web.StreamResponse:
        rec, script = await self._begin(request)
        return await self._guard(rec, self._messages(request, rec, script))

    async def _messages(self, request: web.Request, rec: Received, s: Script) -> web.StreamResponse:
        """Anthropic's Messages API as llama-server answers it (`drop_after`/`hang_after` count output deltas)."""
        if s.delay_headers:
            await asyncio.sleep(s.delay_headers)
        if s.status != 200:
            error = {"type": "error", "error": {"type": "api_error", "message": "fake failure"}}
            return web.json_response(error, status=s.status)
        doc = rec.json
        if not doc.get("stream"):
            body = orjson.dumps(anthropic_message(doc, s))
            self.sent[request.headers.get("x-request-id", "")] = body
            return web.Response(body=body, content_type="application/json")
        events = anthropic_events(doc, s)
        self.sent[request.headers.get("x-request-id", "")] = b"".join(e for _, e in events)
        return await self._send_events(request, events, s, delay_all=False)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        rec, script = await self._begin(request)
        return await self._guard(rec, self._completions(request, rec, script))

    async def _completions(self, request: web.Request, rec: Received, s: Script) -> web.StreamResponse:
        doc = rec.json
        if doc.get("stream"):
            return await self._stream(request, doc, s)
        return web.json_response(
            {
                "id": "cmpl-fake",
                "object": "text_completion",
                "created": 1700000000,
                "model": doc.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "text": "".join(token(i) for i in range(s.chunks)),
                        "logprobs": None,
                        "finish_reason": "length",
                    }
                ],
                "usage": openai_usage(s, s.chunks),
            }
        )

    async def embeddings(self, request: web.Request) -> web.Response:
        rec, _ = await self._begin(request)
        doc = rec.json
        inputs = doc["input"] if isinstance(doc["input"], list) else [doc["input"]]
        data = [
            {"object": "embedding", "index": i, "embedding": [0.25 * (i + 1), -0.5, 0.125]} for i in range(len(inputs))
        ]
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": doc.get("model"),
                "usage": {"prompt_tokens": 3 * len(inputs), "total_tokens": 3 * len(inputs)},
            }
        )

    async def models(self, request: web.Request) -> web.Response:
        if not request.headers.get("user-agent", "").startswith("sidecar/"):  # the sidecar's own ask: not counted
            await self._begin(request)
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"id": "fake-model", "object": "model", "created": 1700000000, "owned_by": "fake"}
                    | ({"max_model_len": self.max_model_len} if self.max_model_len else {})
                ],
            }
        )

    async def metrics(self, request: web.Request) -> web.Response:
        """vLLM's own Prometheus page (V1 engine names), with what it has served so far."""
        self.metrics_fetches += 1
        served = sum(1 for r in self.received if r.path.startswith("/v1/"))
        return web.Response(text=vllm_metrics(served), content_type="text/plain")

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=self.script.status if self.script.status >= 500 else 200)

    async def anything(self, request: web.Request) -> web.Response:
        await self._begin(request)
        shaped = SHAPED_ANSWERS.get(request.path)
        if shaped is not None and request.method == "POST":
            return web.json_response(shaped)
        return web.json_response({"reached": request.path})


# --- the Responses API, as vLLM answers it (vllm/entrypoints/openai/responses/): a `response` object, or events ---

RESPONSE_ID = "resp_fake"


def responses_usage(s: Script) -> dict[str, Any]:
    """A Responses-API usage object as vLLM reports it: the details always there (0 when nothing)."""
    output = s.chunks + s.reasoning_chunks + s.tool_chunks
    return {
        "input_tokens": s.prompt_tokens,
        "input_tokens_details": {"cached_tokens": s.cached_tokens or 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": s.reasoning_tokens or s.reasoning_chunks},
        "total_tokens": s.prompt_tokens + output,
    }


def reasoning_piece(i: int) -> str:
    return f"think{i} "


def argument_piece(i: int) -> str:
    return '{"city": "' if i == 0 else f"c{i}"


def response_output(s: Script) -> list[dict[str, Any]]:
    """The output items of a whole answer: reasoning, the message, a function call (as the script says)."""
    items: list[dict[str, Any]] = []
    if s.reasoning_chunks:
        text = "".join(reasoning_piece(i) for i in range(s.reasoning_chunks))
        items.append(
            {"id": "rs_fake", "type": "reasoning", "summary": [], "status": "completed",
             "content": [{"type": "reasoning_text", "text": text}]}
        )  # fmt: skip
    text = "".join(token(i) for i in range(s.chunks))
    items.append(
        {"id": "msg_fake", "type": "message", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}
    )  # fmt: skip
    if s.tool_chunks:
        arguments = "".join(argument_piece(i) for i in range(s.tool_chunks))
        items.append(
            {"id": "fc_fake", "type": "function_call", "call_id": "call_fake", "name": "get_weather",
             "arguments": arguments, "status": "completed"}
        )  # fmt: skip
    return items


def response_object(doc: dict[str, Any], s: Script, status: str | None = None) -> dict[str, Any]:
    """The `response` object: the whole answer, or (with `status`) the one its stream's events carry."""
    final = status is None
    status = status or ("incomplete" if s.incomplete else "completed")
    return {
        "id": RESPONSE_ID,
        "object": "response",
        "created_at": 1700000000,
        "model": doc.get("model"),
        "status": status,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "error": None,
        "instructions": None,
        "metadata": None,
        "parallel_tool_calls": True,
        "temperature": 1.0,
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "max_output_tokens": doc.get("max_output_tokens"),
        "output": response_output(s) if final or status != "in_progress" else [],
        "usage": responses_usage(s) if final or status != "in_progress" else None,
    }


def response_events(doc: dict[str, Any], s: Script) -> list[tuple[str, dict[str, Any]]]:
    """A streamed answer's events, in vLLM's order (type, fields); `sequence_number` is added when sent."""
    events: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": response_object(doc, s, "in_progress")}),
        ("response.in_progress", {"response": response_object(doc, s, "in_progress")}),
    ]
    output = response_output(s)
    index = 0
    if s.reasoning_chunks:
        item = output[index]
        at = {"output_index": index, "item_id": item["id"]}
        part = {"type": "reasoning_text", "text": ""}
        events += [
            added(index, item, content=[]),
            ("response.content_part.added", {**at, "content_index": 0, "part": part}),
        ]
        events += [
            ("response.reasoning_text.delta", {**at, "content_index": 0, "delta": reasoning_piece(i)})
            for i in range(s.reasoning_chunks)
        ]
        text = item["content"][0]["text"]
        events += [
            ("response.reasoning_text.done", {**at, "content_index": 0, "text": text}),
            ("response.content_part.done", {**at, "content_index": 0, "part": {**part, "text": text}}),
            ("response.output_item.done", {"output_index": index, "item": item}),
        ]
        index += 1
    item = output[index]
    at = {"output_index": index, "item_id": item["id"]}
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    events += [
        added(index, item, content=[]),
        ("response.content_part.added", {**at, "content_index": 0, "part": part}),
    ]
    events += [
        ("response.output_text.delta", {**at, "content_index": 0, "delta": token(i), "logprobs": []})
        for i in range(s.chunks)
    ]
    text = item["content"][0]["text"]
    events += [
        ("response.output_text.done", {**at, "content_index": 0, "text": text, "logprobs": []}),
        ("response.content_part.done", {**at, "content_index": 0, "part": {**part, "text": text}}),
        ("response.output_item.done", {"output_index": index, "item": item}),
    ]
    index += 1
    if s.tool_chunks:
        item = output[index]
        at = {"output_index": index, "item_id": item["id"]}
        events.append(added(index, item, arguments=""))
        events += [
            ("response.function_call_arguments.delta", {**at, "delta": argument_piece(i)}) for i in range(s.tool_chunks)
        ]
        events += [
            ("response.function_call_arguments.done", {**at, "arguments": item["arguments"]}),
            ("response.output_item.done", {"output_index": index, "item": item}),
        ]
    final = response_object(doc, s)
    events.append((f"response.{final['status']}", {"response": final}))
    return events


def added(index: int, item: dict[str, Any], **empty: Any) -> tuple[str, dict[str, Any]]:
    """`response.output_item.added`: the item as it starts, in progress and with nothing in it yet."""
    return "response.output_item.added", {"output_index": index, "item": {**item, **empty, "status": "in_progress"}}


def sse_event(kind: str, fields: dict[str, Any], number: int, crlf: bool) -> bytes:
    """One event as vLLM writes it: `event:` then compact JSON with `type` and `sequence_number`."""
    sep = b"\r\n" if crlf else b"\n"
    data = orjson.dumps({"type": kind, **fields, "sequence_number": number})
    return b"event: " + kind.encode() + sep + b"data: " + data + sep + sep
