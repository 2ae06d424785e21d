"""A client's bytes that are not UTF-8 never cost a record (#27).

aiohttp keeps a header's undecodable bytes as lone surrogates, which JSON encoders and PostgreSQL refuse: one
`\\xff` in a `User-Agent` used to switch off the access line and the audit record, and turn a whole answer into
a 500 after the upstream did the work. Sent here over raw sockets (an HTTP client will not send such bytes):
every byte 0x80-0xFF, and the one control byte a header may hold (HTAB), in each header that is logged or
recorded. Also the sinks' own last line of defence (the log formatter, the audit encoder, an answer too deep
to encode) and the admin paths a key name takes (the API's JSON, the CLI's command line).
"""

from __future__ import annotations

import asyncio
import glob
import logging

import aiohttp
import orjson
import pytest

from sidecar.app import STORE
from sidecar.audit.capture import build_record
from sidecar.ops.logs import JsonFormatter
from sidecar.store.base import RequestQuery
from tests.support.bodies import CHAT, STREAM
from tests.support.clients import ADMIN, admin
from tests.support.processes import cli
from tests.support.waits import wait_for

HIGH = bytes(range(0x80, 0x100))  # every byte that is not ASCII: none of them, alone or in this order, is UTF-8
AGENT = b"agent\t" + HIGH + b"/1"
CLIENT_ID = b"id\t" + HIGH  # 130 bytes: the row keeps the first 128
FORWARDED = b"203.0.113.9, hop\t" + HIGH + b"-end"  # a trusted proxy's header: its last hop is the client


def text(raw: bytes) -> str:
    """What the sidecar is to record for `raw`: each byte that is not UTF-8 as U+FFFD."""
    return raw.decode("utf-8", "replace")


def dechunk(data: bytes) -> bytes:
    out = b""
    while True:
        size, _, data = data.partition(b"\r\n")
        n = int(size.split(b";")[0], 16)
        if n == 0:
            return out
        out, data = out + data[:n], data[n + 2 :]


async def send(port: int, body: dict, headers: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One request over a raw socket with `headers` as they are: (status, response headers, body)."""
    payload = orjson.dumps(body)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
        + headers
        + b"Content-Length: %d\r\n\r\n" % len(payload)
        + payload
    )
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    if fields.get("transfer-encoding") == "chunked":
        rest = dechunk(rest)
    return int(lines[0].split()[1]), fields, rest


def jsonl_records(directory) -> list[dict]:
    out = []
    for path in sorted(glob.glob(f"{directory}/audit-*.jsonl")):
        with open(path, "rb") as f:
            out += [orjson.loads(line) for line in f if line.strip()]
    return out


@pytest.fixture
def quiet_fake_access_log():
    """The fake upstream's own aiohttp access line holds the forwarded bytes as lone surrogates, which pytest-xdist
    cannot carry back from a worker: that log is the fake's, not the sidecar's, so it is left out here."""
    access = logging.getLogger("aiohttp.access")
    before = access.disabled
    access.disabled = True
    yield
    access.disabled = before


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_header_bytes_that_are_not_utf8_are_answered_logged_stored_and_audited(
    fake, sidecar_factory, tmp_path, store_url, stream, quiet_fake_access_log
):
    audit_dir = tmp_path / "audit"
    running = await sidecar_factory(
        fake.url,
        store__url=store_url,
        server__trusted_proxies=["127.0.0.1/32"],
        audit__capture="all",
        audit__sinks="jsonl,db",
        audit__jsonl_dir=str(audit_dir),
    )
    body = STREAM if stream else CHAT
    plain = await send(running.port, body, b"User-Agent: plain\r\n")
    hostile = b"User-Agent: " + AGENT + b"\r\nX-Request-Id: " + CLIENT_ID + b"\r\nX-Forwarded-For: " + FORWARDED
    status, headers, answer = await send(running.port, body, hostile + b"\r\n")
    assert (status, answer) == (plain[0], plain[2]) == (200, plain[2])  # the upstream's answer, as a clean request's
    rid = headers["x-request-id"]

    (line,) = [row for row in running.rows if row["request_id"] == rid]  # every line parsed as JSON
    assert line["user_agent"] == text(AGENT) and "\ufffd" in line["user_agent"]
    assert line["client_addr"] == text(b"hop\t" + HIGH + b"-end")
    assert line["client_request_id"] == text(CLIENT_ID[:128])
    rows = [r for r in await running.stored(2) if r["request_id"] == rid]  # the clean request's and this one
    assert [(r["client_request_id"], r["status"]) for r in rows] == [(text(CLIENT_ID[:128]), 200)]

    def audited() -> list[dict]:
        return [r for r in jsonl_records(audit_dir) if r["request_id"] == rid]

    await wait_for(lambda: len(audited()) == 1, 5.0, lambda: f"no jsonl audit record of {rid}")
    stored = await db_audit(running, rid)
    assert len(stored) == 1, "no db audit record"
    for record in [*audited(), *stored]:
        assert record["request"]["headers"]["user-agent"] == text(AGENT)
        assert record["request"]["headers"]["x-request-id"] == text(CLIENT_ID)
        assert record["complete"] is True and record["status"] == 200


async def db_audit(running, rid: str) -> list[dict]:
    """The `db` sink's records of `rid`, once its writer flushed them (within 5 s)."""
    store = running.server.app[STORE]
    for _ in range(100):
        if found := await store.audit_records(RequestQuery(request_id=rid)):
            return found
        await asyncio.sleep(0.05)
    return []


def test_the_log_formatter_writes_text_that_is_not_utf8_and_integers_beyond_64_bits():
    record = logging.LogRecord("sidecar.test", logging.WARNING, __file__, 1, "agent %s", ("a\udcffb",), None)
    record.fields = {"user_agent": "x\udc80y", "big": 2**70, "nested": {"k\udcfe": ["\udcff"]}}
    line = orjson.loads(JsonFormatter().format(record))
    assert line["msg"] == "agent a\ufffdb" and line["user_agent"] == "x\ufffdy"
    assert line["big"] == str(2**70) and line["nested"] == {"k\ufffd": ["\ufffd"]}
    record.fields = {"deep": orjson.loads(b"[" * 300 + b"]" * 300)}  # deeper than orjson encodes: the bare line
    line = orjson.loads(JsonFormatter().format(record))
    assert (line["msg"], line["unencodable"], "deep" in line) == ("agent a\ufffdb", True, False)


def test_the_audit_encoder_writes_header_text_that_is_not_utf8():
    row = {"request_id": "req_1", "path": "/v1/chat/completions", "status": 200}
    headers = {"user-agent": "a\udcffb"}  # a header that reached the record without going through the edge
    _, line = build_record(
        rec=row, endpoint="/v1/chat/completions", request_headers=headers, request_body={"model": "m"},
        response={"ok": True}, complete=True, cap=100_000,
    )  # fmt: skip
    assert orjson.loads(line)["request"]["headers"]["user-agent"] == "a\ufffdb"
    assert orjson.loads(line)["request"]["body"] == {"model": "m"}


def test_an_audit_record_whose_answer_is_too_deep_to_encode_keeps_its_metadata():
    deep = orjson.loads(b"[" * 300 + b"]" * 300)  # JSON parsers take it; orjson encodes at most 255 levels
    _, line = build_record(
        rec={"request_id": "req_2", "status": 200}, endpoint="/v1/chat/completions", request_headers={},
        request_body={"model": "m"}, response=deep, complete=True, cap=100_000,
    )  # fmt: skip
    doc = orjson.loads(line)
    assert doc["request_id"] == "req_2" and doc["response"] is None and doc["truncated"] is True


async def test_a_whole_answer_too_deep_to_audit_is_still_answered_and_audited(fake, sidecar_factory, tmp_path):
    deep = b"[" * 1000 + b"]" * 1000  # deeper than Python recursion goes while the record is cut

    async def answer(request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.Response(body=deep, content_type="application/json")

    fake.handler = answer
    running = await sidecar_factory(fake.url, audit__capture="all", audit__jsonl_dir=str(tmp_path / "a"))
    status, headers, body = await send(running.port, CHAT)
    assert (status, body) == (200, deep)
    rid = headers["x-request-id"]
    await wait_for(lambda: jsonl_records(tmp_path / "a"), 5.0, lambda: "no audit record")
    (record,) = jsonl_records(tmp_path / "a")
    assert record["request_id"] == rid and record["response"] is None and record["truncated"] is True
    assert [row["request_id"] for row in running.rows] == [rid]
    async with aiohttp.ClientSession() as s, s.get(running.url + "/metrics") as r:
        assert "sidecar_audit_unencodable_total 1.0" in await r.text()


@pytest.mark.parametrize("name", ["a\u0000b", "a\u001b[31mred", "tab\there"], ids=["NUL", "ESC", "TAB"])
async def test_a_key_name_with_a_control_character_is_a_400(fake, sidecar_factory, store_url, name):
    running = await sidecar_factory(fake.url, auth__enabled=True, server__admin_token=ADMIN, store__url=store_url)
    async with aiohttp.ClientSession() as s:
        status, doc, _ = await admin(s, "POST", running.url + "/admin/keys", {"name": name})
        assert (status, doc["error"]["param"], doc["error"]["code"]) == (400, "name", "invalid_value")
        status, doc, _ = await admin(s, "POST", running.url + "/admin/keys", {"name": "ok", "models": ["m\u0000"]})
        assert (status, doc["error"]["param"]) == (400, "models")
        status, doc, _ = await admin(s, "GET", running.url + "/admin/audit")
        assert (status, doc["data"]) == (200, [])  # nothing was changed, so nothing is in the admin audit log


async def test_the_cli_refuses_arguments_that_are_not_utf8_in_one_line(fake, sidecar_factory, tmp_path):
    await sidecar_factory(fake.url, auth__enabled=True)  # the store and the pepper in tmp_path
    undecodable = b"a\xffb".decode("utf-8", "surrogateescape")  # as Python hands a command line's bytes over
    for args in (
        ("keys", "create", "--name", undecodable),
        ("keys", "create", "--name", "ok", "--models", undecodable),
        ("keys", "show", undecodable),
        ("usage", "--model", undecodable),
        ("requests", "--key", undecodable),
    ):
        out = cli(tmp_path, *args)
        assert out.returncode == 1, (args, out.stderr)
        assert out.stderr.strip().splitlines() == [out.stderr.strip()] and "is not UTF-8 text" in out.stderr, args
    assert "ok" not in cli(tmp_path, "keys", "list").stdout
