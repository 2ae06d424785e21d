"""The one table from transport and store failures to what the client sees (`sidecar.errors.failure`): every
row's status, code, message and metric reason, exactly. The relay, the upstream metrics page and every
non-proxied route go through it; over real sockets: tests/test_relay_contract.py (the relay),
tests/test_own_metrics.py (the upstream's page)."""

from __future__ import annotations

import orjson
import pytest

from sidecar.errors import TRANSPORT_FAILURES, failure
from sidecar.store.base import ReportTimeout, StoreError
from sidecar.upstream.deadline import DeadlineExpired
from sidecar.upstream.response import ConnectFailed, ConnectionBroken, PoolExhausted, ResponseTooLarge, UpstreamBroke

ROWS = [
    (PoolExhausted("8 busy"), 503, "server_overloaded", "The server is at capacity (8 busy); retry shortly.", None),
    (ConnectFailed("refused"), 502, "upstream_unreachable", "Cannot connect to the upstream: refused.", "connect"),
    (UpstreamBroke("reset"), 502, "upstream_dropped", "The upstream connection broke mid-response: reset", "dropped"),
    (ConnectionBroken("eof"), 502, "upstream_error", "The upstream request failed: eof.", "protocol"),
    (ResponseTooLarge("big"), 502, "upstream_error", "The upstream request failed: big.", "protocol"),
    (
        DeadlineExpired("first_byte", 2),
        504,
        "upstream_timeout",
        "The upstream did not answer in time (first_byte timeout after 2s).",
        "timeout_first_byte",
    ),
    (DeadlineExpired("idle", 1.5), 504, "upstream_timeout", None, "timeout_idle"),
    (DeadlineExpired("total", 60), 504, "upstream_timeout", None, "timeout_total"),
    (TimeoutError(), 504, "upstream_timeout", "The upstream did not answer in time.", None),
    (StoreError("down"), 503, "store_unavailable", "The store is unavailable; retry shortly.", None),
    (ReportTimeout(10.0), 503, "report_timeout", None, None),
]


@pytest.mark.parametrize(("exc", "status", "code", "message", "reason"), ROWS, ids=lambda v: type(v).__name__)
def test_each_failure_reaches_the_client_as_its_row_says(exc, status, code, message, reason):
    found = failure(exc)
    assert (found.error.status, found.error.code, found.reason) == (status, code, reason)
    if message is not None:
        assert found.error.message == message
    body = orjson.loads(found.error.body())["error"]
    assert body["code"] == code and body["message"] == found.error.message


def test_a_store_failure_says_whether_anything_was_changed():
    assert failure(StoreError("x"), changing=True).error.message == "The store is unavailable; nothing was changed."
    assert failure(ReportTimeout(10.0), changing=True).error.message.startswith("The report took too long")


def test_the_pool_exhausted_answer_asks_the_client_to_retry():
    assert failure(PoolExhausted("x")).error.headers == {"retry-after": "1"}


def test_what_the_table_does_not_know_is_raised_not_hidden():
    with pytest.raises(KeyError):
        failure(KeyError("a bug"))


def test_the_transport_failures_are_the_ones_the_table_maps():
    for exc in (ConnectFailed("x"), UpstreamBroke("x"), DeadlineExpired("idle", 1), TimeoutError()):
        assert isinstance(exc, TRANSPORT_FAILURES)
        assert failure(exc).error.status in (502, 503, 504)
