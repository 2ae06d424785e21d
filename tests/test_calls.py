"""Parsing a request body into a Call: bad fields are 400s with the field named."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.calls import json_depth_exceeds, parse
from sidecar.errors import BadRequest

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


@pytest.mark.parametrize("raw", [b"-1", b"0", b'"300"', b"true", b"1.5", b"NaN", b"1e400", b"99999999999"])
def test_bad_max_tokens(raw):
    with pytest.raises(BadRequest) as info:
        parse("POST", PATH, b'{"model":"m","max_tokens":' + raw + b"}")
    assert info.value.status == 400


def test_good_max_tokens():
    assert call({"max_tokens": 300}).max_tokens == 300
    assert call({"max_completion_tokens": 7, "max_tokens": 300}).max_tokens == 7


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
