"""Routes: the table of what the sidecar forwards, (method, path) pairs built from a preset and the config.

A preset (`upstream.kind`) allows a server's inference API as its route registrations list it today (see
`PRESETS`); `upstream.routes` adds entries such as `"POST /tokenize"`, `"GET,POST /v1/models"` or
`"GET /v1/responses/{id}"`, and `upstream.extra_paths` (older) adds POST paths. Nothing outside the table reaches
the upstream. A path matches exactly (no prefix, no case folding, no dot segments or percent-encoding); a path
template's `{name}` segment stands for exactly one segment of the characters an exact path may hold (not empty,
not `.` or `..`), its other segments match exactly, and an exact path wins over a template. Anything else is a
404, and a method a path does not take is a 405 with `Allow`.

Admin, operations and proxy surfaces are in no preset: llama-server's `/slots`, `/lora-adapters`, `POST /props`,
`/cors-proxy`, `/tools`, its router's `/models/load`, its resumable `/v1/stream/{conv_id}` (a conversation id the
client chooses: any key could read or stop another's stream) and `/v1/chat/completions/control` (acts on another
request by id); vLLM's LoRA loading, `/sleep`, `/wake_up`, `/pause`, `/reset_prefix_cache`, profiling, weight
updates and scaling; SGLang's `/flush_cache`, `/update_weights_*`, `/abort_request`, `/get_server_info`,
sessions and profiling; every `/metrics`. An operator who wants one adds it to `upstream.routes`.

Each route has a *family* that says how to read it: whether its body is JSON, whether it streams, where its
output budget is, whether the proxy may ask for a usage chunk, and which usage shape its answer carries.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

# How to read a path. Unknown paths are "other": forwarded as they are, with no body parsing and usage "none".
CHAT, COMPLETIONS, RESPONSES, EMBEDDINGS = "chat", "completions", "responses", "embeddings"
NATIVE, GENERATE, RERANK, TOKENIZE = "native", "generate", "rerank", "tokenize"
POOLING, MESSAGES, MODELS, OTHER = "pooling", "messages", "models", "other"
INVOCATIONS = "invocations"  # vLLM's SageMaker entry point: the body says which family it is (`wire.body`)
# A stored answer read back or cancelled (vLLM's and SGLang's `GET /v1/responses/{id}`, `.../cancel`): forwarded as
# is, nothing reserved, and the usage it shows is not charged again: it was charged when the answer was made.
STORED = "stored"

FAMILIES: dict[str, str] = {
    "/v1/chat/completions": CHAT,
    "/chat/completions": CHAT,
    "/v1/completions": COMPLETIONS,
    "/v1/responses": RESPONSES,
    "/responses": RESPONSES,
    "/v1/responses/{id}": STORED,
    "/v1/responses/{id}/cancel": STORED,
    "/v1/embeddings": EMBEDDINGS,
    "/embeddings": EMBEDDINGS,
    "/embedding": EMBEDDINGS,
    "/completion": NATIVE,  # llama-server's own shape: `content`, `tokens_evaluated`, `tokens_predicted`
    "/completions": NATIVE,
    "/infill": NATIVE,
    "/generate": GENERATE,  # SGLang's own: `text`, `meta_info.prompt_tokens/completion_tokens`
    "/v1/rerank": RERANK,
    "/v2/rerank": RERANK,
    "/rerank": RERANK,
    "/reranking": RERANK,
    "/v1/reranking": RERANK,
    "/score": RERANK,
    "/v1/score": RERANK,
    "/classify": POOLING,
    "/v1/classify": POOLING,
    "/pooling": POOLING,
    "/encode": POOLING,
    "/invocations": INVOCATIONS,
    "/tokenize": TOKENIZE,
    "/detokenize": TOKENIZE,
    "/v1/tokenize": TOKENIZE,
    "/v1/detokenize": TOKENIZE,
    # Token counts and rendered prompts: tokenizer calls, nothing generated.
    "/v1/chat/completions/input_tokens": TOKENIZE,
    "/chat/completions/input_tokens": TOKENIZE,
    "/v1/responses/input_tokens": TOKENIZE,
    "/responses/input_tokens": TOKENIZE,
    "/v1/chat/completions/render": TOKENIZE,
    "/v1/completions/render": TOKENIZE,
    "/apply-template": TOKENIZE,
    "/v1/messages": MESSAGES,
    "/v1/messages/count_tokens": TOKENIZE,
    "/v1/models": MODELS,
    "/models": MODELS,
}
JSON_FAMILIES = frozenset(
    {CHAT, COMPLETIONS, RESPONSES, EMBEDDINGS, NATIVE, GENERATE, RERANK, TOKENIZE, POOLING, MESSAGES, INVOCATIONS}
)
STREAMING = frozenset({CHAT, COMPLETIONS, RESPONSES, NATIVE, GENERATE, MESSAGES})
USAGE_OPTION = frozenset({CHAT, COMPLETIONS})  # OpenAI's `stream_options.include_usage`
# The bodies vLLM reads `priority` and `cache_salt` from (its chat, completion and responses requests; an
# `/invocations` body is read as chat or completions). Its Messages endpoint builds its own chat request and
# carries neither over, so they are not written there.
ENGINE_FIELDS = frozenset({CHAT, COMPLETIONS, RESPONSES})
NO_OUTPUT = frozenset({EMBEDDINGS, RERANK, TOKENIZE, POOLING, MODELS, STORED})  # nothing generated: reserve none
UNCHARGED = frozenset({STORED})  # answers whose usage was charged when they were made: never charged again
# Where each family names its output budget, in order of preference.
BUDGET_FIELDS: dict[str, tuple[str, ...]] = {
    CHAT: ("max_completion_tokens", "max_tokens"),
    COMPLETIONS: ("max_tokens",),
    RESPONSES: ("max_output_tokens",),
    NATIVE: ("n_predict", "max_tokens"),
    MESSAGES: ("max_tokens",),
    GENERATE: ("max_new_tokens",),  # inside `sampling_params`
}
# Where `limits.enforce_max_tokens` writes the cap of a request that names none (chat: `max_tokens`, which
# every server reads, vLLM when `max_completion_tokens` is unset or 0).
CAP_FIELD: dict[str, str] = {
    family: fields[-1] if family == CHAT else fields[0] for family, fields in BUDGET_FIELDS.items()
}

_OPENAI = (
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "POST /v1/embeddings",
    "POST /v1/responses",
    "GET /v1/models",
)
PRESETS: dict[str, tuple[str, ...]] = {
    # OpenAI's API as vLLM, llama-server and SGLang all serve it.
    "openai": _OPENAI,
    # vLLM's OpenAI server (vllm/entrypoints/openai/api_server.py and the routers it includes: responses,
    # anthropic, render, speech_to_text, pooling, tokenize, sagemaker).
    "vllm": (
        *_OPENAI,
        "GET /v1/responses/{id}",
        "POST /v1/responses/{id}/cancel",
        "POST /v1/messages",
        "POST /v1/messages/count_tokens",
        "POST /v1/chat/completions/render",
        "POST /v1/completions/render",
        "POST /v1/audio/transcriptions",
        "POST /v1/audio/translations",
        "POST /tokenize",
        "POST /detokenize",
        "POST /pooling",
        "POST /classify",
        "POST /score",
        "POST /v1/score",
        "POST /rerank",
        "POST /v1/rerank",
        "POST /v2/rerank",
        "POST /invocations",
        "GET /version",
        "GET /health",
    ),
    # llama.cpp's llama-server (tools/server/server.cpp): its own API and the OpenAI and Anthropic ones.
    "llama.cpp": (
        "POST /v1/chat/completions",
        "POST /chat/completions",
        "POST /v1/completions",
        "POST /completion",
        "POST /completions",
        "POST /infill",
        "POST /v1/responses",
        "POST /responses",
        "POST /v1/audio/transcriptions",
        "POST /audio/transcriptions",
        "POST /v1/embeddings",
        "POST /embeddings",
        "POST /embedding",
        "POST /v1/rerank",
        "POST /rerank",
        "POST /v1/reranking",
        "POST /reranking",
        "POST /tokenize",
        "POST /detokenize",
        "POST /apply-template",
        "POST /v1/chat/completions/input_tokens",
        "POST /chat/completions/input_tokens",
        "POST /v1/responses/input_tokens",
        "POST /responses/input_tokens",
        "POST /v1/messages",
        "POST /v1/messages/count_tokens",
        "GET /v1/models",
        "GET /models",
        "GET /props",
        "GET /health",
        "GET /v1/health",
    ),
    # SGLang (python/sglang/srt/entrypoints/http_server.py): OpenAI's API and its native generate/encode.
    "sglang": (
        *_OPENAI,
        "GET /v1/responses/{id}",
        "POST /v1/responses/{id}/cancel",
        "POST /generate",
        "POST /encode",
        "POST /classify",
        "POST /v1/classify",
        "POST /v1/rerank",
        "POST /v1/score",
        "POST /tokenize",
        "POST /detokenize",
        "POST /v1/tokenize",
        "POST /v1/detokenize",
        "POST /invocations",
        "GET /get_model_info",
        "GET /health",
    ),
    "custom": (),  # only what upstream.routes lists
}
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
ANTHROPIC = "/v1/messages"  # Anthropic's Messages API and the paths under it: its clients read its error shape


def speaks_anthropic(path: str) -> bool:
    """Whether a client asking for `path` expects Anthropic's error shape (`sidecar.errors.anthropic_body`)."""
    return path == ANTHROPIC or path.startswith(ANTHROPIC + "/")


RESERVED = ("/healthz", "/readyz", "/metrics", "/admin", "/v1/usage", "/console")  # ours: never forwarded


@dataclass(frozen=True, slots=True)
class Route:
    path: str  # as configured: an exact path or a template (`/v1/responses/{id}`)
    methods: tuple[str, ...]
    family: str

    @property
    def allow(self) -> str:
        return ", ".join(self.methods)


class RouteError(ValueError):
    """A route entry that is not `METHOD[,METHOD] /canonical/path`, or names a path of our own."""


# A template's segment: `{name}`; None stands for it in a template's shape.
Shape = tuple[str | None, ...]


def parse_entry(entry: str) -> tuple[tuple[str, ...], str]:
    """`"GET,POST /v1/models"` -> (("GET", "POST"), "/v1/models"); `RouteError` for anything else."""
    methods_text, _, path = entry.strip().partition(" ")
    methods = tuple(m.strip().upper() for m in methods_text.split(",") if m.strip())
    path = path.strip()
    if not methods or not path:
        raise RouteError(f"{entry!r} is not 'METHOD /path' (e.g. 'POST /tokenize', 'GET,POST /v1/models')")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise RouteError(f"{entry!r}: unknown method {unknown[0]!r} (one of {', '.join(sorted(METHODS))})")
    check_path(path)
    return methods, path


def check_path(path: str) -> None:
    if not path.startswith("/") or path == "/":
        raise RouteError(f"{path!r} must be an absolute path")
    if any(part in ("", ".", "..") for part in path[1:].split("/")):
        raise RouteError(f"{path!r} is not canonical (empty, '.' or '..' segments)")
    if any(not (0x21 <= ord(c) <= 0x7E) or c in "%?#;\\" for c in path):
        raise RouteError(f"{path!r} must be plain ASCII without %, ?, #, ; or \\")
    shape = shape_of(path)
    if shape[0] is None:
        raise RouteError(f"{path!r}: the first segment must be literal, not a template")
    for own in RESERVED:
        if _covers(shape, tuple(own[1:].split("/"))):
            raise RouteError(f"{path!r} is, or could match, one of the sidecar's own paths ({own})")


def shape_of(path: str) -> Shape:
    """A path's segments, None for each `{name}` one; `RouteError` for a brace anywhere else (`{}`, `{a`,
    `x{id}`): a template segment is a whole segment and names its value."""
    shape: list[str | None] = []
    for part in path[1:].split("/"):
        if part.startswith("{") and part.endswith("}") and part[1:-1].isidentifier() and part[1:-1].isascii():
            shape.append(None)
        elif "{" in part or "}" in part:
            raise RouteError(f"{path!r}: a template segment is a whole segment '{{name}}', e.g. '/v1/responses/{{id}}'")
        else:
            shape.append(part)
    return tuple(shape)


def _covers(shape: Shape, own: tuple[str, ...]) -> bool:
    """Whether a route of `shape` could match one of our own paths or a path under it."""
    if len(shape) < len(own):
        return False
    return all(seg is None or seg == want for seg, want in zip(shape, own, strict=False))


def segment_ok(segment: str) -> bool:
    """What a template's `{name}` takes: one segment an exact path could hold (`check_path`'s characters)."""
    if segment in ("", ".", ".."):
        return False
    return all(0x21 <= ord(c) <= 0x7E and c not in "%?#;\\{}" for c in segment)


def _fits(seg: str | None, part: str) -> bool:
    return part == seg if seg is not None else segment_ok(part)


class Table(Mapping[str, Route]):
    """The routes by their configured path or template. `match` finds the route of a request's path: one dict
    lookup for an exact path; templates are tried only for paths of their segment count, the most literal first."""

    __slots__ = ("_routes", "exact", "_templates")

    def __init__(self, routes: list[Route]) -> None:
        self._routes = {r.path: r for r in routes}
        self.exact = {r.path: r for r in routes if "{" not in r.path}
        by_count: dict[int, list[tuple[Shape, Route]]] = {}
        for route in routes:
            if "{" in route.path:
                shape = shape_of(route.path)
                by_count.setdefault(len(shape), []).append((shape, route))
        # The leftmost literal segment wins between two templates that match the same path.
        self._templates = {
            n: tuple(sorted(ts, key=lambda t: tuple(seg is None for seg in t[0]))) for n, ts in by_count.items()
        }

    def match(self, path: str) -> Route | None:
        route = self.exact.get(path)
        if route is not None or not self._templates:
            return route
        candidates = self._templates.get(path.count("/"))
        if candidates is None or not path.startswith("/"):
            return None
        parts = path[1:].split("/")
        for shape, template in candidates:
            if all(_fits(seg, part) for seg, part in zip(shape, parts, strict=True)):
                return template
        return None

    def __getitem__(self, path: str) -> Route:
        return self._routes[path]

    def __iter__(self) -> Iterator[str]:
        return iter(self._routes)

    def __len__(self) -> int:
        return len(self._routes)


def family_of(path: str) -> str:
    """A configured path's or template's family (`{id}` and `{response_id}` are the same template)."""
    family = FAMILIES.get(path)
    if family is None and "{" in path:
        family = _TEMPLATE_FAMILIES.get(shape_of(path))
    return family or OTHER


_TEMPLATE_FAMILIES: dict[Shape, str] = {shape_of(p): f for p, f in FAMILIES.items() if "{" in p}


def build(kind: str, routes: tuple[str, ...], extra_paths: tuple[str, ...] = ()) -> Table:
    """The route table: the preset for `kind`, then `routes`, then `extra_paths` (POST), methods merged (a
    template's methods merge with those of the same template under another name)."""
    if kind not in PRESETS:
        raise RouteError(f"unknown upstream kind {kind!r} (one of {', '.join(PRESETS)})")
    methods: dict[str | Shape, tuple[str, list[str]]] = {}
    for entry in (*PRESETS[kind], *routes, *(f"POST {p}" for p in extra_paths)):
        entry_methods, path = parse_entry(entry)
        key: str | Shape = shape_of(path) if "{" in path else path
        _, have = methods.setdefault(key, (path, []))
        have.extend(m for m in entry_methods if m not in have)
    return Table([Route(path, tuple(ms), family_of(path)) for path, ms in methods.values()])
