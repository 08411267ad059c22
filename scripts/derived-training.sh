#!/usr/bin/env bash
# Issue 19's next experiment, end to end and unattended: fine-tune the 0.5B on the `train`
# queries plus derived ones (`mrrec derive-queries`), with every user's memory built, and
# evaluate it once on `val`, paired against the untrained model and llm-rewrite.
#
#   scripts/derived-training.sh            # from the repository root; resumable (rerun after a stop)
#
# Settings come from the environment (defaults in brackets); choose them before reading any
# `val` output:
#   OUT [runs/derived]  DATA [../shared/data/amazon23-mini]  MRREC [target/release/mrrec]
#   WRITER [qwen2.5-coder-1.5b-instruct]  the model that writes the derived requests
#   PER_USER [2]  GROUP [4]  STEPS [24]  QPS [4] (queries a step)  LR [1e-3]  SEED [42]
#   SELECT [rs]   rs: the 0.5B's own rollouts (rejection sampling); distil: the writer's
#
# Costs on a 2-core AVX512-VNNI machine (sessions 16-21): the demo's home 16-20 min, the rest of
# the memory 15-18, derived requests 20-40, the snapshots' memory 4, rollouts ~7 s a group of 4
# on 2 threads (0.5B; ~11 s a trajectory with the 1.5B), the greedy bar ~3 s a query, a
# 4-example step ~1 min on 2 threads alone (2-4 min beside other work), an eval of the 62 `val`
# queries 1-3 min. Session 21: rollouts, SFT and evals about an hour (BENCHMARKS.md). Each step
# prints its time; everything is cached under $MRREC_HOME.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/derived}"
DATA="${DATA:-../shared/data/amazon23-mini}"
MRREC="${MRREC:-${CARGO_TARGET_DIR:-target}/release/mrrec}"
WRITER="${WRITER:-qwen2.5-coder-1.5b-instruct}"
PER_USER="${PER_USER:-2}"
GROUP="${GROUP:-4}"
STEPS="${STEPS:-24}"
QPS="${QPS:-4}"
LR="${LR:-1e-3}"
SEED="${SEED:-42}"
SELECT="${SELECT:-rs}"
mkdir -p "$OUT"
log="$OUT/steps.log"

step() {
  local name="$1"
  shift
  if grep -qx "done $name" "$log" 2>/dev/null; then
    echo "== $name: done before, skipped"
    return
  fi
  echo "== $name: $*" | tee -a "$log"
  local t0=$SECONDS
  "$@"
  echo "== $name: $((SECONDS - t0)) s" | tee -a "$log"
  echo "done $name" >>"$log"
}

[ -x "$MRREC" ] || cargo build --release
step demo "$MRREC" demo --data "$DATA"
step memory "$MRREC" memory build --data "$DATA" --for-split train,val --levels records,patterns,profile
step derive "$MRREC" derive-queries --data "$DATA" --model "$WRITER" --per-user "$PER_USER" --out "$OUT/data"
step snapshots "$MRREC" memory build --data "$OUT/data" --for-split train --levels records,patterns,profile
case "$SELECT" in
  rs) sampler=() ;;
  distil) sampler=(--model "$WRITER") ;;
  *) echo "SELECT must be rs or distil" >&2; exit 2 ;;
esac
step rollouts "$MRREC" rollouts --data "$OUT/data" --mode guided --group "$GROUP" --seed "$SEED" \
  "${sampler[@]}" --out "$OUT/rollouts.jsonl"
step sft "$MRREC" train --data "$OUT/data" --mode guided --sft "$OUT/rollouts.jsonl" \
  --steps "$STEPS" --queries-per-step "$QPS" --lora-layers 8 --lora-targets q,k,v,o --lr "$LR" \
  --val-every 0 --val-queries 0 --seed "$SEED" --out "$OUT/sft"
step eval-untrained "$MRREC" eval --data "$DATA" --method mrrec --split val --mode guided --seed "$SEED" \
  --out "$OUT/eval-untrained"
step eval-sft "$MRREC" eval --data "$DATA" --method mrrec --split val --mode guided --seed "$SEED" \
  --adapter "$OUT/sft/adapter.safetensors" --out "$OUT/eval-sft"
step eval-rewrite "$MRREC" eval --data "$DATA" --method llm-rewrite --split val --out "$OUT/eval-rewrite"
for base in eval-untrained eval-rewrite; do
  "$MRREC" compare "$OUT/eval-sft" "$OUT/$base" --data "$DATA" | tee "$OUT/compare-sft-vs-$base.txt"
done
