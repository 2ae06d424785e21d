"""Peers: with `server.workers > 1`, worker 0's operations port answers for the pod, so that one scrape and one
preStop hook see every worker.

- `/metrics`: every worker labels each of its samples `worker="<i>"`; worker 0's page holds its own and every
  other worker's (read from their operations ports, `ops_port + i`, on loopback, at scrape time), merged family
  by family, plus `sidecar_worker_up{worker}` (0 for a worker whose page could not be read within `TIMEOUT`).
  Each series stays one worker's own: Prometheus sums them (`sum by (pod)`), which is honest about a restarted
  worker's counters starting over, as an aggregate we computed would not be.
- `/drain`: worker 0 drains itself and asks every other worker to drain; it answers the pod's state: draining
  and drained when every worker is, `in_flight` the sum, and each worker's own answer under `workers`. A worker
  whose operations port refuses the connection has finished (its port closes last) if it was seen draining;
  otherwise it has not started yet or is being restarted, and is not drained.

The workers trust each other's `/drain` by a secret the parent makes before forking (`PEER_HEADER`), whatever
address the operations port listens on.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

TIMEOUT = 2.0  # seconds worker 0 waits for another worker's page or drain state
PEER_HEADER = "x-sidecar-peer"


@dataclass(frozen=True)
class Worker:
    """This process's place among `server.workers`, and the secret the workers of one parent share."""

    index: int
    secret: str

    def __repr__(self) -> str:  # the secret never reaches a log line or a traceback
        return f"Worker(index={self.index})"


def loopback(host_list: str) -> str:
    """The address a worker reaches another's operations port at: loopback when it listens on every address."""
    first = next((h.strip() for h in host_list.split(",") if h.strip()), "127.0.0.1")
    if first in ("0.0.0.0", ""):
        return "127.0.0.1"
    if first == "::":
        return "::1"
    return first


def labelled(page: bytes, index: int) -> bytes:
    """A Prometheus text page (format 0.0.4, as prometheus_client writes it) with `worker="<index>"` on every
    sample."""
    label = b'worker="%d"' % index
    return b"\n".join(_with(line, label) for line in page.split(b"\n"))


def _with(line: bytes, label: bytes) -> bytes:
    if not line or line.startswith(b"#"):
        return line
    brace, space = line.find(b"{"), line.find(b" ")
    if 0 <= brace < space:  # labels follow the name at once; a name holds no space
        sep = b"" if line[brace + 1 : brace + 2] == b"}" else b","
        return line[: brace + 1] + label + sep + line[brace + 1 :]
    return line[:space] + b"{" + label + b"}" + line[space:]


def merged(pages: list[bytes]) -> bytes:
    """Pages of one format merged family by family (the format wants a family's samples together, under one HELP
    and TYPE): the first page's order, families only another page has after."""
    families: dict[bytes, list[bytes]] = {}
    lines: list[bytes] = []
    for page in pages:
        header = False
        for line in page.split(b"\n"):
            if line.startswith(b"# HELP "):
                name = line.split(b" ", 3)[2]
                header = name not in families
                lines = families.setdefault(name, [])
                if header:
                    lines.append(line)
            elif line.startswith(b"# TYPE "):
                if header:
                    lines.append(line)
            elif line and not line.startswith(b"#"):
                lines.append(line)
    return b"".join(b"\n".join(block) + b"\n" for block in families.values())


class Peers:
    """Worker 0's view of the others (and every worker's check of a peer's secret)."""

    def __init__(self, worker: Worker, workers: int, host: str, ops_port: int) -> None:
        self.worker = worker
        self.workers = workers
        self.host = loopback(host)
        self.ops_port = ops_port
        self.speaks_for_pod = worker.index == 0 and workers > 1 and ops_port > 0
        self._seen_draining: set[int] = set()  # workers that answered draining since worker 0 was asked to drain

    def trusted(self, headers: Mapping[str, str]) -> bool:
        """The request comes from another worker of this parent."""
        given = headers.get(PEER_HEADER, "")  # as aiohttp decodes a header: any bytes, surrogate-escaped
        return bool(given) and hmac.compare_digest(
            given.encode("utf-8", "surrogateescape"), self.worker.secret.encode()
        )

    def _url(self, index: int, path: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.ops_port + index}{path}"

    async def metrics(self, own: bytes) -> bytes:
        """This worker's page, labelled; worker 0's with every other worker's merged in."""
        pages = [labelled(own, self.worker.index)]
        if not self.speaks_for_pod:
            return pages[0]
        others = await self._each(self._page)
        up = [b'sidecar_worker_up{worker="0"} 1.0']
        for index, page in others:
            up.append(b'sidecar_worker_up{worker="%d"} %s' % (index, b"1.0" if page is not None else b"0.0"))
            if page is not None:
                pages.append(page)
        head = b"# HELP sidecar_worker_up 1 if the worker's page was read for this scrape (worker 0's page).\n"
        pages.append(head + b"# TYPE sidecar_worker_up gauge\n" + b"\n".join(up) + b"\n")
        return merged(pages)

    async def drain(self, own: dict[str, Any], start: bool) -> dict[str, Any]:
        """The pod's drain state from worker 0's own (`start`: ask every other worker to drain too)."""
        if not self.speaks_for_pod:
            return own
        states: dict[str, dict[str, Any]] = {"0": own}
        for index, answer in await self._each(lambda s, i: self._drain(s, i, start)):
            if answer.get("draining") is True:
                self._seen_draining.add(index)
            states[str(index)] = answer
            if answer.get("gone"):
                # A closed port is a worker that finished only if it was seen draining: else it has not started
                # yet, or it died and the parent is starting it again, and the next ask drains it.
                seen = index in self._seen_draining
                states[str(index)] = {"gone": True, "draining": seen, "drained": seen}
        done = [s.get("drained") is True for s in states.values()]
        going = [s.get("draining") is True for s in states.values()]
        in_flight = sum(int(s.get("in_flight", 0)) for s in states.values())
        return {"draining": all(going), "drained": all(done), "in_flight": in_flight, "workers": states}

    async def _each(self, one: Callable[[aiohttp.ClientSession, int], Awaitable[Any]]) -> list[tuple[int, Any]]:
        timeout = aiohttp.ClientTimeout(total=TIMEOUT)
        headers = {PEER_HEADER: self.worker.secret}
        async with aiohttp.ClientSession(timeout=timeout, headers=headers, trust_env=False) as session:
            indexes = range(1, self.workers)
            answers = await asyncio.gather(*(one(session, i) for i in indexes))
        return list(zip(indexes, answers, strict=True))

    async def _page(self, session: aiohttp.ClientSession, index: int) -> bytes | None:
        try:
            async with session.get(self._url(index, "/metrics")) as answer:
                return await answer.read() if answer.status == 200 else None
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def _drain(self, session: aiohttp.ClientSession, index: int, start: bool) -> dict[str, Any]:
        try:
            async with session.request("POST" if start else "GET", self._url(index, "/drain")) as answer:
                doc = orjson.loads(await answer.read())
                if answer.status == 200 and isinstance(doc, dict):
                    return doc
                return {"error": f"status {answer.status}"}
        except aiohttp.ClientConnectorError:
            return {"gone": True}  # its operations port is closed: it has finished
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            return {"error": type(exc).__name__}
