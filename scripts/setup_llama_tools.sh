#!/usr/bin/env bash
# llama.cpp's own command-line tools for the GGUF benchmarks: llama-imatrix (its importance matrix
# from calibration text) and llama-quantize (its quantizer, with --imatrix). Built from the
# llama.cpp source vendored in the llama-cpp-python sdist that scripts/setup.sh installs, so the
# tools and the engine that scores the files are the same llama.cpp. Used by benchmarks/ only.
# Needs cmake and a C++ compiler; about 10 minutes on 2 cores, once. Binaries: .cache/llama.cpp/bin/.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('llama_cpp_python'))")
DEST=.cache/llama.cpp
[ -x "$DEST/bin/llama-imatrix" ] && [ -x "$DEST/bin/llama-quantize" ] && exit 0
mkdir -p "$DEST"
if [ ! -d "$DEST/src-$VERSION" ]; then
    .venv/bin/pip download -q "llama-cpp-python==$VERSION" --no-binary :all: --no-deps -d "$DEST" 2>&1 | grep -v "is ignored" || true
    tar xzf "$DEST/llama_cpp_python-$VERSION.tar.gz" -C "$DEST"
    mv "$DEST/llama_cpp_python-$VERSION/vendor/llama.cpp" "$DEST/src-$VERSION"
    rm -rf "$DEST/llama_cpp_python-$VERSION" "$DEST/llama_cpp_python-$VERSION.tar.gz"
fi
cmake -S "$DEST/src-$VERSION" -B "$DEST/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_TOOLS=ON > "$DEST/cmake.log"
cmake --build "$DEST/build" --target llama-imatrix llama-quantize -j "$(nproc)"
mkdir -p "$DEST/bin"
cp "$DEST/build/bin/llama-imatrix" "$DEST/build/bin/llama-quantize" "$DEST/bin/"
"$DEST/bin/llama-quantize" --help 2>&1 | head -1 || true
