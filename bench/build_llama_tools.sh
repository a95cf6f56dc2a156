#!/bin/sh
# Build llama.cpp's `llama-export-lora` and `llama-quantize`, the peers bench/gguf_base.py runs,
# from the llama.cpp vendored in the llama-cpp-python 0.3.36 sdist (the version the tests use;
# llama-cpp-python's wheel builds only the library). Needs cmake, ninja and a C++ compiler.
#
#   sh bench/build_llama_tools.sh [WORKDIR]      (default /tmp/llamatools)
#
# The binaries land in WORKDIR/build/bin; pass that folder to bench/gguf_base.py --llama-bin.
set -eu
VERSION=0.3.36
WORK=${1:-/tmp/llamatools}
PIP=${PIP:-pip}
mkdir -p "$WORK"
cd "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION"
if [ ! -d "$SRC/vendor/llama.cpp" ]; then
    "$PIP" download --no-binary :all: --no-deps --dest "$WORK" "llama-cpp-python==$VERSION"
    tar -xzf "$WORK/llama_cpp_python-$VERSION.tar.gz" -C "$WORK"
fi
cmake -S "$SRC/vendor/llama.cpp" -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF
cmake --build "$WORK/build" --target llama-export-lora llama-quantize -j"${JOBS:-2}"
echo "built: $WORK/build/bin/llama-export-lora $WORK/build/bin/llama-quantize"
