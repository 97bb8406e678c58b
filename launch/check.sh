#!/bin/bash
# Validate a training job on the login node before submitting it: no allocation, no GPU.
#
# Usage (the same environment, sbatch flags and overrides as the submission):
#   bash launch/check.sh launch/mm8b.sh [--nodes=N] [--gpus-per-node=G] [--ntasks-per-node=T]
#        [--time=T] [--signal=B:USR1@S] [section.key=value ...]
#
# It takes the job script's #SBATCH defaults, the flags given here and the MM_* environment the
# job would read, builds the training command's overrides exactly as the job does, and runs
# tools/check_job.py: unknown config keys and bad values, the parallel layout against nodes x
# processes per node, the tokenizer, the data prefixes, the checkpoint directory (resume state,
# room for checkpoint.keep_last + 1 checkpoints), MM_FINETUNE_FROM, and the time limit against
# the signal lead. Prints the plan and every problem; exit status 0 when the job looks right, 2
# otherwise.
#
# Environment: every variable the job script reads (launch/README.md), in particular
#   MM_CONFIG MM_RUN_NAME MM_OUTPUT_DIR MM_CKPT_DIR MM_LOG_DIR MM_STATE_DIR MM_STOP_FILE
#   MM_DATA_BLEND MM_TOKENIZER MM_EXTRA_ARGS MM_GPUS_PER_NODE MM_TASKS_PER_NODE MM_REPO
#   MM_PYTHON MM_FINETUNE_FROM MM_FINETUNE_KEY MM_SIGNAL_LEAD
# The job's other settings are validated as the job would (a bad value fails the check) but
# not otherwise used here: MM_TRAIN_CMD MM_CONTAINER_IMAGE MM_CONTAINER_MOUNTS MM_SRUN_ARGS
#   MM_SRUN_WAIT MM_SITE_ENV MM_HEALTH_CHECK MM_HEALTH_TIMEOUT MM_HEALTH_PYTHON
#   MM_HEALTH_MIN_FREE_GB MM_DRAIN_BAD_NODES MM_REQUEUE MM_MAX_FAILURES MM_MAX_NO_PROGRESS
#   MM_MAX_STARTS MM_FATAL_STATUSES MM_DRY_RUN MM_NODE_LOGS MM_GUARD_MAIL
set -euo pipefail

script="${1:-}"
if [ -z "$script" ] || [ ! -f "$script" ]; then
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
fi
shift
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
_mm_script="$(basename "$script" .sh)"

# The script's defaults: MM_CONFIG and the #SBATCH lines.
sbatch_default() {
  sed -n "s/^#SBATCH[[:space:]]*--$1[=[:space:]]*\\([^[:space:]]*\\).*/\\1/p" "$script" | tail -n1
}
# shellcheck disable=SC2016  # a literal ${ in the pattern
config_default="$(sed -n 's/^MM_CONFIG="\${MM_CONFIG:-\(.*\)}"$/\1/p' "$script" | head -n1)"
MM_CONFIG="${MM_CONFIG:-$config_default}"
nodes="$(sbatch_default nodes)"
gpus="$(sbatch_default gpus-per-node)"
tasks="$(sbatch_default ntasks-per-node)"
time_limit="$(sbatch_default time)"
signal="${SBATCH_SIGNAL:-$(sbatch_default signal)}"
lead_from_flags=
declare -a overrides=()
for arg in "$@"; do
  case "$arg" in
    --nodes=*) nodes="${arg#*=}" ;;
    --gpus-per-node=*) gpus="${arg#*=}" ;;
    --ntasks-per-node=*) tasks="${arg#*=}" ;;
    --time=*) time_limit="${arg#*=}" ;;
    --signal=*) signal="${arg#*=}"; lead_from_flags=1 ;;
    --*) mm_log "ignoring sbatch flag $arg (not checked)" ;;
    *) overrides+=("$arg") ;;
  esac
done
export SLURM_GPUS_PER_NODE="${gpus:-8}" SLURM_NTASKS_PER_NODE="${tasks:-1}"
mm_defaults
MM_STOP_FILE="$(mm_abspath "${MM_STOP_FILE:-$MM_STATE_DIR/stop-check}")"
mm_job_overrides "${overrides[@]}"

lead="${signal##*@}"
if [ -n "${MM_SIGNAL_LEAD:-}" ]; then
  lead="$MM_SIGNAL_LEAD"
elif [ -n "$lead_from_flags" ]; then
  mm_log "note: --signal given: export MM_SIGNAL_LEAD=$lead with the submission (the job cannot see sbatch's flags)"
fi
limit="$(mm_duration_seconds "$time_limit")"
declare -a timing=()
[ -z "$limit" ] || timing+=(--time-limit "$limit")
[[ ! "$lead" =~ ^[0-9]+$ ]] || timing+=(--signal-lead "$lead")

mm_log "checking $script: config $MM_CONFIG, ${nodes:-1} nodes x $MM_TASKS_PER_NODE processes (GPUs per node $MM_GPUS_PER_NODE)"
cd "$MM_REPO"
exec "$MM_PYTHON" tools/check_job.py --config "$MM_CONFIG" --nodes "${nodes:-1}" \
  --tasks-per-node "$MM_TASKS_PER_NODE" "${timing[@]}" "${_mm_overrides[@]}"
