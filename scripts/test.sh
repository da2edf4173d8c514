#!/usr/bin/env bash
# Installs dependencies, builds everything and runs the whole test suite (unit and multi-process),
# then builds it again with AddressSanitizer + UndefinedBehaviorSanitizer (and LeakSanitizer) and
# runs it again: the server and worker processes the tests start are instrumented too.
# Tests labelled `gpu` skip themselves on machines without a GPU.
#   KVRECALL_SKIP_SANITIZERS=1 skips the second pass (for quick local runs; CI always runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "== build"
time scripts/build.sh
echo "== tests"
(cd "${BUILD_DIR:-build}" && ctest --output-on-failure -j "$(nproc)" --timeout 600)

if [ "${KVRECALL_SKIP_SANITIZERS:-0}" = "1" ]; then
  echo "== sanitizer pass skipped (KVRECALL_SKIP_SANITIZERS=1)"
  exit 0
fi
echo "== build (ASan + UBSan)"
time BUILD_DIR=build-asan KVRECALL_CUDA=OFF CMAKE_ARGS="-DKVRECALL_SANITIZE=ON" scripts/build.sh
echo "== tests (ASan + UBSan)"
cd build-asan
ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --output-on-failure -j "$(nproc)" --timeout 900
