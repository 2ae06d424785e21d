"""Running the app: listen, wait for SIGTERM/SIGINT, drain gracefully, exit.

Drain order (on SIGTERM, or earlier on `POST /drain` from loopback, which drains without exiting): `/readyz`
turns 503 at once; new connections are still served for `drain_grace` seconds
(Kubernetes takes a while to drop the pod from its endpoints); then the listener closes; in-flight requests
may finish within `drain_timeout`; what is still running then is cancelled (streams get a terminal SSE error
event and a `shutdown` record); finally the cleanup contexts close (writer and audit drain there).
A second signal skips what is left of the grace and the drain wait. The operations port (`server.ops_port`)
stays open until the end, so the drain can be watched and metrics scraped.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import secrets
import shlex
import signal
import sys
from collections.abc import Callable, Coroutine
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from aiohttp import web

from sidecar.app import KEYS, OPS, PROXY, STATE, create_app
from sidecar.config import ConfigError, Settings, default_store_url, mask_url, summary
from sidecar.edge import EdgeLimits, EdgeRunner
from sidecar.ops.logs import event, for_worker
from sidecar.ops.peers import Worker
from sidecar.ops.workers import Supervisor, adopt_orphans, port_taken, worker_settings
from sidecar.store.base import StoreError

log = logging.getLogger("sidecar.runner")


async def start_demo_upstream() -> tuple[web.AppRunner, str]:
    from sidecar.demo_upstream import create_demo_app  # only `--demo` needs it, never a production worker

    runner = web.AppRunner(create_demo_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/v1"


class Server:
    """The sidecar listening on a socket, with the drain logic; used by `sidecar serve` and the tests."""

    def __init__(self, settings: Settings, worker: Worker | None = None) -> None:
        self.settings = settings
        self.app = create_app(settings, worker)
        cfg = settings.server
        limits = EdgeLimits(cfg.header_timeout, cfg.body_timeout, cfg.server_header)
        self.runner = EdgeRunner(self.app, limits, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        self.port = 0
        self.ops_port = 0
        self.binding = 0  # the port being bound when listening fails, for the error line
        self._hurry = asyncio.Event()
        self._drain: asyncio.Task[None] | None = None
        self.ops_runner: EdgeRunner | None = None
        if OPS in self.app:
            ops = self.app[OPS]
            self.ops_runner = EdgeRunner(ops, limits, access_log=None, handle_signals=False, shutdown_timeout=1.0)
            self.app.on_shutdown.append(self._close_ops)  # whoever cleans the main runner up closes this too
        self.app[STATE].request_drain = self.begin_drain

    async def start(self) -> None:
        """Listen on every address of `server.host` (comma-separated, e.g. `0.0.0.0,::` for dual stack), all on
        one port (with port 0, the one the first address got); the operations port likewise."""
        cfg = self.settings.server
        await self.runner.setup()
        self.binding = cfg.port
        # Workers share the client port (the kernel spreads connections); each has its own operations port.
        self.port = await _listen(self.runner, cfg.host, cfg.port, reuse_port=cfg.workers > 1)
        if self.ops_runner is not None:
            await self.ops_runner.setup()
            self.binding = cfg.ops_port
            self.ops_port = await _listen(self.ops_runner, cfg.host, cfg.ops_port)

    async def _close_ops(self, _: web.Application) -> None:
        if self.ops_runner is not None:
            await self.ops_runner.cleanup()

    def hurry(self) -> None:
        """A second signal: stop waiting for grace and drain."""
        self._hurry.set()

    async def _wait(self, seconds: float) -> None:
        if seconds > 0 and not self._hurry.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hurry.wait(), seconds)

    def begin_drain(self) -> None:
        """Start the drain once (SIGTERM or `POST /drain`); the process keeps running until `drain` ends it."""
        if self._drain is None:
            self.app[STATE].draining = True
            self._drain = asyncio.ensure_future(self._drain_requests())

    async def drain(self) -> None:
        """Drain (or finish the drain `POST /drain` started), then close everything."""
        self.begin_drain()
        assert self._drain is not None
        await self._drain
        await self.runner.cleanup()

    async def _drain_requests(self) -> None:
        cfg = self.settings.server
        event(log, "draining", grace_s=cfg.drain_grace, drain_timeout_s=cfg.drain_timeout)
        await self._wait(cfg.drain_grace)
        for site in list(self.runner.sites):
            await site.stop()
        in_flight = self.app[PROXY].in_flight
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.drain_timeout
        while in_flight and loop.time() < deadline and not self._hurry.is_set():
            await self._wait(min(0.05, deadline - loop.time()))
        still = in_flight.cancel_all()
        if still:
            event(log, "drain timeout: cancelling requests", requests=still)
            await in_flight.wait_idle(5.0)
        self.app[STATE].drained = True
        event(log, "drained")


async def _listen(runner: web.AppRunner, host_list: str, port: int, reuse_port: bool = False) -> int:
    for host in hosts(host_list):
        site = web.TCPSite(runner, host, port, backlog=1024, reuse_port=reuse_port or None)
        await site.start()
        port = port or runner.addresses[-1][1]
    return port


def hosts(value: str) -> list[str]:
    """The listen addresses in `server.host` (`"0.0.0.0,::"` -> ["0.0.0.0", "::"])."""
    return [h.strip() for h in value.split(",") if h.strip()]


class StartFailed(Exception):
    """The sidecar could not start (the port is taken, the store cannot be opened): one line says why."""


def check_upstream(settings: Settings, demo: bool) -> None:
    """An upstream, or the demo asked for explicitly: an operator who forgot `--upstream` must not get a demo."""
    if demo and settings.upstream.url:
        raise ConfigError("upstream.url: --demo runs the bundled demo upstream; leave the upstream unset")
    if not demo and not settings.upstream.url:
        raise ConfigError("upstream.url: not set: give --upstream URL (or --demo to try the bundled demo upstream)")
    if demo and settings.store.url != default_store_url(settings.server.data_dir):
        # The demo mints a key: in a store that production replicas share, that key would work there too.
        raise ConfigError(
            "store.url: the demo upstream runs only with the default SQLite store (it mints a key there), "
            f"not {mask_url(settings.store.url)}"
        )


def _freeze_heap() -> None:
    """What start-up made (modules, settings, the app: ~45,000 objects) is kept for the process's life: frozen
    out of the collector's reach, a full collection (every ~20,000 requests) no longer walks it again (40-90 ms
    of the loop each time, 2-4 µs a request on a small chat), only what requests made since."""
    gc.collect()
    gc.freeze()


async def serve(
    settings: Settings,
    announce: Callable[[str], None] | None = None,
    demo_upstream: bool = False,
    worker: Worker | None = None,
    ready: Callable[[], None] | None = None,
    freeze: bool = False,
) -> int:
    """Serve until SIGTERM/SIGINT, then drain. `worker`: this process's index among `server.workers` (None: the
    one process there is); `ready` is called once it listens (the parent starts the next worker then);
    `freeze`: the process is ours alone (`run`), so its start-up heap may be frozen (`_freeze_heap`); in-process
    callers (tests) leave theirs alone."""
    check_upstream(settings, demo_upstream)
    demo: web.AppRunner | None = None
    if demo_upstream:
        demo, url = await start_demo_upstream()
        settings = replace(settings, upstream=replace(settings.upstream, url=url))
        log.warning("--demo: serving the bundled demo upstream at %s", url)
    server = Server(settings, worker)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal() -> None:
        server.app[STATE].draining = True  # readyz turns 503 on this very loop turn, before the drain task runs
        if stop.is_set():
            server.hurry()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    # A worker is forked with them blocked (`sidecar.ops.workers`): one sent meanwhile is handled from here on.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGTERM, signal.SIGINT))
    try:
        await _start(server)
        ops = {"ops_port": server.ops_port} if server.ops_port else {}
        ops.update({"worker": worker.index} if worker is not None else {})
        event(log, "listening", host=settings.server.host, port=server.port, **ops, settings=summary(settings))
        if freeze:
            _freeze_heap()
        if ready is not None:
            ready()
        key = await _demo_key(server) if demo is not None and settings.auth.enabled else None
        if announce is not None:
            announce(_curl_hint(settings, server.port, demo is not None, key))
        await stop.wait()
        await server.drain()
    finally:
        if demo is not None:
            await demo.cleanup()
    event(log, "stopped")
    return 0


async def _start(server: Server) -> None:
    """Start, or undo what was started (store, writer, tasks) and say in one line why not."""
    cfg = server.settings.server
    try:
        await server.start()
    except OSError as exc:
        await server.runner.cleanup()
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise StartFailed(f"cannot listen on {cfg.host}:{server.binding}: {reason}") from None
    except StoreError as exc:
        await server.runner.cleanup()
        raise StartFailed(f"cannot open the store {mask_url(server.settings.store.url)}: {exc}") from None
    except ConfigError:  # the store's pepper fingerprint: one line, as for any configuration error
        await server.runner.cleanup()
        raise


async def _demo_key(server: Server) -> str:
    """A key for trying the demo out, so the printed curl line works as it is; one per data directory."""
    path = Path(server.settings.server.data_dir) / "demo-key"
    return await server.app[KEYS].kept_key(path, {"name": "demo", "expires_in": "30d"}, "serve:demo")


def _key_command(settings: Settings) -> str:
    """`sidecar keys create` aimed at this server's store and pepper, runnable from any directory."""
    env = []
    cfg = settings.auth
    if not (cfg.pepper or cfg.pepper_file):  # the pepper `serve` keeps in its data directory
        env.append(f"SIDECAR_SERVER_DATA_DIR={shlex.quote(os.path.abspath(settings.server.data_dir))}")
    url = settings.store.url
    if url.startswith("sqlite:///"):
        db = shlex.quote("sqlite:///" + os.path.abspath(url[len("sqlite:///") :]))
    else:
        db = '"$SIDECAR_STORE_URL"'  # PostgreSQL: the URL holds a password; the operator has it
    return " ".join([*env, "sidecar keys create --name me --db", db])


def _curl_hint(settings: Settings, port: int, demo: bool, key: str | None) -> str:
    first = hosts(settings.server.host)[0]
    host = "127.0.0.1" if first in ("0.0.0.0", "::") else (f"[{first}]" if ":" in first else first)
    model = "demo" if demo else "MODEL"
    lines = [f"sidecar listening on http://{host}:{port}  (upstream {mask_url(settings.upstream.url)})"]
    auth = ""
    if key:
        auth = f"-H 'authorization: Bearer {key}' "
    elif settings.auth.enabled:  # a real upstream: the key is the operator's to make, once
        auth = '-H "authorization: Bearer $KEY" '
        lines.append(f"a key:  KEY=$({_key_command(settings)})")
    lines.append(
        f"try:  curl -s http://{host}:{port}/v1/chat/completions {auth}-H 'content-type: application/json' "
        f'-d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "hello there"}}]}}\''
    )
    if settings.console.enabled:
        ops = settings.server.ops_port
        lines.append(f"console:  http://{host}:{port}/console/" + (f"  (operators: port {ops})" if ops else ""))
    return "\n".join(lines)


def run(settings: Settings, demo: bool = False) -> int:
    """Run `serve` on uvloop (falls back to asyncio's loop where uvloop is unavailable); with `server.workers`
    above 1, in that many worker processes under a parent that serves nothing (`sidecar.ops.workers`)."""
    check_upstream(settings, demo)  # before the loop starts: a config error is one line
    cfg = settings.server
    if cfg.workers == 1:
        adopt_orphans(cfg.data_dir, 1)  # what workers left journaled when there were more of them
        return _run_loop(serve(settings, _announce, demo, freeze=True))
    for host in hosts(cfg.host):
        if (taken := port_taken(host, cfg.port)) is not None:
            reason = os.strerror(taken.errno) if taken.errno else str(taken)
            raise StartFailed(f"cannot listen on {host}:{cfg.port}: {reason}")
    adopt_orphans(cfg.data_dir, cfg.workers)
    # The workers' shared secret: worker 0 asks the others to drain with it (`sidecar.ops.peers`).
    return Supervisor(cfg.workers, partial(_worker, settings, demo, secrets.token_hex(16))).run()


def _worker(settings: Settings, demo: bool, secret: str, index: int, ready: Callable[[], None]) -> int:
    """One worker process: `serve` with its own settings; a start that fails says why in one line, as `serve`
    alone does (the CLI's handling, which the parent cannot do for it)."""
    announce = _announce if index == 0 else None
    for_worker(index)
    try:
        mine = worker_settings(settings, index)
        return _run_loop(serve(mine, announce, demo, Worker(index, secret), ready, freeze=True))
    except StartFailed as exc:
        print(f"sidecar: worker {index}: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"sidecar: configuration error: {exc}", file=sys.stderr)
        return 2


def _announce(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency; this keeps odd platforms running
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
