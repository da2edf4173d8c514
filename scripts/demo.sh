#!/usr/bin/env bash
# The main job, end to end on loopback, answering a question: starts a kvrecall-server, plants a
# random pass key in an ~8K-token haystack of held-out text (models/recall-tiny/haystack.txt) and
# asks for it at the end; kvrecall-worker runs the reference model (models/recall-tiny) on the CPU,
# prefills the prompt, pushes its KV to the tier over gRPC + UCX and decodes with sparse retrieval
# attention (layers 2-3 attend to sinks + window + the budget-256 rows the server selects and
# streams over UCX), checking every step against dense decoding of the same tokens. Then the
# same prompt is decoded dense with no tier, and the demo prints both answers next to the key.
#   PROMPT_TOKENS (approximate, default 8192), DEPTH (percent, default 40), NEW_TOKENS (8),
#   BUDGET (256), METHOD (exact), UCX_TLS_DEMO (default tcp) override the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "== build"
scripts/build.sh kvrecall-server kvrecall-worker kvrecallctl
BIN=${BUILD_DIR:-build}/bin
WORK=${BUILD_DIR:-build}/demo
mkdir -p "$WORK"
TLS=${UCX_TLS_DEMO:-tcp}
MODEL=models/recall-tiny

SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT INT TERM

echo "== prompt"
# The haystack's documents are separated by U+001E; the model was trained on documents joined by
# <|eos|>, which the tokenizer reads as that special token. About 2.5 bytes per token here.
KEY=${KEY:-$((10000 + (RANDOM * 32768 + RANDOM) % 90000))}
DEPTH=${DEPTH:-40}
BYTES=$(( ${PROMPT_TOKENS:-8192} * 250 / 100 - 120 ))
HAY="$WORK/haystack.txt"
sed 's/\x1e/<|eos|>/g' "$MODEL/haystack.txt" >"$HAY.all"
head -c "$BYTES" "$HAY.all" >"$HAY"
CUT=$(( BYTES * DEPTH / 100 ))
{
  printf '<|bos|>'
  head -c "$CUT" "$HAY"
  printf ' The pass key is %s. Remember it. %s is the pass key.' "$KEY" "$KEY"
  tail -c +"$((CUT + 1))" "$HAY"
  printf '\nWhat is the pass key? The pass key is'
} >"$WORK/prompt.txt"
echo "pass key $KEY planted at ${DEPTH}% of $(wc -c <"$WORK/prompt.txt") bytes of held-out text" \
  "($MODEL/haystack.txt); the question is at the end"

echo "== server"
rm -f "$WORK/server.port"
"$BIN/kvrecall-server" --listen=127.0.0.1:0 --memory=2GiB --metrics-port=0 --metrics-host=127.0.0.1 \
  --ucx-tls="$TLS" --port-file="$WORK/server.port" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 100); do [ -s "$WORK/server.port" ] && break; sleep 0.1; done
[ -s "$WORK/server.port" ] || { echo "server did not start:"; cat "$WORK/server.log"; exit 1; }
read -r PORT METRICS_PORT <"$WORK/server.port"
echo "kvrecall-server on 127.0.0.1:$PORT (metrics :$METRICS_PORT)"

echo "== generate through the tier (prefill takes a little while on the CPU backend)"
"$BIN/kvrecall-worker" generate --model="$MODEL" --tier="127.0.0.1:$PORT" --ucx-tls="$TLS" \
  --prompt-file="$WORK/prompt.txt" --max-new-tokens="${NEW_TOKENS:-8}" --budget="${BUDGET:-256}" \
  --method="${METHOD:-exact}" --compare-dense --json="$WORK/result.json"

echo
echo "== generate dense (all KV local, no tier) for reference"
"$BIN/kvrecall-worker" generate --model="$MODEL" --mode=dense --prompt-file="$WORK/prompt.txt" \
  --max-new-tokens="${NEW_TOKENS:-8}" --json="$WORK/dense.json" >"$WORK/dense.log" 2>&1 \
  || { cat "$WORK/dense.log"; exit 1; }
grep -E "^(prompt|decode|generated) " "$WORK/dense.log"

echo
echo "== tier after the run"
"$BIN/kvrecallctl" --server="127.0.0.1:$PORT" status

# The answer: the generated text up to the first period.
answer() { jq -r '.generated_text' "$1" | sed 's/\..*//'; }
SPARSE=$(answer "$WORK/result.json")
DENSE=$(answer "$WORK/dense.json")
echo
echo "== answer: \"What is the pass key? The pass key is\""
printf 'planted                  %s\n' "$KEY"
printf 'sparse, through the tier "%s"   (%s, budget %s, %d prompt tokens; %s)\n' "$SPARSE" \
  "$(jq -r '.options.method' "$WORK/result.json")" "$(jq -r '.options.budget' "$WORK/result.json")" \
  "$(jq -r '.prompt_tokens' "$WORK/result.json")" "$(jq -r '.tier' "$WORK/result.json")"
printf 'dense, no tier           "%s"\n' "$DENSE"
ok=0
[ "$(echo "$SPARSE" | tr -dc 0-9)" = "$KEY" ] && ok=1
echo "recalled through the tier: $([ $ok = 1 ] && echo yes || echo NO)"
echo
echo "JSON reports: $WORK/result.json (sparse, through the tier), $WORK/dense.json (dense)"
