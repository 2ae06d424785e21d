"""Parsing a request body into a Call: bad fields are 400s with the field named."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.errors import BadRequest
from sidecar.wire.body import json_depth_exceeds, parse
from tests.support.bodies import MAX_TOKENS

PATH = "/v1/chat/completions"


def call(doc: object):
    return parse("POST", PATH, orjson.dumps(doc))


def test_stream_and_usage_flags():
    c = call({"model": "m", "stream": True})
    assert c.stream and c.wants_hidden_usage
    body = orjson.loads(c.upstream_body())
    assert body["stream_options"] == {"include_usage": True}
    c = call({"model": "m", "stream": True, "stream_options": {"include_usage": True}})
    assert not c.wants_hidden_usage and c.upstream_body() == orjson.dumps(
        {"model": "m", "stream": True, "stream_options": {"include_usage": True}}
    )
    assert call({"model": "m"}).upstream_body() == orjson.dumps({"model": "m"})


@pytest.mark.parametrize(("raw", "passes", "reserved"), MAX_TOKENS, ids=[m[0].decode() for m in MAX_TOKENS])
def test_max_tokens_table(raw, passes, reserved):
    body = b'{"model":"m","max_tokens":' + raw + b"}"
    if not passes:
        with pytest.raises(BadRequest) as info:
            parse("POST", PATH, body)
        err = info.value
        assert err.status == 400
        if raw == b"1e400":  # the JSON itself cannot be read
            assert (err.code, err.param) == ("invalid_json", None)
        else:  # the field is named, and its type is what is wrong
            assert (err.code, err.param) == ("invalid_type", "max_tokens")
        return
    c = parse("POST", PATH, body)
    assert c.max_tokens == reserved and c.upstream_body() == body


def test_good_max_tokens():
    assert call({"max_tokens": 300}).max_tokens == 300
    assert call({"max_completion_tokens": 7, "max_tokens": 300}).max_tokens == 7
    # the one rule for both fields, vLLM's (`max_completion_tokens or max_tokens`): null or 0 defers to the other
    assert call({"max_completion_tokens": None, "max_tokens": 50}).max_tokens == 50
    assert call({"max_completion_tokens": 0, "max_tokens": 50}).max_tokens == 50
    assert call({"max_completion_tokens": 0}).max_tokens is None  # the default is reserved
    # llama-server's n_predict counts whenever it is there: 0 there generates nothing, whatever max_tokens says
    assert parse("POST", "/completion", b'{"prompt":"x","n_predict":0,"max_tokens":9}').max_tokens is None
    assert parse("POST", "/completion", b'{"prompt":"x","n_predict":9}').max_tokens == 9  # llama-server's own
    assert parse("POST", "/generate", b'{"text":"x","sampling_params":{"max_new_tokens":5}}').max_tokens == 5


def test_routes_that_are_not_json_pass_untouched():
    multipart = parse("POST", "/v1/audio/transcriptions", b"--x\r\n...", content_type="multipart/form-data; boundary=x")
    assert multipart.doc is None and multipart.body == b"--x\r\n..."
    assert parse("POST", "/invocations", b"not json").doc is None  # an unknown shape is the upstream's
    assert parse("GET", "/props", b"").doc is None


def test_depth():
    assert json_depth_exceeds(b"[" * 65 + b"]" * 65, 64)
    assert not json_depth_exceeds(b'{"a": "' + b"[" * 100 + b'"}', 64)
    with pytest.raises(BadRequest):
        parse("POST", PATH, b'{"a":' * 100 + b"1" + b"}" * 100)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
        lambda kids: st.lists(kids) | st.dictionaries(st.text(), kids),
        max_leaves=30,
    )
)
def test_any_json_value_parses_or_is_a_400(value):
    try:
        body = orjson.dumps({"model": "m", "messages": value, "stream": value, "max_tokens": value})
    except orjson.JSONEncodeError:
        return
    try:
        parse("POST", PATH, body)
    except BadRequest as exc:
        assert exc.status == 400


@given(st.binary(max_size=200))
def test_any_bytes_parse_or_are_a_400(raw):
    try:
        parse("POST", PATH, raw)
    except BadRequest as exc:
        assert exc.status == 400
