#!/bin/bash
#SBATCH --job-name=mm-preprocess
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --no-requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.log
#
# Tokenize a corpus into one Megatron indexed dataset (PREFIX.bin/.idx) on several nodes: each
# node tokenizes its share of the input files, then one step merges the parts (byte-identical to
# a single-node run). Submit from the repository root:
#   MM_PREP_INPUT='/data/raw/*.jsonl.zst' MM_PREP_OUTPUT_PREFIX=/data/tok/web_text_document \
#     MM_TOKENIZER=/models/llama3/tokenizer.model sbatch --nodes=8 launch/preprocess.sh
# The #SBATCH lines are defaults (sbatch flags override them). Every setting, the MM_* variables
# included, is described in launch/README.md ("Preprocessing").
set -euo pipefail
_mm_script=preprocess

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

[ -n "${SLURM_JOB_ID:-}" ] || mm_die "not inside a SLURM job: submit with 'sbatch launch/preprocess.sh'"
mm_common_defaults
cd "$MM_REPO"
[ -n "${MM_PREP_INPUT:-}" ] || mm_die "MM_PREP_INPUT is required (input files, directories or globs)"
[ -n "${MM_PREP_OUTPUT_PREFIX:-}" ] || mm_die "MM_PREP_OUTPUT_PREFIX is required"
[ -n "${MM_TOKENIZER:-}" ] || mm_die "MM_TOKENIZER is required"
MM_PREP_TASKS_PER_NODE="${MM_PREP_TASKS_PER_NODE:-1}"
MM_PREP_MERGE="${MM_PREP_MERGE:-1}"
MM_PREP_DELETE_PARTS="${MM_PREP_DELETE_PARTS:-0}"
MM_PREP_RESUME="${MM_PREP_RESUME:-1}"
case "$MM_PREP_RESUME" in 0|1) ;; *) mm_die "MM_PREP_RESUME must be 0 or 1, got '$MM_PREP_RESUME'" ;; esac
mm_require_uint MM_PREP_TASKS_PER_NODE "$MM_PREP_TASKS_PER_NODE"
mm_require_uint MM_SRUN_WAIT "$MM_SRUN_WAIT"
[ "$MM_PREP_TASKS_PER_NODE" -ge 1 ] || mm_die "MM_PREP_TASKS_PER_NODE must be at least 1"
cpus="${SLURM_CPUS_ON_NODE:-1}"
cpus="${cpus%%(*}"
default_workers=$((cpus / MM_PREP_TASKS_PER_NODE))
[ "$default_workers" -ge 1 ] || default_workers=1
MM_PREP_WORKERS="${MM_PREP_WORKERS:-$default_workers}"
mm_require_uint MM_PREP_WORKERS "$MM_PREP_WORKERS"

prefix="$MM_PREP_OUTPUT_PREFIX"
case "$prefix" in /*) ;; *) prefix="$MM_REPO/$prefix" ;; esac
mkdir -p "$(dirname "$prefix")"
nodes="${SLURM_JOB_NUM_NODES:-1}"
ntasks=$((nodes * MM_PREP_TASKS_PER_NODE))
read -r -a inputs <<<"$MM_PREP_INPUT"
extra=()
[ -z "${MM_PREP_ARGS:-}" ] || read -r -a extra <<<"$MM_PREP_ARGS"
[ "$MM_PREP_RESUME" != 1 ] || extra+=(--resume)

mm_log "tokenizing ${#inputs[@]} input spec(s) on $nodes nodes x $MM_PREP_TASKS_PER_NODE tasks ($ntasks shards), $MM_PREP_WORKERS workers each"
mm_log "output $prefix; tokenizer $MM_TOKENIZER"
mm_srun_common
rc=0
"${_mm_srun[@]}" --kill-on-bad-exit=1 --nodes="$nodes" --ntasks-per-node="$MM_PREP_TASKS_PER_NODE" \
  --ntasks="$ntasks" --cpus-per-task="$default_workers" \
  "$MM_PYTHON" tools/preprocess_data.py --input "${inputs[@]}" --output-prefix "$prefix" \
  --tokenizer "$MM_TOKENIZER" --workers "$MM_PREP_WORKERS" "${extra[@]}" || rc=$?
if [ "$rc" != 0 ]; then
  mm_log "ERROR: preprocessing failed (srun status $rc); no merge. Parts written so far: $(find "$(dirname "$prefix")" -maxdepth 1 -name "$(basename "$prefix").part-*.idx" | wc -l) of $ntasks"
  exit 1
fi
if [ "$ntasks" = 1 ]; then
  mm_log "done: $prefix.bin/.idx (one task, nothing to merge)"
  exit 0
fi
if [ "$MM_PREP_MERGE" != 1 ]; then
  mm_log "done: $ntasks parts $prefix.part-*-of-$(printf '%05d' "$ntasks"); not merged (MM_PREP_MERGE=0)"
  exit 0
fi
merge=("$MM_PYTHON" tools/merge_datasets.py --parts-of "$prefix")
[ "$MM_PREP_DELETE_PARTS" != 1 ] || merge+=(--delete-inputs)
mm_log "merging $ntasks parts: ${merge[*]}"
if ! "${_mm_srun[@]}" --nodes=1 --ntasks=1 --cpus-per-task=1 "${merge[@]}"; then
  mm_log "ERROR: merge failed; the parts are kept ($prefix.part-*)"
  exit 1
fi
mm_log "done: $prefix.bin/.idx merged from $ntasks parts"
