"""Many keys in front of one fake engine (`tests/support/engine.py`): a keyed sidecar, keys with fields, requests
that name themselves in `user` (`send`), a heavy key's steady load (`heavy_load`), whose a served request was
(`owner`), and how many of a heavy key's earlier requests a light key's passed (`overtaken`)."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from tests.support.clients import ADMIN, admin

CHAT = {"model": "engine-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}


async def keyed(engine, sidecar_factory, **options):
    options = {"limits__global_concurrency": 4, "limits__queue_size": 200, **options}
    return await sidecar_factory(engine.url, auth__enabled=True, server__admin_token=ADMIN, **options)


async def new_key(url: str, name: str, **fields) -> str:
    async with aiohttp.ClientSession() as s:
        status, created, _ = await admin(s, "POST", url + "/admin/keys", {"name": name, **fields})
    assert status == 201, created
    return created["key"]


async def send(s: aiohttp.ClientSession, url: str, key: str, user: str, **extra) -> tuple[int, dict, float]:
    sent = time.monotonic()
    async with s.post(
        url + "/v1/chat/completions", json={**CHAT, "user": user, **extra}, headers={"authorization": f"Bearer {key}"}
    ) as r:
        headers = r.headers.copy()  # case-insensitive, as HTTP names are
        headers["body"] = (await r.read()).decode()
        return r.status, headers, sent


async def heavy_load(url: str, key: str, user: str, streams: int, stop: asyncio.Event, sent: dict | None = None):
    """`streams` requests of `key` in flight at all times until `stop`; each names itself in `user` (`user-N`),
    and `sent` gets when each was sent."""
    statuses: list[int] = []
    count = iter(range(1 << 30))

    async def one(s: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            name = f"{user}-{next(count)}"
            status, _, at = await send(s, url, key, name)
            statuses.append(status)
            if sent is not None:
                sent[name] = at

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        await asyncio.gather(*(one(s) for _ in range(streams)))
    return statuses


def owner(served) -> str:
    return (served.user or "").rpartition("-")[0] or (served.user or "")


def overtaken(engine, heavy_sent: dict[str, float], light_sent: list[float], light: str = "light") -> list[int]:
    """For each of the light key's requests (`light-I`, sent at `light_sent[I]`), the heavy requests sent before it
    that the engine started after it: the backlog it passed."""
    out = []
    for i, sent in enumerate(light_sent):
        (mine,) = [r for r in engine.served if r.user == f"{light}-{i}"]
        before = [r for r in engine.served if r.user in heavy_sent and heavy_sent[r.user] < sent]
        out.append(sum(1 for r in before if r.started > mine.started))
    return out
