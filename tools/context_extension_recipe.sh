#!/usr/bin/env bash
# The worked context-extension recipe of docs/context_extension.md, on CPU in minutes with the tiny model:
#   1. train at 1K tokens on the recall task;
#   2. evaluate loss by position and the recall heatmap up to 8K (cp=2, through the ring);
#   3. continue at 4K with YaRN RoPE scaling (factor 8 over the 1K pretraining context) on cp=2;
#   4. evaluate again.
# Outputs: runs/recall_1k/eval, runs/recall_4k_yarn/eval; figures copied to docs/img/ext_*.png.
set -euo pipefail
cd "$(dirname "$0")/.."
DA=${DISTATTN:-.venv/bin/distattn}
GRID=(--set eval.task=recall --set "eval.lengths=[1024,2048,4096,8192]" --set "eval.depths=[0.0,0.25,0.5,0.75,1.0]"
      --set eval.trials=4 --set eval.curve_length=8192 --set eval.buckets=16 --set eval.curve_sequences=4)
TASK=(--set data.source=synthetic --set data.synthetic_task=recall)

"$DA" train --overwrite --set run.name=recall_1k "${TASK[@]}" --set data.seq_len=1024 \
  --set train.steps=600 --set train.ckpt_every=600 --set train.log_every=100 --set train.eval_every=200
"$DA" eval --set run.name=recall_1k "${GRID[@]}"
"$DA" train --overwrite --set run.name=recall_4k_yarn --set model.init_from=runs/recall_1k "${TASK[@]}" \
  --set data.seq_len=4096 --set parallel.cp=2 --set model.rope_scaling.type=yarn --set model.rope_scaling.factor=8 \
  --set model.rope_scaling.original_max_position_embeddings=1024 --set train.steps=150 --set train.warmup_steps=10 \
  --set train.lr=1e-3 --set train.min_lr=1e-4 --set train.ckpt_every=150 --set train.log_every=25
"$DA" eval --set run.name=recall_4k_yarn "${GRID[@]}"
mkdir -p docs/img
for r in recall_1k recall_4k_yarn; do
  cp "runs/$r/eval/position_loss.png" "docs/img/ext_${r}_position_loss.png"
  cp "runs/$r/eval/retrieval.png" "docs/img/ext_${r}_retrieval.png"
done
