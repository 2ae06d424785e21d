"""Structured logging: one JSON object per line on stderr.

Callers pass structured data as `extra={"fields": {...}}`; it is merged into the line. A line is encoded by
`dumps`, which cannot be refused what a client sent: text that is not valid UTF-8 is written with U+FFFD
(`sidecar.wire.headers.clean_text`), so a byte in a header never costs a line. Our own code only ever
logs key ids and masked settings; as a second line of defence every line, whoever wrote it (aiohttp, asyncio,
psycopg, ...), goes through `scrub()` before it is written: bearer tokens, `sk-` keys, credential headers and
passwords in URLs are replaced by `***`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
from typing import Any

import orjson

from sidecar.wire.headers import clean_text

REQUEST_LOGGER = "sidecar.request"
_AGENTS = 1024  # scrubbed user agents remembered by the request log (each at most 256 characters)
_SECRETS = (
    (re.compile(r"(?i)\b(bearer|basic)(\s+)[^\s\"'\\,;]+"), r"\1\2***"),
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{6,}"), "sk-***"),
    (
        # the value runs to the end of its line, also in JSON-escaped text (`\n`), over `\x01`-style escapes
        re.compile(
            r"(?i)\b(authorization|proxy-authorization|x-api-key|api-key|cookie|set-cookie)(\s*[:=]\s*)"
            r"(?:[^\r\n\"'\\]|\\(?![nr\"']))+"
        ),
        r"\1\2***",
    ),
    (re.compile(r"(?i)(\w+://[^/\s:@\"']*:)[^@\s\"'/]+@"), r"\1***@"),
    (re.compile(r"(?i)(https?://)[^/\s:@\"']+@"), r"\1***@"),
    (
        re.compile(
            r"(?i)\b(password|passwd|pwd|sslpassword|secret|client_secret|token|access_token|refresh_token|api_key|"
            r"api-key|apikey|sig|signature)=[^&\s\"'\\]+"
        ),
        r"\1=***",
    ),
)


def scrub(text: str) -> str:
    """`text` with anything that looks like a credential replaced by `***`."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


_INT_MIN, _UINT_MAX = 2**63, 2**64 - 1  # orjson encodes integers of 64 bits, signed or not


def dumps(doc: Any) -> bytes:
    """`doc` as JSON. What orjson refuses is encoded repaired (`repaired`): text that is not valid UTF-8 (a
    client's undecodable bytes, as aiohttp keeps them: lone surrogates) and integers beyond 64 bits. Raises
    TypeError only for a doc nested deeper than orjson's 255 levels."""
    try:
        return orjson.dumps(doc, default=str)
    except TypeError:
        pass
    try:
        return orjson.dumps(repaired(doc), default=_text)
    except RecursionError:
        raise TypeError("nested too deeply to be encoded") from None


def repaired(doc: Any) -> Any:
    """A copy of `doc` orjson takes: every string and key made valid UTF-8 (`clean_text`), every integer
    beyond 64 bits written as text."""
    if isinstance(doc, str):
        return clean_text(doc)
    if isinstance(doc, dict):
        return {clean_text(str(k)): repaired(v) for k, v in doc.items()}
    if isinstance(doc, list | tuple):
        return [repaired(v) for v in doc]
    if isinstance(doc, int) and not -_INT_MIN <= doc <= _UINT_MAX:
        return str(doc) if doc.bit_length() <= 1024 else f"an integer of {doc.bit_length()} bits"  # str() has a limit
    return doc


def _text(value: Any) -> str:
    """orjson's `default`: what it cannot encode, as text it can."""
    return clean_text(str(value))


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self.process_fields: dict[str, Any] = {}  # on every line of this process (a worker's index: `for_worker`)

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **self.process_fields,
        }
        fields = record.__dict__.get("fields")
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        try:
            return scrub(dumps(line).decode())
        except TypeError:  # fields nested too deeply: the line without them, still one JSON object
            bare = {
                "ts": line["ts"], "level": line["level"], "logger": record.name, "msg": record.getMessage(),
                **self.process_fields,
            }  # fmt: skip
            return scrub(dumps({**bare, "unencodable": True}).decode())


def setup(level: str) -> None:
    """Route every logger (ours, aiohttp's, asyncio's) to one JSON handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # aiosqlite logs every statement it runs at debug: hundreds of lines before the sidecar even listens, none
    # of them about the sidecar; `log_level = "debug"` is for the sidecar's own story.
    logging.getLogger("aiosqlite").setLevel(max(logging.INFO, root.level))


def for_worker(index: int) -> None:
    """In a worker of `server.workers`: every log line it writes says `"worker": index` (the access lines do not:
    the row they carry is the request's)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, JsonFormatter):
            handler.formatter.process_fields = {"worker": index}


def event(logger: logging.Logger, msg: str, **fields: Any) -> None:
    logger.info(msg, extra={"fields": fields})


class RequestLog:
    """The per-request JSON line, written without the `logging` machinery.

    `logging` costs ~10 µs per record, more than the proxy's own work on a small request. Lines gather in a
    buffer and are written when it reaches 64 KiB or `flush_ms` after the first line, and at close. A
    `flush_ms` of 0 writes every line at once.
    """

    def __init__(self, path: str = "", flush_ms: int = 100) -> None:
        self._fd = 2
        self._own = False
        if path and path != "stderr":
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._own = True
        self._delay = flush_ms / 1000.0
        self._buf = bytearray()
        self._handle: asyncio.TimerHandle | None = None
        self._agents: dict[str, str] = {}  # user agent -> scrubbed (`_agent`)

    def write_access(self, line: bytes, ts: float, client: str | None, agent: str | None) -> None:
        """The request's row as its access line: first the fields every other log line has (`ts`, `level`,
        `logger`, `msg`), then the client's address and user agent (scrubbed: a client may put anything there;
        `dumps`: even bytes that are not UTF-8), then the row."""
        head = {
            "ts": round(ts, 3),
            "level": "info",
            "logger": REQUEST_LOGGER,
            "msg": "request",
            "client_addr": client,
            "user_agent": self._agent(agent) if agent else None,
        }
        self.write_line(dumps(head)[:-1] + b"," + line[1:])

    def _agent(self, agent: str) -> str:
        """`agent` scrubbed, remembered: a fleet's clients send a handful of user agents, and the six patterns of
        `scrub` cost more than the rest of the line (~12 µs). Forgotten all at once past `_AGENTS` of them."""
        clean = self._agents.get(agent)
        if clean is None:
            if len(self._agents) >= _AGENTS:
                self._agents.clear()
            clean = self._agents[agent] = scrub(agent)
        return clean

    def write_line(self, line: bytes) -> None:
        """One JSON object, already encoded (the writer's own encoding of the record is reused)."""
        self._buf += line
        self._buf += b"\n"
        if not self._delay or len(self._buf) >= 65536:
            self.flush()
        elif self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self._delay, self.flush)

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        view = memoryview(self._buf)
        try:
            while view:
                try:
                    view = view[os.write(self._fd, view) :]
                except BlockingIOError:  # a non-blocking stderr pipe that is full: keep the rest for later
                    break
        except OSError:
            view = view[len(view) :]  # stderr is gone; the store keeps the records
        rest = bytes(view)
        view.release()
        self._buf = bytearray(rest)

    def close(self) -> None:
        self.flush()
        if self._own:
            os.close(self._fd)
            self._own = False
