#!/usr/bin/env bash
# Runs the CPU-side benchmarks on the device machine's idle cores (16 on the H100 host), from a
# bundle made by scripts/device-bundle.sh. Writes one JSON per benchmark under $OUT (or ./out).
#   usage there: scripts/device-bench.sh [rpc] [index] [store]   (default: all three)
set -uo pipefail
cd "$(dirname "$0")/.."
source .bundle/env.sh
OUT=${OUT:-out}
mkdir -p "$OUT"
[ $# -eq 0 ] && set -- rpc index store
nproc; lscpu | grep -E "Model name|^CPU\(s\)" || true
for b in "$@"; do
  case "$b" in
    rpc)
      for tls in tcp posix,sysv,cma,self; do
        for m in ctkvr exact; do
          timeout 240 kvrecall-bench rpc --method=$m --ucx_tls=$tls --json >"$OUT/rpc-$m-${tls%%,*}.json" \
            2>>"$OUT/bench.log" || echo "rpc $m $tls failed (see bench.log)"
        done
      done ;;
    index) timeout 240 kvrecall-bench index --method=ctkvr,cluster,merged --json >"$OUT/index.json" 2>>"$OUT/bench.log" \
             || echo "index failed (see bench.log)" ;;
    store) timeout 240 kvrecall-bench store --json >"$OUT/store.json" 2>>"$OUT/bench.log" \
             || echo "store failed (see bench.log)" ;;
  esac
done
ls -la "$OUT"
