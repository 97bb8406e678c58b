#!/bin/bash
#SBATCH --job-name=mm1b5
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.log
#
# Memory Mosaics v2 "small" (1.5B class) pretraining: 200B tokens at 4096 context.
# Submit from the repository root: sbatch launch/mm1b5.sh [section.key=value ...]
# The #SBATCH lines are defaults (sbatch flags override them). Every setting, the MM_* variables
# included, and the life of a job (signals, requeue, resume) are described in launch/README.md.
set -euo pipefail
_mm_script=mm1b5
MM_CONFIG="${MM_CONFIG:-pretrain/configs/mm_1b5.yaml}"
MM_FINETUNE_FROM="${MM_FINETUNE_FROM-}"

# Find launch/common.sh. sbatch runs a copy of this file from its spool directory, so look in
# MM_REPO, beside the submitted script (scontrol's Command), in the submit directory, then here.
_mm_c="${MM_REPO:+$MM_REPO/launch/common.sh}"
if [ -z "$_mm_c" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  _mm_c="$(scontrol show job "$SLURM_JOB_ID" -o 2>/dev/null | tr ' ' '\n' \
    | sed -n 's/^Command=//p' | head -n1)" || true
  _mm_c="${_mm_c:+$(dirname "$_mm_c")/common.sh}"
fi
for _mm_c in "$_mm_c" "${SLURM_SUBMIT_DIR:-.}/launch/common.sh" \
  "$(dirname "${BASH_SOURCE[0]}")/common.sh" ""; do
  if [ -n "$_mm_c" ] && [ -f "$_mm_c" ]; then break; fi
done
if [ -z "$_mm_c" ]; then
  echo "[$_mm_script] ERROR: cannot find launch/common.sh; set MM_REPO or submit from the repository root" >&2
  exit 2
fi
# shellcheck source=launch/common.sh
source "$_mm_c"
mm_train_main "$@"
