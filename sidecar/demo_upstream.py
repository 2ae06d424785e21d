"""A small fake OpenAI-compatible server, for trying the sidecar out without a GPU (`sidecar demo-upstream`).

It answers chat completions and Responses-API requests (streaming or not, with usage), completions, embeddings,
models and `/health` with deterministic text: the reply repeats the words of the last message (or the
`input`), one word per token.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

import aiohttp
import orjson
from aiohttp import web

MODEL = "demo"


def _words(doc: dict[str, Any]) -> list[str]:
    messages = doc.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        text = messages[-1].get("content")
    else:
        text = doc.get("prompt", doc.get("input"))
    words = str(text or "hello").split()[:64]
    return ["You", "said:", *words]


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        doc = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise web.HTTPBadRequest(
            text='{"error": {"message": "invalid JSON"}}', content_type="application/json"
        ) from None
    if not isinstance(doc, dict):
        raise web.HTTPBadRequest(text='{"error": {"message": "expected an object"}}', content_type="application/json")
    return doc


async def chat(request: web.Request) -> web.StreamResponse:
    doc = await _body(request)
    words = _words(doc)
    prompt = sum(len(str(m.get("content", "")).split()) for m in doc.get("messages", []) if isinstance(m, dict))
    cid, created, model = f"chatcmpl-demo{int(time.time() * 1000)}", int(time.time()), doc.get("model", MODEL)
    if not doc.get("stream"):
        return web.json_response(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": " ".join(words)}, "finish_reason": "stop"}
                ],
                "usage": _usage(prompt, len(words)),
            },
            dumps=lambda o: orjson.dumps(o).decode(),
        )
    resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
    await resp.prepare(request)

    async def send(obj: dict[str, Any]) -> None:
        await resp.write(b"data: " + orjson.dumps(obj) + b"\n\n")

    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
    try:
        await send({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        for i, word in enumerate(words):
            await asyncio.sleep(0.02)
            text = word if i == 0 else " " + word
            await send({**base, "choices": [{"index": 0, "delta": {"content": text}}]})
        await send({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        options = doc.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            await send({**base, "choices": [], "usage": _usage(prompt, len(words))})
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except (ConnectionError, aiohttp.ClientConnectionError):
        pass  # the client hung up mid-stream: normal for a model server, nothing to report
    return resp


async def responses(request: web.Request) -> web.StreamResponse:
    """The Responses API: a `response` object, or its events (`response.created`, one
    `response.output_text.delta` per word, `response.completed` with the usage)."""
    doc = await _body(request)
    words = _words(doc)
    prompt = len(str(doc.get("input", "")).split())
    text = " ".join(words)
    usage = {"input_tokens": prompt, "output_tokens": len(words), "total_tokens": prompt + len(words)}
    message = {"type": "message", "id": "msg_demo", "role": "assistant", "status": "completed",
               "content": [{"type": "output_text", "text": text, "annotations": []}]}  # fmt: skip
    head = {"id": f"resp_demo{int(time.time() * 1000)}", "object": "response", "created_at": int(time.time()),
            "model": doc.get("model", MODEL)}  # fmt: skip
    done = {**head, "status": "completed", "output": [message], "usage": usage}
    if not doc.get("stream"):
        return web.json_response(done, dumps=lambda o: orjson.dumps(o).decode())
    resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
    await resp.prepare(request)

    async def send(kind: str, fields: dict[str, Any]) -> None:
        await resp.write(f"event: {kind}\ndata: ".encode() + orjson.dumps({"type": kind, **fields}) + b"\n\n")

    try:
        await send("response.created", {"response": {**head, "status": "in_progress", "output": [], "usage": None}})
        for i, word in enumerate(words):
            await asyncio.sleep(0.02)
            delta = word if i == 0 else " " + word
            await send("response.output_text.delta", {"item_id": "msg_demo", "output_index": 0, "delta": delta})
        await send("response.completed", {"response": done})
        await resp.write_eof()
    except (ConnectionError, aiohttp.ClientConnectionError):
        pass  # the client hung up mid-stream
    return resp


async def completions(request: web.Request) -> web.Response:
    doc = await _body(request)
    words = _words(doc)
    prompt = len(str(doc.get("prompt", "")).split())
    return web.json_response(
        {
            "id": "cmpl-demo",
            "object": "text_completion",
            "created": int(time.time()),
            "model": doc.get("model", MODEL),
            "choices": [{"index": 0, "text": " ".join(words), "finish_reason": "stop", "logprobs": None}],
            "usage": _usage(prompt, len(words)),
        }
    )


async def embeddings(request: web.Request) -> web.Response:
    doc = await _body(request)
    inputs = doc.get("input")
    items = inputs if isinstance(inputs, list) else [inputs]
    data = []
    for i, item in enumerate(items):
        digest = hashlib.sha256(str(item).encode()).digest()
        data.append({"object": "embedding", "index": i, "embedding": [b / 255.0 for b in digest[:16]]})
    tokens = sum(len(str(item).split()) for item in items)
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "model": doc.get("model", MODEL),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


async def models(request: web.Request) -> web.Response:
    return web.json_response(
        {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "sidecar-demo"}]}
    )


async def health(request: web.Request) -> web.Response:
    return web.Response(text="")


def create_demo_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    return app
