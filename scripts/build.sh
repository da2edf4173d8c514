#!/usr/bin/env bash
# Configures and builds kvrecall into ${BUILD_DIR:-build}. Extra arguments are ninja targets.
#   KVRECALL_CUDA=AUTO|ON|OFF (default AUTO), CMAKE_BUILD_TYPE (default RelWithDebInfo),
#   CMAKE_ARGS (extra cmake arguments, e.g. -DKVRECALL_SANITIZE=ON)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
cmake -S . -B "$BUILD_DIR" -G Ninja \
  -DKVRECALL_CUDA="${KVRECALL_CUDA:-AUTO}" \
  -DCMAKE_BUILD_TYPE="${CMAKE_BUILD_TYPE:-RelWithDebInfo}" ${CMAKE_ARGS:-} >"$BUILD_DIR.configure.log" 2>&1 \
  || { cat "$BUILD_DIR.configure.log"; exit 1; }
grep -E "kvrecall:" "$BUILD_DIR.configure.log" || true
ninja -C "$BUILD_DIR" -j "${JOBS:-$(nproc)}" "$@"
