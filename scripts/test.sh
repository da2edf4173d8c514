#!/usr/bin/env bash
# Installs dependencies, builds everything and runs the whole test suite (unit and multi-process),
# then builds it again with AddressSanitizer + UndefinedBehaviorSanitizer (and LeakSanitizer) and
# runs it again: the server and worker processes the tests start are instrumented too. Last, the
# kvstore and common unit tests (the node's locking, the thread pool) run under ThreadSanitizer,
# from a third tree that builds only those binaries (build-tsan; see cmake/tsan/absl_sync_tsan.cc
# for how TSan is made to see Debian's uninstrumented Abseil).
# Tests labelled `gpu` skip themselves on machines without a GPU.
#   KVRECALL_SKIP_SANITIZERS=1 skips the ASan and TSan passes (for quick local runs; CI runs them).
#   KVRECALL_SKIP_TSAN=1 skips only the TSan pass.
#   KVRECALL_TSAN_TESTS="kvstore_test common_test indexer_test" picks the TSan pass's binaries
#   (indexer_test is clean too, but adds about a minute of build on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "== build"
time scripts/build.sh
echo "== tests"
(cd "${BUILD_DIR:-build}" && ctest --output-on-failure -j "$(nproc)" --timeout 600)
echo "== chart render test"
time deploy/helm-render/run.sh test

if [ "${KVRECALL_SKIP_SANITIZERS:-0}" = "1" ]; then
  echo "== sanitizer pass skipped (KVRECALL_SKIP_SANITIZERS=1)"
  exit 0
fi
echo "== build (ASan + UBSan)"
time BUILD_DIR=build-asan KVRECALL_CUDA=OFF CMAKE_ARGS="-DKVRECALL_SANITIZE=ON" scripts/build.sh
echo "== tests (ASan + UBSan)"
(cd build-asan &&
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 \
    ctest --output-on-failure -j "$(nproc)" --timeout 900)

if [ "${KVRECALL_SKIP_TSAN:-0}" = "1" ]; then
  echo "== TSan pass skipped (KVRECALL_SKIP_TSAN=1)"
  exit 0
fi
# A TSan tree names each test after its binary (cmake/kvrecall.cmake), which selects the tests of
# the binaries built here. A TSan report makes the test's process exit with 66, failing the test.
# libucm's mmap/madvise hooks (installed once UCX is loaded) crash under TSan; these tests do not
# need UCX's memory events, so the hooks stay off.
read -r -a tsan_tests <<<"${KVRECALL_TSAN_TESTS:-kvstore_test common_test}"
echo "== build (TSan: ${tsan_tests[*]})"
time BUILD_DIR=build-tsan KVRECALL_CUDA=OFF CMAKE_ARGS="-DKVRECALL_TSAN=ON" \
  scripts/build.sh "${tsan_tests[@]}"
echo "== tests (TSan)"
(cd build-tsan &&
  UCX_MEM_MMAP_HOOK_MODE=none UCX_MEM_MALLOC_HOOKS=no UCX_MEM_EVENTS=no \
  TSAN_OPTIONS="second_deadlock_stack=1 ${TSAN_OPTIONS:-}" \
    ctest --output-on-failure -j "$(nproc)" --timeout 900 \
      -R "^($(IFS='|'; echo "${tsan_tests[*]}"))\\.")
