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
    assert call({"max_completion_tokens": 0}).max_tokens == 0  # no output asked for: none reserved
    assert call({"max_completion_tokens": None}).max_tokens is None  # no cap named
    # llama-server's n_predict counts whenever it is there: 0 there generates nothing, whatever max_tokens says
    assert parse("POST", "/completion", b'{"prompt":"x","n_predict":0,"max_tokens":9}').max_tokens == 0
    assert parse("POST", "/completion", b'{"prompt":"x","n_predict":-1,"max_tokens":9}').max_tokens is None
    assert parse("POST", "/completion", b'{"prompt":"x","n_predict":9}').max_tokens == 9  # llama-server's own
    assert parse("POST", "/generate", b'{"text":"x","sampling_params":{"max_new_tokens":5}}').max_tokens == 5


def test_routes_that_are_not_json_pass_untouched():
    multipart = parse("POST", "/v1/audio/transcriptions", b"--x\r\n...")
    assert multipart.doc is None and multipart.body == b"--x\r\n..."
    assert parse("POST", "/v1/custom", b"not json").doc is None  # a route of no known family is the upstream's
    assert parse("GET", "/props", b"").doc is None


def test_json_routes_are_read_as_json_whatever_the_label_and_invocations_by_their_body():
    # the route decides, not the Content-Type (there is no such argument): llama-server parses any label as JSON
    with pytest.raises(BadRequest) as exc:
        parse("POST", PATH, b"--x\r\nContent-Disposition: form-data\r\n\r\n{}")
    assert exc.value.code == "invalid_json"
    with pytest.raises(BadRequest):
        parse("POST", "/invocations", b"not json")  # vLLM answers 400 too
    chat = parse("POST", "/invocations", b'{"model":"m","messages":[],"stream":true,"max_tokens":7}')
    assert (chat.family, chat.model, chat.stream, chat.max_tokens, chat.wants_hidden_usage) == (
        "chat",
        "m",
        True,
        7,
        True,
    )
    assert parse("POST", "/invocations", b'{"prompt":"x","n":3}').family == "completions"
    assert parse("POST", "/invocations", b'{"input":"x"}').family == "embeddings"
    assert parse("POST", "/invocations", b'{"query":"q","documents":["d"]}').family == "rerank"
    assert parse("POST", "/invocations", b'{"data":"x"}').family == "pooling"


def test_answers_count_every_choice_and_every_prompt_of_a_batch():
    assert call({}).answers == 1
    assert call({"n": 10}).answers == 10
    assert call({"n": 2, "best_of": 5}).answers == 5  # vLLM generates best_of to return n
    assert call({"n": 4.0}).answers == 4
    assert call({"n": 0}).answers == 1  # the upstream refuses it
    assert parse("POST", "/v1/completions", b'{"prompt":["a","b","c"],"n":2}').answers == 6
    assert parse("POST", "/v1/completions", b'{"prompt":[[1,2],[3]]}').answers == 2
    assert parse("POST", "/v1/completions", b'{"prompt":[1,2,3]}').answers == 1  # token ids of one prompt
    assert parse("POST", "/generate", b'{"text":["a","b"],"sampling_params":{"n":3}}').answers == 6
    for bad in ('"10"', "true", "{}"):
        with pytest.raises(BadRequest) as exc:
            parse("POST", PATH, b'{"messages":[],"n":' + bad.encode() + b"}")
        assert exc.value.param == "n"


def test_an_enforced_cap_is_written_where_the_family_reads_it():
    def forwarded(path: str, doc: dict) -> dict:
        return orjson.loads(parse("POST", path, orjson.dumps(doc)).capped(64).upstream_body())

    assert forwarded(PATH, {"messages": []})["max_tokens"] == 64
    assert forwarded("/v1/completions", {"prompt": "x"})["max_tokens"] == 64
    assert forwarded("/v1/responses", {"input": "x"})["max_output_tokens"] == 64
    assert forwarded("/completion", {"prompt": "x", "n_predict": -1})["n_predict"] == 64
    assert forwarded("/generate", {"text": "x", "sampling_params": {"temperature": 0}})["sampling_params"] == {
        "temperature": 0,
        "max_new_tokens": 64,
    }
    untouched = b'{"messages": [], "max_tokens": 5}'
    assert parse("POST", PATH, untouched).upstream_body() == untouched  # no cap to write: the client's bytes


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
