"""A TCP fault proxy for tests, toxiproxy's faults in-process: put it between the sidecar and the upstream, or
between the sidecar and PostgreSQL, and break the connection in a chosen way at a chosen byte.

    proxy = FaultProxy("127.0.0.1", upstream_port); await proxy.start()
    proxy.latency = 0.2                                  # every chunk from the server is delayed 200 ms
    proxy.bandwidth = 2000                               # bytes per second from the server
    proxy.fault = Fault("reset", at=b'"usage"')          # RST to the client just before that pattern
    proxy.fault = Fault("cut", at=120)                   # FIN after 120 bytes from the server
    proxy.fault = Fault("hold", at=0)                    # swallow everything from then on, keep sockets open
    proxy.close_delay = 2.0                              # the server's FIN reaches the client 2 s late
    await proxy.down(); await proxy.up()                 # refuse connections (and reset live ones); back

A fault applies to the server-to-client direction, from the next bytes on (live connections included), counting
offsets from each connection's start; `at` is a byte offset or a pattern (the fault hits right before its first
occurrence). It fires once and is then cleared, unless `once=False` (then it hits every connection).
`faults_hit` counts the faults that fired.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass


@dataclass(frozen=True)
class Fault:
    kind: str  # "reset" | "cut" | "hold"
    at: int | bytes = 0
    hold_for: float = 0.0  # "hold": close after this long (0: until the proxy closes)
    once: bool = True

    def position(self, seen: bytes, offset: int) -> int | None:
        """Where in `seen` (which starts at stream offset `offset`) the fault hits, if it does."""
        if isinstance(self.at, int):
            return self.at - offset if self.at < offset + len(seen) else None
        found = seen.find(self.at)
        return found if found >= 0 else None


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.latency = 0.0
        self.bandwidth = 0  # bytes per second, 0 = unlimited
        self.close_delay = 0.0
        self.fault: Fault | None = None
        self.faults_hit = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._live: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url_host(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        """Stop listening (connects are refused) and reset every live connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for client, server in list(self._live):
            _rst(client)
            _rst(server)
        self._live.clear()

    async def up(self) -> None:
        await self.start()

    async def close(self) -> None:
        await self.down()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            _rst(client_w)
            self._tasks.discard(task)
            return
        pair = (client_w, server_w)
        self._live.add(pair)
        up = asyncio.create_task(self._pump_up(client_r, server_w))
        try:
            await self._pump_down(server_r, client_w, server_w)
        except (ConnectionError, asyncio.IncompleteReadError, RuntimeError):
            pass  # RuntimeError: uvloop's word for a transport that down() already aborted
        except asyncio.CancelledError:
            pass  # close(): asyncio would log a cancelled connection callback as an error
        finally:
            up.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, RuntimeError):
                await up
            self._live.discard(pair)
            for w in (client_w, server_w):
                with contextlib.suppress(RuntimeError):
                    w.close()
            self._tasks.discard(task)

    async def _pump_up(self, client_r: asyncio.StreamReader, server_w: asyncio.StreamWriter) -> None:
        try:
            while data := await client_r.read(65536):
                server_w.write(data)
                await server_w.drain()
            if server_w.can_write_eof():
                server_w.write_eof()
        except (ConnectionError, OSError, RuntimeError):
            server_w.transport.abort()

    async def _pump_down(
        self,
        server_r: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
        server_w: asyncio.StreamWriter,
    ) -> None:
        offset = 0
        tail = b""  # the end of what was forwarded, so a pattern split over two reads is still found
        while data := await server_r.read(65536):
            if self.latency:
                await asyncio.sleep(self.latency)
            fault = self.fault
            if fault is not None:
                window = tail + data
                hit = fault.position(window, offset - len(tail))
                if hit is not None:
                    hit = max(hit - len(tail), 0)
                    if fault.once:
                        self.fault = None
                    await self._send(client_w, data[:hit])
                    await self._apply(fault, client_w, server_w)
                    return
                tail = window[-64:]
            await self._send(client_w, data)
            offset += len(data)
        if self.close_delay:  # the server closed: pass its FIN on late
            await asyncio.sleep(self.close_delay)
        if client_w.can_write_eof():
            client_w.write_eof()

    async def _send(self, client_w: asyncio.StreamWriter, data: bytes) -> None:
        if not data:
            return
        if self.bandwidth:
            for i in range(0, len(data), 256):
                client_w.write(data[i : i + 256])
                await client_w.drain()
                await asyncio.sleep(256 / self.bandwidth)
            return
        client_w.write(data)
        await client_w.drain()

    async def _apply(self, fault: Fault, client_w: asyncio.StreamWriter, server_w: asyncio.StreamWriter) -> None:
        self.faults_hit += 1
        if fault.kind == "hold":
            await asyncio.sleep(fault.hold_for or 3600)
            return
        await asyncio.sleep(0.05)  # let what was written reach the client before the connection breaks
        if fault.kind == "reset":
            _rst(client_w)
            _rst(server_w)
        elif fault.kind == "cut":
            client_w.close()
            server_w.close()
        else:
            raise ValueError(f"unknown fault {fault.kind!r}")


def through(proxy: FaultProxy, dsn: str) -> str:
    head, _, rest = dsn.rpartition("@")
    db = rest.split("/", 1)[1]
    return f"{head}@{proxy.url_host}/{db}"
