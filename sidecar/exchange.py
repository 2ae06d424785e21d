"""Exchange: one proxied request and everything it holds, released in one documented order however it ends.

An exchange is entered when a request arrives and exited when its handler is done (returned, raised or was
cancelled). What it holds is filled in as the pipeline goes: the key's lease, the parsed call, the upstream's
response, the stream scanner, the audit capture. Its exit, in this order:

1. settle usage: the upstream's usage event, else the deltas counted so far (a Messages stream cut after its
   `message_start`: that event's input, exact, and the deltas counted); a client gone before any usage
   was known is charged at least what its body proves (the prompt; a started whole answer's output budget);
   a body the sidecar could not read (an upload) is charged what it reserved when the upstream took it and
   said no usage;
2. release the upstream connection (a complete answer) or close it (anything else: closing is what stops a
   model server generating);
3. release the lease (refunding what was reserved and not used);
4. finish the record: exactly one per request, unless it ended before any key was verified and the
   per-source reject rate says it costs only counters (`sidecar.ops.rejects`);
5. hand off the audit record.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from aiohttp import web

from sidecar.audit.capture import Auditor, Capture
from sidecar.limits.admission import Lease
from sidecar.records.record import CLIENT_CLOSED_REQUEST, Outcome, RequestRecord
from sidecar.upstream.response import UpstreamResponse
from sidecar.wire.body import Call
from sidecar.wire.routes import UNCHARGED
from sidecar.wire.sse import StreamScanner


@dataclass(frozen=True, slots=True)
class Admission:
    """What a request that passed every check holds: its call, its lease and what that lease reserved."""

    call: Call
    lease: Lease
    prompt_estimate: int
    output_budget: int  # the output tokens reserved: max_tokens, or the configured default


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


class Exchange:
    __slots__ = (
        "_auditor",
        "_finish",
        "_keep",
        "_request",
        "authenticated",
        "admission",
        "capture",
        "concluded",
        "cors",
        "raw",
        "rec",
        "resp",
        "response",
        "scanner",
        "up",
    )

    def __init__(
        self,
        request: web.Request,
        rec: RequestRecord,
        finish: Callable[[RequestRecord, bool], None],
        keep: Callable[[web.Request], bool],
        auditor: Auditor | None,
        cors: Mapping[str, str],
    ) -> None:
        self._request = request
        self._finish = finish
        self._keep = keep  # asked at the end whether a request that never got past the key check costs a row
        self._auditor = auditor
        self.rec = rec
        self.cors = cors  # CORS headers for the answer (server.cors_origins)
        self.authenticated = False
        self.admission: Admission | None = None  # once the request passed every check and holds a lease
        self.capture: Capture | None = None  # set when the request is audited
        self.up: UpstreamResponse | None = None  # the upstream's answer, once its head is in
        self.resp: web.StreamResponse | None = None  # our answer to the client, once it has started
        self.response: Any = None  # a whole answer's body as audit keeps it
        self.scanner: StreamScanner | None = None
        self.raw = False  # a plain (non-SSE) body is being relayed: a failure can only cut the connection
        self.concluded = False  # usage settled, upstream and lease released, the record finished (`conclude`)

    async def __aenter__(self) -> Exchange:
        return self

    @property
    def admitted(self) -> Admission:
        """The admission (for the relay, which only runs after it)."""
        assert self.admission is not None, "relayed before admission"
        return self.admission

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.concluded:
            gone = client_gone(self._request)
            if et is not None and issubclass(et, BaseException) and not issubclass(et, Exception):
                self.ended_early()  # cancelled: the client left
            self.conclude(gone)
        if self.capture is not None:
            self._hand_off_audit()

    def conclude(self, gone: bool = False) -> None:
        """Steps 1 to 4 of the exit, once. The relay calls it itself just before the write that ends a complete
        answer it writes (a stream's last events, a large body's last bytes), so the row is journaled before the
        client can have the whole answer: a process killed between the two never leaves an answer without its
        row. A client that leaves during that last write does not change the row (it got all but the end)."""
        if self.concluded:
            return
        self.concluded = True
        self._settle(gone)
        if self.up is not None:
            self.up.release()  # back to the pool when its answer was read to the end, else closed
        if self.admission is not None:
            self.admission.lease.release()
        self._finish(self.rec.finish(), self.authenticated or self._keep(self._request))

    def ended_early(self) -> None:
        """The handler stopped before the end because the client went away. A cancel reaching the exchange is
        that too: our own drain's cancel is answered as a 503 where it lands (`InFlight.shutdown_cancel`), and
        the web server's stop without a drain closes the socket before it cancels. After `conclude` the row is
        made: nothing changes."""
        if not self.concluded:
            self.rec.fail(CLIENT_CLOSED_REQUEST, Outcome.CLIENT_DISCONNECTED, "client_disconnected")

    def _settle(self, gone: bool) -> None:
        rec, scanner, admission = self.rec, self.scanner, self.admission
        if admission is None:
            return
        prompt = admission.prompt_estimate or None
        if admission.call.family in UNCHARGED:
            pass  # a stored answer read back: its usage was charged when it was made (`wire.routes.STORED`)
        elif scanner is not None and scanner.usage is not None and scanner.usage_partial:
            # A Messages stream cut before its `message_delta`: `message_start` said the input exactly; the
            # output is what was relayed (one token per content delta), never less than the upstream said.
            u = scanner.usage
            output = max(scanner.deltas, u.completion_tokens or 0)
            rec.set_usage(u.prompt_tokens, output, u.cached_tokens, "counted", u.cache_write_tokens, None)
        elif scanner is not None and scanner.usage is not None:
            u = scanner.usage
            rec.set_usage(
                u.prompt_tokens,
                u.completion_tokens,
                u.cached_tokens,
                "upstream",
                u.cache_write_tokens,
                u.reasoning_tokens,
            )
        elif admission.call.doc is None:
            if rec.usage_source == "none" and admission.output_budget and (gone or 200 <= rec.status < 300):
                # A body the sidecar could not read (an upload) that the upstream took without a usage
                # figure: charged what it reserved, the documented minimum (`Limits.reserve`).
                rec.set_usage(admission.output_budget, 0, None, "reserved")
        elif scanner is not None:
            rec.set_usage(prompt, scanner.deltas, None, "counted")
        elif gone and rec.usage_source == "none":
            # Admitted means sent (the relay sends before its first await): the prompt was the upstream's to
            # process. A whole answer that had started was generated in full before it was sent: without its
            # usage object, the output budget is what the client may have used.
            rec.set_usage(prompt, admission.output_budget if self.raw else 0, None, "counted")
        admission.lease.settle(rec.prompt_tokens, rec.completion_tokens)

    def _hand_off_audit(self) -> None:
        capture, scanner = self.capture, self.scanner
        assert capture is not None and self._auditor is not None
        if scanner is not None and capture.stream is not None:
            capture.stream.fold(scanner.take_regions(), scanner.sep)
        complete = self.rec.outcome == Outcome.COMPLETED and (scanner is None or scanner.done)
        self._auditor.finish(capture, self.rec.as_row(), self.response, complete)
