#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (the engine `kedit publish --llama-server` talks to) from
# the llama.cpp sources vendored in the llama-cpp-python source package, which the package
# registry serves (no prebuilt CPU wheel there). Needs a C++ compiler and cmake; about 10
# minutes on 2 cores. Optional: kedit itself never needs it.
#
#   bash scripts/build_llama_server.sh [DEST]     # default DEST: ~/.cache/kedit/llama.cpp
#   export KEDIT_LLAMA_SERVER=DEST/build/bin/llama-server
set -euo pipefail
VERSION=0.3.36  # llama-cpp-python; its vendor/llama.cpp is what was built and tested here
DEST=${1:-${KEDIT_HOME:-$HOME/.cache/kedit}/llama.cpp}
PY=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
mkdir -p "$DEST"
if [ ! -f "$DEST/CMakeLists.txt" ]; then
  tmp=$(mktemp -d)
  "$PY" -m pip download --quiet --no-deps --no-binary=:all: "llama-cpp-python==$VERSION" -d "$tmp"
  tar xzf "$tmp"/llama_cpp_python-$VERSION.tar.gz -C "$tmp"
  cp -a "$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp/." "$DEST/"
  rm -rf "$tmp"
fi
cd "$DEST"
cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON > build.log
cmake --build build --target llama-server -j"$(nproc)" >> build.log
echo "built $DEST/build/bin/llama-server"
echo "export KEDIT_LLAMA_SERVER=$DEST/build/bin/llama-server"
