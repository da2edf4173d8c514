#!/usr/bin/env bash
# Runs the CPU-side benchmarks on the device machine's idle cores (16 on the H100 host), from a
# bundle made by scripts/device-bundle.sh. Writes one JSON per benchmark under $OUT (or ./out).
#   usage there: scripts/device-bench.sh [rpc] [stream] [index] [store] [ingest]   (default: all)
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
    store) timeout 240 kvrecall-bench store --json >"$OUT/store.json" 2>>"$OUT/bench.log" \
             || echo "store failed (see bench.log)" ;;
  esac
done
ls -la "$OUT"
