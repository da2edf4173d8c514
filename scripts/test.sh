#!/usr/bin/env bash
# Installs dependencies, builds everything and runs the whole test suite (unit and multi-process),
# then builds it again with AddressSanitizer + UndefinedBehaviorSanitizer (and LeakSanitizer) and
# runs it again: the server and worker processes the tests start are instrumented too. Last, the
# kvstore and common unit tests (the node's locking, the thread pool) run under ThreadSanitizer,
# from a third tree that builds only those binaries (build-tsan; see cmake/tsan/absl_sync_tsan.cc
# for how TSan is made to see Debian's uninstrumented Abseil).
# Tests labelled `gpu` skip themselves on machines without a GPU.
#   KVRECALL_SKIP_SANITIZERS=1 skips the ASan, TSan and fuzz passes (for quick local runs; CI runs
#   them).
#   KVRECALL_SKIP_TSAN=1 skips only the TSan pass.
#   KVRECALL_TSAN_TESTS="kvstore_test common_test indexer_test" picks the TSan pass's binaries
#   (indexer_test is clean too, but adds about a minute of build on 2 cores).
# Last, the libFuzzer targets of tests/fuzz (RPC validation, safetensors, tokenizer, RocksDB
# records and recovery; clang, ASan + UBSan, tree build-fuzz) run for a bounded time from scratch
# copies of their corpora in tests/fuzz/corpus/; any crash, sanitizer report, leak or hang fails
# the script and leaves the input that caused it in the directory it prints.
#   KVRECALL_SKIP_FUZZ=1 skips the fuzz pass.
#   KVRECALL_FUZZ_SECONDS=N runs the targets for N seconds (default 40), all at once: the pass
#   takes N seconds plus the build.
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

# The fuzz pass runs after the TSan pass (below) unless skipped; a function so that skipping TSan
# does not skip it.
fuzz_pass() {
  if [ "${KVRECALL_SKIP_FUZZ:-0}" = "1" ]; then
    echo "== fuzz pass skipped (KVRECALL_SKIP_FUZZ=1)"
    return 0
  fi
  local targets=(rpc recovery record safetensors tokenizer) seconds=${KVRECALL_FUZZ_SECONDS:-40}
  # -max_len per target: the largest seed plus room to grow (tests/fuzz/README.md).
  declare -A max_len=([rpc]=8192 [recovery]=8192 [record]=8192 [safetensors]=4096 [tokenizer]=16384)
  echo "== build (fuzz targets)"
  time CC=clang CXX=clang++ BUILD_DIR=build-fuzz KVRECALL_CUDA=OFF CMAKE_ARGS="-DKVRECALL_FUZZ=ON" \
    scripts/build.sh "${targets[@]/#/fuzz_}"
  echo "== fuzz (${seconds}s, ${#targets[@]} targets at once)"
  local scratch t pids=() failed=()
  scratch=$(mktemp -d "${TMPDIR:-/tmp}/kvrecall-fuzz.XXXXXX")
  for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t/corpus" "$scratch/$t/artifacts"
    cp -r "tests/fuzz/corpus/$t/." "$scratch/$t/corpus/"
    ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
    UCX_MEM_MMAP_HOOK_MODE=none UCX_MEM_MALLOC_HOOKS=no UCX_MEM_EVENTS=no \
      "build-fuzz/bin/fuzz_$t" -max_total_time="$seconds" -max_len="${max_len[$t]}" \
        -timeout=60 -rss_limit_mb=2048 -print_final_stats=1 -print_funcs=0 \
        -artifact_prefix="$scratch/$t/artifacts/" "$scratch/$t/corpus" >"$scratch/$t/log" 2>&1 &
    pids+=($!)
  done
  for i in "${!targets[@]}"; do
    t=${targets[$i]}
    if wait "${pids[$i]}"; then
      echo "fuzz_$t: $(grep -a '^stat::number_of_executed_units' "$scratch/$t/log" | awk '{print $2}') runs," \
        "$(grep -aoE 'cov: [0-9]+ ft: [0-9]+' "$scratch/$t/log" | tail -1)"
    else
      failed+=("$t")
      echo "fuzz_$t FAILED (input kept in $scratch/$t/artifacts/):"
      grep -av '^[IWE][0-9]\{8\} ' "$scratch/$t/log" | tail -n 80
    fi
  done
  if [ ${#failed[@]} -gt 0 ]; then
    echo "== fuzz: findings in ${failed[*]}"
    return 1
  fi
  rm -rf "$scratch"
}

if [ "${KVRECALL_SKIP_TSAN:-0}" = "1" ]; then
  echo "== TSan pass skipped (KVRECALL_SKIP_TSAN=1)"
  fuzz_pass
  exit 0
fi
# A TSan tree names each test after its binary (cmake/kvrecall.cmake), which selects the tests of
# the binaries built here. A TSan report makes the test's process exit with 66, failing the test.
# libucm's mmap/madvise hooks (installed once UCX is loaded) crash under TSan; these tests do not
# need UCX's memory events, so the hooks stay off. Tests through gRPC's client library (the
# RemoteTier ones) are left out: Debian's gRPC is not instrumented, so TSan reports its own
# synchronisation as races.
read -r -a tsan_tests <<<"${KVRECALL_TSAN_TESTS:-kvstore_test common_test client_test}"
echo "== build (TSan: ${tsan_tests[*]})"
time BUILD_DIR=build-tsan KVRECALL_CUDA=OFF CMAKE_ARGS="-DKVRECALL_TSAN=ON" \
  scripts/build.sh "${tsan_tests[@]}"
echo "== tests (TSan)"
(cd build-tsan &&
  UCX_MEM_MMAP_HOOK_MODE=none UCX_MEM_MALLOC_HOOKS=no UCX_MEM_EVENTS=no \
  TSAN_OPTIONS="second_deadlock_stack=1 ${TSAN_OPTIONS:-}" \
    ctest --output-on-failure -j "$(nproc)" --timeout 900 \
      -R "^($(IFS='|'; echo "${tsan_tests[*]}"))\\." -E "RemoteTier")
fuzz_pass
