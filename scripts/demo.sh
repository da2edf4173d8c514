#!/usr/bin/env bash
# The main job, end to end on loopback: starts a kvrecall-server, writes a small random-weight
# Llama model, and has kvrecall-worker prefill an 8K-token prompt, push its KV to the tier and
# decode 32 tokens with sparse retrieval attention (budget 256) — rows streamed over UCX — while
# checking every step against dense decoding of the same prompt. Prints the summary.
#   PROMPT_TOKENS, NEW_TOKENS, BUDGET, UCX_TLS_DEMO (default tcp) override the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "== build"
scripts/build.sh kvrecall-server kvrecall-worker kvrecallctl
BIN=${BUILD_DIR:-build}/bin
WORK=${BUILD_DIR:-build}/demo
mkdir -p "$WORK"
TLS=${UCX_TLS_DEMO:-tcp}

SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT INT TERM

echo "== model"
[ -f "$WORK/model/config.json" ] || "$BIN/kvrecall-worker" make-model --preset=tiny --out="$WORK/model"

echo "== server"
rm -f "$WORK/server.port"
"$BIN/kvrecall-server" --listen=127.0.0.1:0 --memory=2GiB --metrics-port=0 --metrics-host=127.0.0.1 \
  --ucx-tls="$TLS" --port-file="$WORK/server.port" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 100); do [ -s "$WORK/server.port" ] && break; sleep 0.1; done
[ -s "$WORK/server.port" ] || { echo "server did not start:"; cat "$WORK/server.log"; exit 1; }
read -r PORT METRICS_PORT <"$WORK/server.port"
echo "kvrecall-server on 127.0.0.1:$PORT (metrics :$METRICS_PORT)"

echo "== generate (prefill takes a little while on the CPU backend)"
PROMPT=/usr/share/common-licenses/GPL-3
[ -f "$PROMPT" ] || PROMPT=README.md
"$BIN/kvrecall-worker" generate --model="$WORK/model" --tier="127.0.0.1:$PORT" --ucx-tls="$TLS" \
  --prompt-file="$PROMPT" --prompt-tokens="${PROMPT_TOKENS:-8192}" --max-new-tokens="${NEW_TOKENS:-32}" \
  --budget="${BUDGET:-256}" --compare-dense --json="$WORK/result.json"

echo
echo "== tier after the run"
"$BIN/kvrecallctl" --server="127.0.0.1:$PORT" status
echo
echo "JSON report: $WORK/result.json"
