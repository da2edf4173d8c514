#!/usr/bin/env bash
# The device calls that train recall-tiny (see README.md beside this file). Run from the repository
# root on the GPU machine, with .refdata/ carried:
#   stage a: tokenizer + smoke test + phase A (contexts 2K -> 16K) + a quick eval; writes to $OUT
#            tokenizer.json, ckpt{0,1,2}.safetensors (fp32), train_a.csv, eval_a.json, log_a.txt
#   stage b: phase B from .refdata/ckpt (contexts 16K -> 32K) + export + full eval + logits + curves;
#            writes to $OUT config.json, model.safetensors, train_b.csv, eval.json, logits_fp32.json,
#            curves.png, log_b.txt
# Between the stages, copy stage a's files into .refdata/ (ckpt*.safetensors into .refdata/ckpt/).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
D=tools/reference-model
OUT=${OUT:?set OUT}
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c 'import torch, transformers, tokenizers; print("torch", torch.__version__, "transformers", transformers.__version__, "tokenizers", tokenizers.__version__)'

case "${1:?stage a or b}" in
a)
  exec > >(tee "$OUT/log_a.txt") 2>&1
  python3 $D/train_tokenizer.py --corpus .refdata/corpus.txt.xz --out "$OUT/tokenizer.json"
  echo "tokenizer done at $(elapsed) s"
  # Smoke test of the whole pipeline (short and 32K steps, export, eval) before the real run.
  python3 $D/train.py --tokenizer "$OUT/tokenizer.json" --time 12 --lengths 0:2048,0.5:32768 \
      --warmup 5 --log /tmp/smoke.csv --log-every 2 --export /tmp/smoke_model
  python3 $D/eval.py --model /tmp/smoke_model --out /tmp/smoke_eval.json --contexts 4096,32768 \
      --per-depth 1 --multikey-per-depth 1 --vartrack 3 --ar 1 --logits-out /tmp/smoke_logits.json
  echo "smoke done at $(elapsed) s"
  T=$(( ${BUDGET_A:-560} - $(elapsed) - 75 ))
  [ "$T" -gt 390 ] && T=390
  echo "phase A: $T s of training"
  python3 $D/train.py --tokenizer "$OUT/tokenizer.json" --time "$T" \
      --lengths 0:2048,0.3:4096,0.55:8192,0.8:16384 --lr 2e-3 --warmup 100 \
      --ckpt-out "$OUT" --log "$OUT/train_a.csv" --export /tmp/export_a
  python3 $D/eval.py --model /tmp/export_a --out "$OUT/eval_a.json" --contexts 4096,16384,32768 \
      --per-depth 8 --multikey-per-depth 4 --vartrack 24 --ar 2
  echo "stage a done at $(elapsed) s"
  ;;
b)
  exec > >(tee "$OUT/log_b.txt") 2>&1
  # Phase A's totals: its log's "done:" line (exact), else its CSV's last row (within 10 steps).
  last=$(tail -1 .refdata/train_a.csv)
  STEPS=$(sed -n 's/^done: \([0-9]*\) steps.*/\1/p' .refdata/log_a.txt 2>/dev/null | tail -1)
  STEPS=${STEPS:-$(echo "$last" | cut -d, -f1)}
  TOKENS=$(( STEPS * 131072 ))
  T=$(( ${BUDGET_B:-560} - $(elapsed) - 110 ))
  [ "$T" -gt ${MAX_B:-400} ] && T=${MAX_B:-400}
  echo "phase B: $T s of training, after $STEPS steps / $TOKENS tokens"
  python3 $D/train.py --tokenizer .refdata/tokenizer.json --resume .refdata/ckpt --time "$T" \
      --lengths ${LENGTHS_B:-0:16384,0.3:32768} --lr ${LR_B:-1e-3} --min-lr 5e-5 --warmup 30 \
      --early-until 0 --tokens-before "$TOKENS" --steps-before "$STEPS" \
      --log "$OUT/train_b.csv" --export /tmp/recall-tiny
  cp /tmp/recall-tiny/config.json /tmp/recall-tiny/model.safetensors "$OUT/"
  python3 $D/eval.py --model /tmp/recall-tiny --out "$OUT/eval.json" --logits-out "$OUT/logits_fp32.json"
  python3 $D/plot.py --out "$OUT/curves.png" .refdata/train_a.csv "$OUT/train_b.csv" || true
  echo "stage b done at $(elapsed) s"
  ;;
esac
