"""The pure SSE scanner: any split of a stream gives the same events, usage and output bytes."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.wire.sse import StreamScanner, count_deltas, delta_patterns
from sidecar.wire.usage import usage_from


def stream(n: int, usage: bool = True, sep: bytes = b"\n\n") -> tuple[bytes, bytes]:
    base = {"id": "c", "object": "chat.completion.chunk", "model": "m"}
    events = [orjson.dumps({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})]
    events += [orjson.dumps({**base, "choices": [{"index": 0, "delta": {"content": f"w{i} "}}]}) for i in range(n)]
    events.append(orjson.dumps({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    usage_event = b""
    if usage:
        usage_event = (
            b"data: "
            + orjson.dumps(
                {
                    **base,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": 3,
                        "completion_tokens": n,
                        "total_tokens": 3 + n,
                        "prompt_tokens_details": {"cached_tokens": 2},
                    },
                }
            )
            + sep
        )
    body = b"".join(b"data: " + e + sep for e in events) + usage_event + b"data: [DONE]" + sep
    return body, usage_event


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in [*points, len(data)]:
        out.append(data[prev:p])
        prev = p
    return [c for c in out if c]


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 30), cuts=st.lists(st.integers(0, 10_000), max_size=40), crlf=st.booleans())
def test_any_split_passes_bytes_through_and_finds_usage(n, cuts, crlf):
    body, _ = stream(n, sep=b"\r\n\r\n" if crlf else b"\n\n")
    scanner = StreamScanner()
    out = b"".join(scanner.feed(c) for c in split(body, cuts)) + scanner.flush()
    assert out == body
    assert scanner.usage is not None and scanner.usage.completion_tokens == n and scanner.usage.cached_tokens == 2
    assert scanner.deltas == n and scanner.done


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 30), cuts=st.lists(st.integers(0, 10_000), max_size=40))
def test_any_split_strips_exactly_the_usage_event(n, cuts):
    body, usage_event = stream(n)
    scanner = StreamScanner(strip_usage=True)
    out = b"".join(scanner.feed(c) for c in split(body, cuts)) + scanner.flush()
    assert out == body.replace(usage_event, b"")
    assert scanner.usage is not None and scanner.usage.prompt_tokens == 3


def test_unterminated_tail_is_flushed():
    scanner = StreamScanner(strip_usage=True)
    assert (
        scanner.feed(b'data: {"choices":[{"delta":{"content":"a"}}]}\n\ndata: {"choi')
        == b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
    )
    assert scanner.flush() == b'data: {"choi'


def test_usage_on_content_chunks_is_not_hidden():
    chunk = b'data: {"choices":[{"delta":{"content":"a"}}],"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n'
    scanner = StreamScanner(strip_usage=True)
    assert scanner.feed(chunk) == chunk
    assert scanner.usage is not None


def test_responses_api_events():
    scanner = StreamScanner(family="/v1/responses")
    scanner.feed(b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"hi"}\n\n')
    scanner.feed(
        b'event: response.completed\ndata: {"type":"response.completed","response":{"usage":'
        b'{"input_tokens":4,"output_tokens":1,"input_tokens_details":{"cached_tokens":0}}}}\n\n'
    )
    assert scanner.deltas == 1 and scanner.usage == usage_from(
        {"input_tokens": 4, "output_tokens": 1, "input_tokens_details": {"cached_tokens": 0}}
    )


def test_garbage_events_do_not_break_the_scanner():
    scanner = StreamScanner()
    for chunk in (
        b"data: {not json\n\n",
        b": comment\n\n",
        b"data: [1,2]\n\n",
        b"data: \xff\xfe\n\n",
        b'data: {"usage": "x"}\n\n',
        b'data: {"choices": "x"}\n\n',
    ):
        assert scanner.feed(chunk) == chunk
    assert scanner.usage is None and scanner.deltas == 0


def test_count_deltas_kinds():
    def dump(obj: object) -> bytes:
        return b"data: " + orjson.dumps(obj)

    chat, tools = delta_patterns("/v1/chat/completions", False), delta_patterns("/v1/chat/completions", True)
    tool_event = dump(
        {
            "choices": [
                {"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}},
                {"delta": {"content": "x"}},
            ]
        }
    )
    assert count_deltas(tool_event, tools) == 2 and count_deltas(tool_event, chat) == 1
    assert count_deltas(dump({"choices": [{"text": "abc"}]}), delta_patterns("/v1/completions", False)) == 1
    assert count_deltas(dump({"choices": [{"delta": {"reasoning_content": "r"}}]}), chat) == 1
    assert count_deltas(dump({"choices": [{"delta": {"reasoning": "r"}}]}), chat) == 1
    assert count_deltas(dump({"choices": [{"delta": {"content": ""}}]}), chat) == 0
    assert count_deltas(dump({"choices": [{"delta": {"content": '"content":"x'}}]}), chat) == 1  # escaped: one key
    spaced = delta_patterns("/v1/chat/completions", False, spaced=True)
    assert count_deltas(b'data: {"choices": [{"delta": {"content": "x"}}]}', spaced) == 1
    responses = delta_patterns("/v1/responses", False)
    assert count_deltas(b'data: {"type":"response.output_text.delta","delta":"x"}', responses) == 1


def test_spaced_json_stream():
    scanner = StreamScanner()
    scanner.feed(
        b'data: {"choices": [{"delta": {"content": "a"}}]}\n\ndata: {"choices": [{"delta": {"content": "b"}}]}\n\n'
    )
    scanner.feed(b'data: {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 2}}\n\n')
    assert scanner.deltas == 2 and scanner.usage is not None and scanner.usage.prompt_tokens == 2


def test_usage_from_variants():
    assert usage_from({"prompt_tokens": 3, "total_tokens": 3}).completion_tokens == 0  # embeddings
    assert usage_from({"prompt_tokens": -1}) is None
    assert usage_from({"prompt_tokens": True, "completion_tokens": 2}).prompt_tokens is None
    assert usage_from(None) is None


@pytest.mark.parametrize(
    "raw",
    [
        b'data: {"a":1}\n\ndata: {"b":"data: x"}\n\ndata: [DONE]',
        b'data: {"a":1}\r\n\r\ndata: {"b":2}\r\n\r\ndata: [DONE]',
        b': keep-alive\n\ndata: {"a":1}\n\nevent: error\ndata: {"e":1}\n\ndata: [DONE]',
        b'data: {"a":\ndata: 1}\n\ndata: {"b":2}',
        b'data: {"a":1}\n\ndata: not json\n\ndata: {"b":2}',
        b'data: {"a":1}\n\ndata: [1,2]\n\ndata: {"b":2}',
    ],
)
def test_parse_events_fast_path_equals_event_by_event(raw):
    from sidecar.wire.sse import _load_event, parse_events

    sep = b"\r\n\r\n" if b"\r\n" in raw else b"\n\n"
    expected = [obj for obj in (_load_event(e) for e in raw.split(sep)) if obj is not None]
    regions = raw.split(sep)
    half = len(regions) // 2
    assert parse_events([sep.join(regions[:half]), sep.join(regions[half:])], sep) == expected


_ENVELOPE = {"id", "object", "created", "model", "system_fingerprint", "service_tier", "choices"}
_json_scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=12)
_extras = st.dictionaries(
    st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10).filter(lambda k: k not in _ENVELOPE | {"usage"}),
    st.recursive(
        _json_scalars,
        lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
        max_leaves=6,
    ),
    max_size=3,
)


@settings(max_examples=300, deadline=None)
@given(
    contents=st.lists(st.tuples(st.text(max_size=8), _extras), min_size=0, max_size=6),
    usage_extras=_extras,
    done=st.booleans(),
    crlf=st.booleans(),
    cuts=st.lists(st.integers(0, 4000), max_size=8),
)
def test_the_hidden_usage_chunk_loses_only_its_usage_key(contents, usage_extras, done, crlf, cuts):
    """For any stream, the client sees exactly the upstream's events, minus the `usage` key we asked for (and the
    usage chunk itself when nothing but its envelope is left)."""
    sep = b"\r\n\r\n" if crlf else b"\n\n"
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    upstream = [{**base, **extra, "choices": [{"index": 0, "delta": {"content": text}}]} for text, extra in contents]
    usage = {"prompt_tokens": 3, "completion_tokens": len(contents), "total_tokens": 3 + len(contents)}
    upstream.append({**base, **usage_extras, "choices": [], "usage": usage})
    body = b"".join(b"data: " + orjson.dumps(e) + sep for e in upstream) + (b"data: [DONE]" + sep if done else b"")
    scanner = StreamScanner(strip_usage=True)
    out = b"".join(scanner.feed(part) for part in split(body, sorted(set(cuts)))) + scanner.flush()
    seen = [e for e in out.split(sep) if e]
    expected = [orjson.dumps(e) for e in upstream[:-1]]
    rest = {k: v for k, v in upstream[-1].items() if k != "usage"}
    if set(rest) - _ENVELOPE:
        expected.append(orjson.dumps(rest))
    assert [orjson.loads(e[len(b"data: ") :]) for e in seen if e != b"data: [DONE]"] == [
        orjson.loads(e) for e in expected
    ]
    assert seen[: len(upstream) - 1] == [b"data: " + e for e in expected[: len(upstream) - 1]]  # byte for byte
    assert (bool(seen) and seen[-1] == b"data: [DONE]") == done
    assert scanner.usage is not None and scanner.usage.completion_tokens == len(contents)
