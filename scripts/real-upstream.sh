#!/usr/bin/env bash
# Build a real OpenAI-compatible model server for the `real_upstream` tests: llama.cpp's llama-server, from the
# llama.cpp sources vendored in the llama-cpp-python sdist on PyPI (no other download), plus a tiny deterministic
# random-weight GGUF model written with the `gguf` package (no model download).
#
#   bash scripts/real-upstream.sh build      # ~15 min on 2 cores; idempotent, skips what is already cached
#   bash scripts/real-upstream.sh path       # prints the cache dir when the server and model are ready, else fails
#
# Everything lands in $SIDECAR_REAL_UPSTREAM_CACHE (default ~/.cache/sidecar/real-upstream), outside the repo.
# The tests find it there (or through the same variable) and skip when it is missing.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
LLAMA_CPP_PYTHON_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
CACHE=${SIDECAR_REAL_UPSTREAM_CACHE:-$HOME/.cache/sidecar/real-upstream}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
SERVER=$CACHE/bin/llama-server
MODEL=$CACHE/model.gguf

ready() { [[ -x $SERVER && -s $MODEL ]]; }

build_server() {
    [[ -x $SERVER ]] && return 0
    local work=$CACHE/work sdist
    mkdir -p "$work" "$CACHE/bin"
    sdist=$work/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz
    if [[ ! -s $sdist ]]; then
        "$PY" -m pip download --quiet --no-deps --no-binary :all: --dest "$work" \
            "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
    fi
    echo "$LLAMA_CPP_PYTHON_SHA256  $sdist" | sha256sum --check --quiet
    rm -rf "$work/src" && mkdir -p "$work/src"
    tar xzf "$sdist" -C "$work/src" --strip-components=1
    if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then  # not on this machine: from PyPI
        "$PY" -m pip install --quiet cmake ninja
        PATH="$(dirname "$PY"):$PATH"
    fi
    cmake -S "$work/src/vendor/llama.cpp" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF
    cmake --build "$work/build" --target llama-server -j "$(nproc)"
    install -m 0755 "$work/build/bin/llama-server" "$SERVER"
    rm -rf "$work/src" "$work/build"
}

build_model() {
    [[ -s $MODEL ]] && return 0
    "$PY" -m pip install --quiet "gguf==0.19.0" "numpy<3"
    "$PY" "$ROOT/tests/support/real_model.py" "$MODEL.tmp" && mv "$MODEL.tmp" "$MODEL"
}

case ${1:-build} in
    build)
        build_server
        build_model
        ready && echo "$CACHE"
        ;;
    path)
        ready && echo "$CACHE"
        ;;
    *)
        echo "usage: $0 build|path" >&2
        exit 2
        ;;
esac
