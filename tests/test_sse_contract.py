"""Exact contracts of the pure SSE and usage readers (sidecar/wire/sse.py, sidecar/wire/usage.py) and the prompt
estimate (sidecar/wire/tokens.py):
each shape of usage a server sends, each way a stream's bytes can fall, the byte scanners that find a whole
answer's usage, and the estimate's arithmetic, all with exact expected values."""

from __future__ import annotations

import orjson
import pytest

from sidecar.wire.routes import GENERATE
from sidecar.wire.sse import (
    StreamScanner,
    _load_event,
    _without_data,
    count_deltas,
    delta_patterns,
    event_data,
    events_array,
    parse_events,
)
from sidecar.wire.tokens import BASE, MAX_DEPTH, PER_MESSAGE, _measure, estimate_prompt
from sidecar.wire.usage import Usage, UsageFinder, usage_from, usage_object, usage_of

CONTENT = b'data: {"choices":[{"delta":{"content":"a"}}]}'
USAGE_ONLY = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}'
TOOL_ARGS = b'data: {"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{"}}]}}]}'


# --- usage_from: the `usage` object of every API -------------------------------------------------------------


def test_usage_from_chat_usage_with_zero_counts():
    assert usage_from({"prompt_tokens": 0, "completion_tokens": 0}) == Usage(0, 0, None)
    assert usage_from({"prompt_tokens": 3, "completion_tokens": 2}) == Usage(3, 2, None)
    assert usage_from({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 9}) == Usage(3, 2, None)


def test_usage_from_responses_api_names():
    assert usage_from({"input_tokens": 4, "output_tokens": 1}) == Usage(4, 1, None)
    assert usage_from({"input_tokens": 4, "output_tokens": 1, "input_tokens_details": {"cached_tokens": 2}}) == Usage(
        4, 1, 2
    )
    assert usage_from({"prompt_tokens": 4, "prompt_tokens_details": {"cached_tokens": 3}}) == Usage(4, None, 3)
    both = {"prompt_tokens": 4, "prompt_tokens_details": None, "input_tokens_details": {"cached_tokens": 1}}
    assert usage_from(both) == Usage(4, None, 1)
    assert usage_from({"prompt_tokens": 4, "prompt_tokens_details": "x"}) == Usage(4, None, None)


def test_usage_from_a_total_alone_is_all_input():
    assert usage_from({"total_tokens": 5}) == Usage(5, 0, None)
    assert usage_from({"total_tokens": 5, "prompt_tokens_details": {"cached_tokens": 1}}) == Usage(5, 0, 1)
    assert usage_from({"total_tokens": 0}) == Usage(0, 0, None)
    assert usage_from({"total_tokens": -1}) is None
    assert usage_from({"total_tokens": "5"}) is None
    assert usage_from({}) is None
    assert usage_from([1]) is None


def test_usage_from_completion_is_total_minus_prompt_only_when_it_can_be():
    assert usage_from({"prompt_tokens": 3, "total_tokens": 7}) == Usage(3, 4, None)
    assert usage_from({"prompt_tokens": 3, "total_tokens": 3}) == Usage(3, 0, None)
    assert usage_from({"prompt_tokens": 5, "total_tokens": 3}) == Usage(5, None, None)  # not a count: unknown
    assert usage_from({"prompt_tokens": 3, "total_tokens": "x"}) == Usage(3, None, None)
    assert usage_from({"prompt_tokens": 3, "total_tokens": None}) == Usage(3, None, None)
    assert usage_from({"prompt_tokens": 3}) == Usage(3, None, None)
    assert usage_from({"completion_tokens": 2}) == Usage(None, 2, None)
    assert usage_from({"completion_tokens": 2, "total_tokens": 9}) == Usage(None, 2, None)


# --- usage_of: every shape an answer or an event carries ----------------------------------------------------


def test_usage_of_llama_server_native_counts():
    assert usage_of(
        {"tokens_evaluated": 5, "tokens_predicted": 7, "tokens_cached": 12, "timings": {"cache_n": 2}}
    ) == Usage(5, 7, 2)
    assert usage_of({"tokens_predicted": 3}) == Usage(None, 3, None)
    assert usage_of({"tokens_evaluated": 5}) == Usage(5, None, None)
    assert usage_of({"tokens_evaluated": 5, "tokens_predicted": 0, "timings": {"cache_n": -1}}) == Usage(5, 0, None)


def test_usage_of_sglang_meta_info():
    assert usage_of({"text": "hi", "meta_info": {"prompt_tokens": 4, "completion_tokens": 2}}) == Usage(4, 2, None)
    # a meta_info without counts is no usage: the other shapes are still read
    assert usage_of({"meta_info": {"id": "x"}, "count": 3}) == Usage(3, 0, None)
    assert usage_of({"meta_info": "x", "count": 3}) == Usage(3, 0, None)


def test_usage_of_top_level_counts_and_tokenizers():
    assert usage_of({"input_tokens": 12}) == Usage(12, None, None)  # Anthropic's count_tokens
    assert usage_of({"count": 3, "max_model_len": 8}) == Usage(3, 0, None)  # vLLM's /tokenize
    assert usage_of({"count": 0}) == Usage(0, 0, None)
    assert usage_of({"tokens": [1, 2, 3]}) == Usage(3, 0, None)  # llama-server's /tokenize
    assert usage_of({"tokens": []}) == Usage(0, 0, None)
    assert usage_of({"count": 3, "tokens": [1, 2]}) == Usage(3, 0, None)  # the count wins
    assert usage_of({"count": -1, "tokens": [1, 2]}) == Usage(2, 0, None)
    assert usage_of({"tokens": "abc"}) is None
    assert usage_of({"id": "x"}) is None
    assert usage_of([1, 2]) is None


def test_usage_of_prefers_the_usage_object_then_the_response():
    obj = {"usage": {"prompt_tokens": 1, "completion_tokens": 2}, "tokens_evaluated": 9, "count": 9}
    assert usage_of(obj) == Usage(1, 2, None)
    response = {"type": "response.completed", "response": {"usage": {"input_tokens": 4, "output_tokens": 5}}}
    assert usage_of(response) == Usage(4, 5, None)
    assert usage_of({"usage": None, "response": {"usage": None}, "tokens_predicted": 1}) == Usage(None, 1, None)


# --- event_data and _load_event -------------------------------------------------------------------------------


def test_event_data_single_and_multi_line():
    assert event_data(b'data: {"a":1}') == b'{"a":1}'
    assert event_data(b"data:x") == b"x"
    assert event_data(b"event: ping") is None
    assert event_data(b": comment") is None
    assert event_data(b"data: a\ndata: b") == b"a\nb"
    assert event_data(b"data:a\ndata:bc") == b"a\nbc"
    assert event_data(b"data: a\ndata:bc\nid: 7") == b"a\nbc"
    assert event_data(b'id: 1\ndata: {"a":1}') == b'{"a":1}'


def test_load_event_reads_crlf_events_and_only_objects():
    assert _load_event(b'event: x\r\ndata: {"a":1}') == {"a": 1}
    assert _load_event(b'data: {"a":\r\ndata: 1}') == {"a": 1}
    assert _load_event(b": comment") is None
    assert _load_event(b"event: x") is None
    assert _load_event(b"data: [DONE]") is None
    assert _load_event(b"data: [1,2]") is None
    assert _load_event(b'data: "s"') is None
    assert _load_event(b"data: {oops") is None


def test_without_data_keeps_the_other_lines_with_the_given_line_end():
    assert _without_data(b"event: a\r\ndata: x\r\n: c", b"\r\n") == b"event: a\r\n: c\r\n"
    assert _without_data(b"event: a\ndata: x\nid: 2", b"\n") == b"event: a\nid: 2\n"
    assert _without_data(b"data: x", b"\n") == b""


# --- delta patterns ---------------------------------------------------------------------------------------------


def test_spaced_patterns_also_space_the_empty_values():
    spaced = delta_patterns("chat", True, spaced=True)
    assert spaced == (
        (b'ntent": "', b'ntent": ""'),
        (b'"reasoning": "', b""),
        (b'"arguments": "', b'"arguments": ""'),
    )
    assert count_deltas(b'data: {"choices": [{"delta": {"content": ""}}]}', spaced) == 0
    assert count_deltas(b'data: {"choices": [{"delta": {"content": "x"}}]}', spaced) == 1
    assert delta_patterns("/unknown", False) == delta_patterns("chat", False)
    assert delta_patterns(GENERATE, True) == ((b'"text":"', b'"text":""'),)


# --- StreamScanner ---------------------------------------------------------------------------------------------


def test_a_new_scanner_has_seen_nothing():
    scanner = StreamScanner()
    assert scanner.done is False and scanner.first_output is False
    assert scanner.usage is None and scanner.deltas == 0 and scanner.kept == 0
    assert scanner.sep == b"\n\n" and scanner.regions == [] and scanner.take_regions() == []
    assert scanner.flush() == b""


def test_first_output_is_the_first_generated_delta():
    scanner = StreamScanner()
    scanner.feed(b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n')
    assert scanner.first_output is False and scanner.deltas == 0
    scanner.feed(CONTENT + b"\n\n")
    assert scanner.first_output is True and scanner.deltas == 1


def test_events_are_not_kept_unless_asked():
    scanner = StreamScanner()
    scanner.feed(CONTENT + b"\n\n")
    assert scanner.regions == [] and scanner.kept == 0 and scanner.take_regions() == []


def test_kept_events_are_counted_and_handed_over():
    scanner = StreamScanner(keep_events=True)
    first = b'data: {"a":1}\n\ndata: {"b":2}'
    scanner.feed(first + b'\n\ndata: {"c"')
    assert scanner.regions == [first] and scanner.kept == len(first)
    scanner.feed(b":3}\n\n")
    assert scanner.regions == [first, b'data: {"c":3}'] and scanner.kept == len(first) + 13
    assert scanner.take_regions() == [first, b'data: {"c":3}']
    assert scanner.regions == [] and scanner.kept == 0
    scanner.feed(b'data: {"d":4}\n\n')
    assert scanner.take_regions() == [b'data: {"d":4}']


def test_tool_arguments_count_by_default_also_spaced():
    scanner = StreamScanner()
    scanner.feed(TOOL_ARGS + b"\n\n")
    assert scanner.deltas == 1
    spaced = StreamScanner()
    spaced.feed(b'data: {"choices": [{"delta": {"tool_calls": [{"function": {"arguments": "{"}}]}}]}\n\n')
    assert spaced.deltas == 1
    without = StreamScanner(tools=False)
    without.feed(TOOL_ARGS + b"\n\n")
    assert without.deltas == 0


def test_llama_server_native_stream_by_path():
    scanner = StreamScanner(family="/completion")
    scanner.feed(b'data: {"content":"He","stop":false}\n\ndata: {"content":"y","stop":false}\n\n')
    scanner.feed(
        b'data: {"content":"","stop":true,"tokens_evaluated":5,"tokens_predicted":2,"timings":{"cache_n":1}}\n\n'
    )
    assert scanner.deltas == 2 and scanner.usage == Usage(5, 2, 1)


def test_sglang_generate_stream_by_family():
    scanner = StreamScanner(family=GENERATE)
    scanner.feed(b'data: {"text":"Hel","meta_info":{"prompt_tokens":3,"completion_tokens":1}}\n\n')
    scanner.feed(b'data: {"text":"Hello","meta_info":{"prompt_tokens":3,"completion_tokens":2}}\n\ndata: [DONE]\n\n')
    assert scanner.deltas == 2 and scanner.usage == Usage(3, 2, None) and scanner.done


def test_an_unknown_path_is_read_as_chat():
    scanner = StreamScanner(family="/nowhere")
    scanner.feed(CONTENT + b"\n\n" + USAGE_ONLY + b"\n\n")
    assert scanner.deltas == 1 and scanner.usage == Usage(1, 1, None)


def test_the_first_line_ending_decides_the_separator():
    scanner = StreamScanner()
    scanner.feed(CONTENT + b"\n\n: x\r\n")  # LF first: a later CR does not make it CRLF
    assert scanner.deltas == 1 and scanner.sep == b"\n\n"
    leading = StreamScanner()
    leading.feed(b"\n" + CONTENT + b"\n\n")  # a leading blank line
    assert leading.deltas == 1 and leading.sep == b"\n\n"
    trailing_cr = StreamScanner()
    trailing_cr.feed(b"\n" + CONTENT + b'\n\ndata: {"x":1}\r')
    assert trailing_cr.deltas == 1 and trailing_cr.sep == b"\n\n"
    crlf = StreamScanner()
    crlf.feed(b"\r\n\r\n" + CONTENT + b"\r\n\r\n")
    assert crlf.deltas == 1 and crlf.sep == b"\r\n\r\n"


def test_an_empty_event_is_passed_on_at_once():
    scanner = StreamScanner(strip_usage=True)
    assert scanner.feed(CONTENT + b"\n\n") == CONTENT + b"\n\n"
    assert scanner.feed(b"\n\n") == b"\n\n"


def test_the_last_usage_of_a_region_is_the_one_read_and_hidden():
    continuous = b'data: {"choices":[{"delta":{"content":"a"}}],"usage":{"prompt_tokens":1,"completion_tokens":1}}'
    final = b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":5}}'
    scanner = StreamScanner(strip_usage=True)
    assert scanner.feed(continuous + b"\n\n" + final + b"\n\n") == continuous + b"\n\n"
    assert scanner.usage == Usage(1, 5, None)


def test_events_after_the_usage_event_pass_on():
    scanner = StreamScanner(strip_usage=True)
    out = scanner.feed(USAGE_ONLY + b'\n\ndata: {"x":1}\n\ndata: [DONE]\n\n')
    assert out == b'data: {"x":1}\n\ndata: [DONE]\n\n'
    assert scanner.usage == Usage(1, 1, None) and scanner.done


def test_an_empty_event_before_the_usage_event_stays():
    scanner = StreamScanner(strip_usage=True)
    assert scanner.feed(CONTENT + b"\n\n") == CONTENT + b"\n\n"
    assert scanner.feed(b"\n\n" + USAGE_ONLY + b"\n\n") == b"\n\n"
    assert scanner.usage == Usage(1, 1, None)


def test_a_line_that_only_names_the_key_does_not_hide_the_events_data():
    scanner = StreamScanner()
    scanner.feed(b'"usage"\ndata: {"count":3}\n\n')  # a field named `"usage"`: ignored by SSE
    assert scanner.usage == Usage(3, 0, None)


def test_a_usage_chunk_with_the_whole_envelope_goes():
    envelope = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "system_fingerprint": "f",
        "service_tier": "default",
        "choices": [],
        "usage": {"prompt_tokens": 2, "completion_tokens": 3},
    }
    scanner = StreamScanner(strip_usage=True)
    assert scanner.feed(CONTENT + b"\n\ndata: " + orjson.dumps(envelope) + b"\n\ndata: [DONE]\n\n") == (
        CONTENT + b"\n\ndata: [DONE]\n\n"
    )
    assert scanner.usage == Usage(2, 3, None)


@pytest.mark.parametrize("sep", [b"\n\n", b"\r\n\r\n"])
def test_a_usage_chunk_with_other_fields_loses_only_its_usage(sep):
    eol = sep[: len(sep) // 2]
    data = b'data: {"choices":[],"timings":{"n":1},"usage":{"prompt_tokens":2,"completion_tokens":3}}'
    event = b"event: x" + eol + data
    scanner = StreamScanner(strip_usage=True)
    assert scanner.feed(CONTENT + sep + event + sep) == (
        CONTENT + sep + b"event: x" + eol + b'data: {"choices":[],"timings":{"n":1}}' + sep
    )
    assert scanner.usage == Usage(2, 3, None)


def test_flush_of_an_unterminated_usage_event():
    scanner = StreamScanner(strip_usage=True)
    assert scanner.feed(CONTENT + b"\n\n" + USAGE_ONLY) == CONTENT + b"\n\n"
    assert scanner.flush() == b""
    assert scanner.usage == Usage(1, 1, None)
    assert scanner.flush() == b""  # nothing is left after a flush


@pytest.mark.parametrize("sep", [b"\n\n", b"\r\n\r\n"])
def test_flush_of_an_unterminated_usage_event_with_other_fields(sep):
    scanner = StreamScanner(strip_usage=True)
    scanner.feed(CONTENT + sep)
    scanner.feed(b'data: {"choices":[],"timings":{"n":1},"usage":{"prompt_tokens":2,"completion_tokens":3}}')
    assert scanner.flush() == b'data: {"choices":[],"timings":{"n":1}}'
    assert scanner.usage == Usage(2, 3, None)


def test_flush_when_passing_through():
    scanner = StreamScanner()
    scanner.feed(CONTENT + b"\n\n" + USAGE_ONLY)
    assert scanner.flush() == b""  # its bytes went on when they came
    assert scanner.usage == Usage(1, 1, None)
    assert scanner.flush() == b""


def test_flush_twice_when_stripping():
    scanner = StreamScanner(strip_usage=True)
    scanner.feed(b'data: {"a":1}\n\ndata: {"b"')
    assert scanner.flush() == b'data: {"b"'
    assert scanner.flush() == b""


def test_a_stream_without_any_line_ending_passes_through():
    scanner = StreamScanner()
    assert scanner.feed(USAGE_ONLY) == USAGE_ONLY
    assert scanner.flush() == b""


# --- events_array ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("regions", "sep", "expected"),
    [
        ([b'data: {"a":1}', b'data: {"b":2}\n\ndata: [DONE]'], b"\n\n", b'[{"a":1},{"b":2}]'),
        ([b'data: {"a":1}\n\ndata: {"b":2}'], b"\n\n", b'[{"a":1},{"b":2}]'),
        ([b'data: {"a":1}\r\n\r\ndata: [DONE]'], b"\r\n\r\n", b'[{"a":1}]'),
        ([b'data: {"a":1} \n\ndata: [DONE]'], b"\n\n", b'[{"a":1} ]'),
        ([b"data: [DONE]"], b"\n\n", b"[]"),
        ([b": hi\n\ndata: {}"], b"\n\n", None),
        ([b'event: x\ndata: {"a":1}'], b"\n\n", None),
        ([], b"\n\n", None),
    ],
)
def test_events_array(regions, sep, expected):
    assert events_array(regions, sep) == expected
    if expected is not None:
        assert orjson.loads(expected) == parse_events(regions, sep)


def test_events_array_of_other_text_is_not_json():
    for regions in ([b"data: X\n\ndata: [DONE]"], [b'data: {"a":1}\n\n: c\n\ndata: [DONE]']):
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(events_array(regions, b"\n\n"))


# --- UsageFinder ----------------------------------------------------------------------------------------------


KEY = b'"usage"'


def test_usage_finder_without_the_key_finds_nothing():
    finder = UsageFinder()
    assert finder.region == b""
    finder.add(b'{"object":"list","data":[1,2]')
    finder.add(b"]}")
    assert finder.region == b""


def test_usage_finder_in_one_chunk():
    finder = UsageFinder()
    finder.add(b'{"data":[],"usage":{"prompt_tokens":3}}')
    assert finder.region == b'"usage":{"prompt_tokens":3}}'
    at_start = UsageFinder()
    at_start.add(b'"usage":{"a":1}}')
    assert at_start.region == b'"usage":{"a":1}}'
    two = UsageFinder()
    two.add(b'{"usage":{"a":1},"x":{"usage":{"b":2}}}')
    assert two.region == b'"usage":{"b":2}}}'


@pytest.mark.parametrize("k", range(1, len(KEY)))
def test_usage_finder_key_split_across_chunks(k):
    finder = UsageFinder()
    finder.add(b'{"data":[1],' + KEY[:k])
    finder.add(KEY[k:] + b':{"a":1}}')
    assert finder.region == b'"usage":{"a":1}}'


def test_usage_finder_byte_by_byte():
    body = b'{"id":"x","usage":{"prompt_tokens":3,"total_tokens":3},"prompt_logprobs":null}'
    finder = UsageFinder()
    for i in range(len(body)):
        finder.add(body[i : i + 1])
    assert finder.region == body[body.find(KEY) :]


def test_usage_finder_keeps_span_bytes():
    span = UsageFinder.SPAN
    assert span == 8192
    finder = UsageFinder()
    finder.add(b'{"usage":' + b" " * 9000)
    assert finder.region == b'"usage":' + b" " * (span - 8)
    finder.add(b"more")
    assert len(finder.region) == span
    filling = UsageFinder()
    filling.add(b'{"usage":')
    filling.add(b"x" * 8000)
    filling.add(b"y" * 500)
    assert filling.region == b'"usage":' + b"x" * 8000 + b"y" * (span - 8008)
    filling.add(b"z")
    assert len(filling.region) == span
    filling.add(b',"usage":{"n":1}')  # a later key starts a new region
    assert filling.region == b'"usage":{"n":1}'


# --- usage_object ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"data":[{"embedding":[0.1]}],"usage":{"prompt_tokens":3,"total_tokens":3}}',
            {"prompt_tokens": 3, "total_tokens": 3},
        ),
        (b'"usage":{"a":1}}', {"a": 1}),  # a UsageFinder region
        (b'{"usage" \t:\r\n {"a": 1}}', {"a": 1}),
        (b'{"usage"  :  {"a":1}}', {"a": 1}),
        (b'{"usage" :{"a":1}}', {"a": 1}),
        (b'{"usage": {"a":1}}', {"a": 1}),
        (
            b'{"usage":{"prompt_tokens":3,"prompt_tokens_details":{"cached_tokens":1}},"x":1}',
            {"prompt_tokens": 3, "prompt_tokens_details": {"cached_tokens": 1}},
        ),
        (b'{"x":{"usage":{"b":2}},"usage":{"a":1}}', {"a": 1}),  # the last key
        (b'{"usage":{"a":1},"l":["usage",{"y":2}]}', {"a": 1}),  # a string, not a key
        (b'{"usage":{"a":1},"x":{"usage":7}}', {"a": 1}),
        (b'{"usage":{"a":1},"note":"usage"}', {"a": 1}),
        (b'{"usage":{"s":"}}}}}}}","n":1}}', {"s": "}}}}}}}", "n": 1}),  # closed by the 8th brace
        (b'{"usage":{"s":"}}}}}}}}","n":1}}', None),  # the 9th: not looked for
        (b'{"usage":null}', None),
        (b'{"a":1}', None),
        (b"", None),
        (b'{"a":"usage"', None),
        (b'{"usage":', None),
        (b'{"usage": ', None),
        (b'{"usage":{"a":1', None),
        (b'{"usage"X:{"a":1}}', None),
        (b'{"usage":X{"a":1}}', None),
    ],
)
def test_usage_object(body, expected):
    assert usage_object(body) == expected


# --- tokens: _measure and estimate_prompt ---------------------------------------------------------------------


def nest(levels: int, kind: type) -> object:
    value: object = "abc"
    for _ in range(levels):
        value = [value] if kind is list else {"k": value}
    return value


def measure(value: object, keys: bool) -> tuple[int, int]:
    counted = _measure(value, keys=keys)
    return counted.chars, counted.ids


@pytest.mark.parametrize("kind", [list, dict])
def test_measure_stops_below_the_maximum_depth(kind):
    assert MAX_DEPTH == 64
    assert measure(nest(65, kind), keys=False) == (3, 0)  # the innermost container at depth 64: counted
    assert measure(nest(66, kind), keys=False) == (0, 0)  # at depth 65: not


def test_measure_keys_at_every_depth_it_reaches():
    assert measure(nest(65, dict), keys=True) == (3 + 65, 0)
    assert measure(nest(66, dict), keys=True) == (65, 0)


def test_measure_strings_ids_and_keys():
    assert measure([1, 2, [3, True], "ab", None, 1.5], keys=False) == (2, 3)
    assert measure([{"abcd": "x"}], keys=True) == (5, 0)
    assert measure([{"abcd": "x"}], keys=False) == (1, 0)
    assert measure({"k": "hello"}, keys=False) == (5, 0)
    assert measure({"a": "xx", "b": "yyy"}, keys=False) == (5, 0)
    assert measure({"ab": "xyz"}, keys=True) == (5, 0)
    assert measure({"a": {"bc": "x"}}, keys=True) == (4, 0)
    assert measure({"a": {"bc": "x"}}, keys=False) == (1, 0)
    assert measure({"ab": [1, 2], "cd": {"e": [3]}}, keys=True) == (5, 3)
    assert measure({"ab": [1, 2], "cd": {"e": [3]}}, keys=False) == (0, 3)
    assert measure("é", keys=False) == (2, 0)


def test_estimate_without_a_body():
    assert estimate_prompt(None) == 0  # a body not read: its reservation is `Limits.reserve`'s minimum
    assert estimate_prompt({}) == BASE
    assert estimate_prompt({"model": "a-very-long-model-name", "user": "someone", "stop": ["x" * 90]}) == BASE


def test_estimate_of_a_chat_with_tools_and_functions():
    doc = {
        "messages": [{"role": "user", "content": "abcdef"}, {"role": "user", "content": [1, 2]}],
        "tools": [{"name": "fn"}],
        "functions": [{"x": "yz"}, 5],
    }
    # text: user + abcdef + user = 14 characters, 2 ids; tools, keys included: name fn x yz = 9, 1 id
    assert estimate_prompt(doc) == -(-(14 + 9) // 3) + 2 + 1 + PER_MESSAGE * 2 + BASE == 27
    assert estimate_prompt({"messages": [{"role": "user", "content": "abcdef"}]}) == 4 + PER_MESSAGE + BASE


def test_estimate_of_a_prompt_or_an_input():
    assert estimate_prompt({"prompt": "abcdefg"}) == 3 + BASE
    assert estimate_prompt({"input": "abcdef"}) == 2 + BASE
    assert estimate_prompt({"prompt": "abc", "input": "abcdefghi"}) == 4 + BASE  # both reach the upstream
    responses_input = {"input": [{"type": "input_text", "text": "hello"}]}  # values only: input_text hello
    assert estimate_prompt(responses_input) == 5 + BASE
