"""The operations port (`server.ops_port`) and `/drain`: operations routes apart from client traffic, and a drain
that another container of the pod can start and watch without ending the process."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest

from sidecar.app import PROXY
from tests.support.clients import stream
from tests.support.waits import free_port

ADMIN = "ops-admin-token-0123"
AUTH = {"authorization": f"Bearer {ADMIN}"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def status(session: aiohttp.ClientSession, method: str, url: str, **kw) -> tuple[int, dict]:
    async with session.request(method, url, **kw) as r:
        return r.status, await r.json(content_type=None)


async def test_operations_routes_live_on_the_ops_port_only(fake, sidecar_factory):
    ops_port = free_port()
    running = await sidecar_factory(fake.url, server__ops_port=ops_port, server__admin_token=ADMIN)
    assert running.server.ops_port == ops_port
    main, ops = running.url, f"http://127.0.0.1:{ops_port}"
    async with aiohttp.ClientSession() as s:
        for path in ("/metrics", "/admin/keys", "/drain"):
            code, body = await status(s, "GET", main + path, headers=AUTH)
            assert code == 404 and body["error"]["code"] == "unknown_url", path
        assert fake.received == []  # the client port relayed none of them either
        async with s.get(ops + "/metrics") as r:
            assert r.status == 200 and b"sidecar_requests_total" in await r.read()
        code, body = await status(s, "POST", ops + "/admin/keys", json={"name": "k"}, headers=AUTH)
        assert code == 201 and body["key"].startswith("sk-")
        for base in (main, ops):
            assert (await status(s, "GET", base + "/healthz"))[0] == 200
            assert (await status(s, "GET", base + "/readyz"))[0] == 200
        code, body = await status(s, "POST", ops + "/v1/chat/completions", json=CHAT)
        assert code == 404 and body["error"]["code"] == "unknown_url"  # the ops port never relays
        code, _ = await status(s, "POST", main + "/v1/chat/completions", json=CHAT)
        assert code == 200
    assert len(fake.received) == 1


async def test_without_an_ops_port_everything_stays_on_the_main_port(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, server__admin_token=ADMIN)
    assert running.server.ops_port == 0 and running.server.ops_runner is None
    async with aiohttp.ClientSession() as s:
        assert (await status(s, "GET", running.url + "/admin/keys", headers=AUTH))[0] == 200
        code, body = await status(s, "GET", running.url + "/drain")
        assert code == 200 and body == {"draining": False, "drained": False, "in_flight": 0}


async def test_post_drain_drains_but_keeps_the_process_until_sigterm(fake, sidecar_factory):
    ops_port = free_port()
    running = await sidecar_factory(
        fake.url, server__ops_port=ops_port, server__drain_grace=0.5, server__drain_timeout=10
    )
    ops = f"http://127.0.0.1:{ops_port}"
    streaming = asyncio.create_task(stream(running.url, '{"chunks": 20, "delay_chunks": 0.1}'))
    while fake.in_flight < 1:
        await asyncio.sleep(0.01)
    async with aiohttp.ClientSession() as s:
        code, body = await status(s, "POST", ops + "/drain")
        assert code == 200 and body["draining"] is True and body["drained"] is False and body["in_flight"] == 1
        assert (await status(s, "GET", running.url + "/readyz"))[1]["status"] == "draining"
        # Within the grace a new request is still served (endpoints take a while to drop the pod).
        assert (await status(s, "POST", running.url + "/v1/chat/completions", json=CHAT))[0] == 200
        while not (await status(s, "GET", ops + "/drain"))[1]["drained"]:
            assert not streaming.done() or streaming.result()[0] == 200
            await asyncio.sleep(0.05)
        code, body = streaming.result()
        assert code == 200 and body.endswith(b"data: [DONE]\n\n")  # it finished: the drain waited for it
        # A connection kept alive from before gets 503 and is closed; a new one is refused: the listener is gone.
        async with s.post(running.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 503 and (await r.json())["error"]["code"] == "server_shutting_down"
            assert r.headers.get("connection", "").lower() == "close"
        with pytest.raises(aiohttp.ClientConnectionError):
            await status(s, "POST", running.url + "/v1/chat/completions", json=CHAT)
        code, body = await status(s, "POST", ops + "/drain")  # ... the ops port still answers, the drain once
        assert code == 200 and body == {"draining": True, "drained": True, "in_flight": 0}
        assert (await status(s, "GET", ops + "/readyz"))[0] == 503
    assert sorted(r["outcome"] for r in await running.stored(3)) == ["completed", "completed", "shutdown"]
    await asyncio.wait_for(running.server.drain(), 5)  # SIGTERM's part: only the closing is left


def _outside_address() -> str | None:
    """An address of this machine that is not loopback (the peer a pod neighbour on the network would be)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            address = probe.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


async def test_drain_refuses_anyone_but_loopback(fake, sidecar_factory):
    address = _outside_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    ops_port = free_port()
    running = await sidecar_factory(fake.url, server__ops_port=ops_port, server__host="0.0.0.0")
    async with aiohttp.ClientSession() as s:
        code, body = await status(s, "POST", f"http://{address}:{ops_port}/drain")
        assert code == 403 and body["error"]["code"] == "loopback_only"
        assert (await status(s, "GET", f"http://{address}:{ops_port}/drain"))[0] == 403
        code, body = await status(s, "GET", f"http://127.0.0.1:{ops_port}/drain")
        assert code == 200 and body["draining"] is False
    assert running.server.app[PROXY].in_flight.tasks == set()


@pytest.mark.parametrize(
    "proxied", [{"x-forwarded-for": "203.0.113.5"}, {"forwarded": "for=203.0.113.5"}, {"x-real-ip": "203.0.113.5"}]
)
async def test_drain_through_a_proxy_needs_the_admin_token(fake, sidecar_factory, proxied):
    """Without an ops port, a proxy on the host or in the pod reaches /drain from loopback too: a request that
    names the client it came from is refused unless it carries the admin token."""
    running = await sidecar_factory(fake.url, server__admin_token=ADMIN)
    async with aiohttp.ClientSession() as s:
        code, body = await status(s, "POST", running.url + "/drain", headers=proxied)
        assert code == 403 and body["error"]["code"] == "loopback_only"
        wrong = {**proxied, "authorization": "Bearer not-the-admin-token"}
        code, body = await status(s, "POST", running.url + "/drain", headers=wrong)
        assert code == 401 and body["error"]["code"] == "invalid_admin_token"
        assert (await status(s, "GET", running.url + "/drain"))[1]["draining"] is False  # nothing drained
        code, body = await status(s, "POST", running.url + "/drain", headers={**proxied, **AUTH})
        assert code == 200 and body["draining"] is True
    await asyncio.wait_for(running.server.drain(), 5)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"server__ops_port": 70000}, "server.ops_port: must be 1-65535"),
        ({"server__port": 9000, "server__ops_port": 9000}, "server.ops_port: must differ from server.port"),
    ],
)
def test_ops_port_config_errors(tmp_path, env, message):
    from sidecar.config import ConfigError
    from tests.support.sidecars import make_settings

    with pytest.raises(ConfigError, match=message):
        make_settings("http://127.0.0.1:1/v1", tmp_path, **env)


async def test_a_taken_ops_port_is_named_in_the_start_error(fake, tmp_path):
    from sidecar.runner import Server, StartFailed, _start
    from tests.support.sidecars import make_settings

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        server = Server(make_settings(fake.url, tmp_path, server__ops_port=port))
        with pytest.raises(StartFailed, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            await _start(server)
    finally:
        taken.close()
