#!/usr/bin/env bash
# The main job on the embedded default: train the tiny MM v2 model on the demo corpus (the
# Python standard library's own sources, tokenized with a BPE trained on them) on CPU, with
# two processes splitting the model by tensor parallelism. Writes TensorBoard logs and
# checkpoints under runs/tiny_mm/ and prints the loss as it falls.
#   bash scripts/demo.sh                      # fresh run (removes runs/tiny_mm first)
#   RESUME=1 bash scripts/demo.sh             # continue an interrupted run from its checkpoint
# Extra arguments are config overrides (section.key=value).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
bash scripts/prepare_demo_data.sh
if [ "${RESUME:-0}" != 1 ]; then
  rm -rf runs/tiny_mm
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
.venv/bin/torchrun --standalone --nproc-per-node 2 pretrain/pretrain_mm.py \
  --config pretrain/configs/tiny_mm.yaml parallel.tensor_model_parallel_size=2 "$@" \
  2> >(grep -v -e "UserWarning" -e "warnings.warn" >&2)
echo "logs: runs/tiny_mm/logs (tensorboard --logdir runs/tiny_mm/logs); checkpoints: runs/tiny_mm/checkpoints"
