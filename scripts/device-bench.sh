#!/usr/bin/env bash
# Runs the CPU-side benchmarks on the device machine's idle cores (16 on the H100 host), from a
# bundle made by scripts/device-bundle.sh. Writes one JSON per benchmark under $OUT (or ./out).
#   usage there: scripts/device-bench.sh [rpc] [stream] [index] [store] [ingest]
#                [accuracy-short] [accuracy-passkey-32k] [accuracy-multikey-32k] [decode-shared-96k]
#                [decode-table]
#   (default: all but the accuracy runs, which use the GPU too; one call each)
#   decode-table: issue 6's table (32K and 96K, budgets 1024 and 2048, LocalTier and RemoteTier),
#   taken only when a 24-step gauge reads >= GATE tokens/s (default 500): the host's CPU speed
#   varies up to 2x between device starts, and the step is CPU-bound.
#   RPC_DELTAS="true false" picks the rpc runs' --delta values.
set -uo pipefail
cd "$(dirname "$0")/.."
source .bundle/env.sh
OUT=${OUT:-out}
mkdir -p "$OUT"
[ $# -eq 0 ] && set -- rpc stream index store ingest
nproc; lscpu | grep -E "Model name|^CPU\(s\)" || true
for b in "$@"; do
  case "$b" in
    rpc)
      # ctkvr at the issue's shape, delta streaming on (default) and off, over TCP and shared memory.
      for tls in tcp posix,sysv,cma,self; do
        for delta in ${RPC_DELTAS:-true false}; do
          timeout 240 kvrecall-bench rpc --method=ctkvr --ucx_tls=$tls --delta=$delta --json \
            >"$OUT/rpc-ctkvr-${tls%%,*}-delta-$delta.json" 2>>"$OUT/bench.log" \
            || echo "rpc $tls delta=$delta failed (see bench.log)"
        done
      done ;;
    stream)
      for tls in tcp posix,sysv,cma,self; do
        timeout 240 kvrecall-bench stream --tls=$tls --json >"$OUT/stream-${tls%%,*}.json" 2>>"$OUT/bench.log" \
          || echo "stream $tls failed (see bench.log)"
      done ;;
    index) timeout 240 kvrecall-bench index --method=ctkvr,cluster,merged --json >"$OUT/index.json" 2>>"$OUT/bench.log" \
             || echo "index failed (see bench.log)" ;;
    ingest)
      # A 4096-token prompt of a Llama-3-8B-shaped model (1 GiB of K/V) per append.
      for tls in tcp posix,sysv,cma,self; do
        timeout 240 kvrecall-bench ingest --tokens=4096 --ucx_tls=$tls --json >"$OUT/ingest-${tls%%,*}.json" \
          2>>"$OUT/bench.log" || echo "ingest $tls failed (see bench.log)"
      done ;;
    accuracy-short|accuracy-passkey-32k|accuracy-multikey-32k)
      # Issue 7's grid on the reference model, prefilled on the GPU (--backend=cuda: the GEMMs;
      # prefill attention and the tier's searches run on the host's cores): depths 0.1/0.5/0.9,
      # 2 samples each, dense vs exact, ctkvr and cluster at budgets 64-2048, lookahead off and
      # on. accuracy-short: both tasks at 4K-16K side by side (~4 min); accuracy-TASK-32k: one
      # task at 32K (~6 min, its prefill attention dominates). One call each (10-minute limit).
      grid="--backend=cuda --depths=0.1,0.5,0.9 --samples=2 --methods=exact,ctkvr,cluster --budgets=64,128,256,512,1024,2048 --lookahead=both --json"
      if [ "$b" = accuracy-short ]; then
        for task in passkey multikey; do
          timeout 500 kvrecall-bench accuracy $grid --threads=8 --tasks=$task --contexts=4096,8192,16384 \
            --plot="$OUT/accuracy-$task-4k-16k.png" --markdown="$OUT/accuracy-$task-4k-16k.md" \
            >"$OUT/accuracy-$task-4k-16k.json" 2>"$OUT/accuracy-$task-4k-16k.log" &
        done
        wait
      else
        task=${b#accuracy-}
        task=${task%-32k}
        timeout 540 kvrecall-bench accuracy $grid --tasks=$task --contexts=32768 \
          --plot="$OUT/accuracy-$task-32k.png" --markdown="$OUT/accuracy-$task-32k.md" \
          >"$OUT/accuracy-$task-32k.json" 2>"$OUT/accuracy-$task-32k.log"
      fi
      tail -n 2 "$OUT"/accuracy-*.log ;;
    store) timeout 240 kvrecall-bench store --json >"$OUT/store.json" 2>>"$OUT/bench.log" \
             || echo "store failed (see bench.log)" ;;
    decode-shared-96k)
      # Issue 6 on the GPU (bundle kvrecall-worker): dense vs kvrecall at 96K with one shared
      # document in the tier, so that GPU memory, not the host's, bounds the kvrecall batch;
      # ctkvr as published (--ctkvr_min_similarity=0: random weights make every query novel).
      timeout 560 kvrecall-worker bench --contexts=98304 --budgets=1024,2048 --bench_prompts=shared \
        --ctkvr_min_similarity=0 --bench_lookahead=on --bench_tokens=repeat,greedy \
        --json="$OUT/decode-shared-96k.json" >"$OUT/decode-shared-96k.log" 2>&1 \
        || echo "decode-shared-96k failed (see decode-shared-96k.log)"
      grep -E "tokens/s|batch" "$OUT/decode-shared-96k.log" | tail -n 12 ;;
    decode-table)
      flags="--bench_prompts=shared --ctkvr_min_similarity=0 --bench_lookahead=on --bench_tokens=repeat --threads=12"
      kvrecall-worker bench --contexts=98304 --budgets=1024 $flags --bench_dense=false --bench_steps=24 \
        --json="$OUT/decode-gauge.json" >"$OUT/decode-gauge.log" 2>&1 || { echo "gauge failed"; continue; }
      gauge=$(python3 -c "import json,sys; print(int(json.load(open(sys.argv[1]))['rows'][0]['tokens_per_s']))" "$OUT/decode-gauge.json")
      if [ "$gauge" -lt "${GATE:-500}" ]; then echo "slow start: gauge $gauge tokens/s < ${GATE:-500}, no table"; continue; fi
      timeout 400 kvrecall-worker bench --contexts=32768,98304 --budgets=1024,2048 $flags \
        --json="$OUT/decode-table-local.json" >"$OUT/decode-table-local.log" 2>&1 || echo "local table failed"
      timeout 300 kvrecall-worker bench --contexts=98304 --budgets=1024,2048 $flags --bench_tier=remote \
        --bench_dense=false --json="$OUT/decode-table-remote.json" >"$OUT/decode-table-remote.log" 2>&1 \
        || echo "remote table failed"
      grep -hE "tokens/s" "$OUT"/decode-table-*.log | tail -n 12 ;;
  esac
done
ls -la "$OUT"
