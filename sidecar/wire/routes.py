"""Routes: the table of what the sidecar forwards, exact (method, path) pairs, built from a preset and the config.

A preset (`upstream.kind`) allows a server's documented inference API; `upstream.routes` adds entries such as
`"POST /tokenize"` or `"GET,POST /v1/models"`, and `upstream.extra_paths` (older) adds POST paths. Nothing
outside the table reaches the upstream: paths match exactly (no prefix, no case folding, no dot segments or
percent-encoding), anything else is a 404 and a method a path does not take is a 405 with `Allow`. Admin
surfaces (llama-server's `/slots` save/restore and `/lora-adapters`, vLLM's LoRA loading and `/sleep`, every
`/metrics`) are in no preset: an operator who wants one adds it.

Each path has a *family* that says how to read it: whether its body is JSON, whether it streams, where its
output budget is, whether the proxy may ask for a usage chunk, and which usage shape its answer carries.
"""

from __future__ import annotations

from dataclasses import dataclass

# How to read a path. Unknown paths are "other": forwarded as they are, with no body parsing and usage "none".
CHAT, COMPLETIONS, RESPONSES, EMBEDDINGS = "chat", "completions", "responses", "embeddings"
NATIVE, GENERATE, RERANK, TOKENIZE = "native", "generate", "rerank", "tokenize"
POOLING, MESSAGES, MODELS, OTHER = "pooling", "messages", "models", "other"
INVOCATIONS = "invocations"  # vLLM's SageMaker entry point: the body says which family it is (`wire.body`)

FAMILIES: dict[str, str] = {
    "/v1/chat/completions": CHAT,
    "/chat/completions": CHAT,
    "/v1/completions": COMPLETIONS,
    "/v1/responses": RESPONSES,
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
    "/pooling": POOLING,
    "/encode": POOLING,
    "/invocations": INVOCATIONS,
    "/tokenize": TOKENIZE,
    "/detokenize": TOKENIZE,
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
NO_OUTPUT = frozenset({EMBEDDINGS, RERANK, TOKENIZE, POOLING, MODELS})  # nothing generated: reserve no output
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
    # vLLM's OpenAI server (vllm/entrypoints/openai/api_server.py): inference, pooling, scoring, tokenizing.
    "vllm": (
        *_OPENAI,
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
    # llama.cpp's llama-server (tools/server/README.md): its own API and the OpenAI and Anthropic ones.
    "llama.cpp": (
        "POST /v1/chat/completions",
        "POST /chat/completions",
        "POST /v1/completions",
        "POST /completion",
        "POST /completions",
        "POST /infill",
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
        "POST /generate",
        "POST /encode",
        "POST /classify",
        "POST /v1/rerank",
        "POST /v1/score",
        "GET /get_model_info",
        "GET /health",
    ),
    "custom": (),  # only what upstream.routes lists
}
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
RESERVED = ("/healthz", "/readyz", "/metrics", "/admin", "/v1/usage", "/console")  # ours: never forwarded


@dataclass(frozen=True, slots=True)
class Route:
    path: str
    methods: tuple[str, ...]
    family: str

    @property
    def allow(self) -> str:
        return ", ".join(self.methods)


class RouteError(ValueError):
    """A route entry that is not `METHOD[,METHOD] /canonical/path`, or names a path of our own."""


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
    if any(path == own or path.startswith(own + "/") for own in RESERVED):
        raise RouteError(f"{path!r} is one of the sidecar's own paths")


def build(kind: str, routes: tuple[str, ...], extra_paths: tuple[str, ...] = ()) -> dict[str, Route]:
    """The route table: the preset for `kind`, then `routes`, then `extra_paths` (POST), methods merged."""
    if kind not in PRESETS:
        raise RouteError(f"unknown upstream kind {kind!r} (one of {', '.join(PRESETS)})")
    methods: dict[str, list[str]] = {}
    for entry in (*PRESETS[kind], *routes, *(f"POST {p}" for p in extra_paths)):
        entry_methods, path = parse_entry(entry)
        have = methods.setdefault(path, [])
        have.extend(m for m in entry_methods if m not in have)
    return {path: Route(path, tuple(ms), FAMILIES.get(path, OTHER)) for path, ms in methods.items()}
