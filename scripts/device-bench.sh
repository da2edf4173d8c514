#!/usr/bin/env bash
# Runs the CPU-side benchmarks on the device machine's idle cores (16 on the H100 host), from a
# bundle made by scripts/device-bundle.sh. Writes one JSON per benchmark under $OUT (or ./out).
#   usage there: scripts/device-bench.sh [rpc] [stream] [index] [store] [ingest] [accuracy]
#   (default: all but accuracy, which takes ~7 minutes on 16 cores)
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
    accuracy)
      # Issue 7's grid on the reference model (CPU backend): passkey at 8K-32K, multikey at 8K
      # and 16K, dense vs exact, ctkvr and cluster, lookahead off (~7 minutes).
      timeout 280 kvrecall-bench accuracy --tasks=passkey --contexts=8192,16384 --depths=0.1,0.5,0.9 \
        --samples=2 --methods=exact,ctkvr,cluster --budgets=256,1024 --lookahead=off \
        --plot="$OUT/accuracy-passkey-8k-16k.png" --json >"$OUT/accuracy-passkey-8k-16k.json" \
        2>>"$OUT/bench.log" || echo "accuracy 8k-16k failed (see bench.log)"
      timeout 300 kvrecall-bench accuracy --tasks=passkey --contexts=32768 --depths=0.1,0.5,0.9 \
        --samples=2 --methods=exact,ctkvr,cluster --budgets=256,1024,2048 --lookahead=off \
        --plot="$OUT/accuracy-passkey-32k.png" --json >"$OUT/accuracy-passkey-32k.json" \
        2>>"$OUT/bench.log" || echo "accuracy 32k failed (see bench.log)"
      timeout 200 kvrecall-bench accuracy --tasks=multikey --contexts=8192,16384 --depths=0.1,0.5,0.9 \
        --samples=2 --methods=exact,ctkvr,cluster --budgets=1024 --lookahead=off \
        --json >"$OUT/accuracy-multikey-8k-16k.json" \
        2>>"$OUT/bench.log" || echo "accuracy multikey failed (see bench.log)" ;;
    store) timeout 240 kvrecall-bench store --json >"$OUT/store.json" 2>>"$OUT/bench.log" \
             || echo "store failed (see bench.log)" ;;
  esac
done
ls -la "$OUT"
