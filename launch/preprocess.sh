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
# Tokenize a corpus into one Megatron indexed dataset (PREFIX.bin/.idx) on several nodes.
# Each node (one task per node, SLURM_PROCID of SLURM_NTASKS) runs tools/preprocess_data.py on
# its contiguous, size-balanced share of the input files with --workers processes and writes
# PREFIX.part-RRRRR-of-NNNNN.{bin,idx}; a final step runs tools/merge_datasets.py --parts-of
# PREFIX, which checks that every part is there and writes PREFIX.{bin,idx}, byte-identical to a
# single-node run. With one node the tool writes PREFIX directly and nothing is merged.
#
# Submit from the repository root:
#   MM_PREP_INPUT='/data/raw/*.jsonl.zst' MM_PREP_OUTPUT_PREFIX=/data/tok/web_text_document \
#     MM_TOKENIZER=/models/llama3/tokenizer.model sbatch --nodes=8 launch/preprocess.sh
# Allocation: sbatch flags or SBATCH_* variables (SBATCH_ACCOUNT, SBATCH_PARTITION,
# SBATCH_TIMELIMIT, ...) override the #SBATCH lines above; no GPUs are requested. The input files
# are split between nodes, so more nodes than input files leaves nodes idle.
#
# Environment:
#   MM_PREP_INPUT           required: input files, directories or globs, whitespace-separated
#                           (quote globs; the tool expands them: .jsonl[.gz|.zst], .parquet, .txt)
#   MM_PREP_OUTPUT_PREFIX   required: output prefix on a shared file system
#   MM_TOKENIZER            required: tokenizer (tokenizer.json, tiktoken or SentencePiece model)
#   MM_PREP_WORKERS         tokenizer processes per node (default: the node's CPUs in the job)
#   MM_PREP_TASKS_PER_NODE  tasks per node, each with MM_PREP_WORKERS workers (default 1)
#   MM_PREP_ARGS            more preprocess_data.py flags, whitespace-separated
#                           (e.g. "--json-key content --on-error skip --error-log /data/tok/bad.txt")
#   MM_PREP_MERGE           1 = merge the parts into PREFIX when every task succeeded (default 1)
#   MM_PREP_DELETE_PARTS    1 = delete the parts after a successful merge (default 0)
#   MM_PREP_RESUME          1 = keep parts already complete for the same inputs and tokenizer,
#                           so a resubmitted job redoes only missing or incomplete parts
#                           (default 1; 0 rewrites every part)
#   MM_REPO                 repository root (default: found from the submitted script's path)
#   MM_PYTHON               Python interpreter (default <repo>/.venv/bin/python if present and no
#                           container, else python3)
#   MM_CONTAINER_IMAGE      run the steps in this container (pyxis: srun --container-image)
#   MM_CONTAINER_MOUNTS     pyxis --container-mounts
#   MM_SRUN_ARGS            extra srun flags, whitespace-separated
#   MM_SRUN_WAIT            seconds the other tasks may run on after the first one exits (default 120)
# Exit status: 0 done; 1 a task or the merge failed (the log names it); 2 bad settings.
set -euo pipefail
_mm_script=preprocess

_mm_common="${MM_REPO:+$MM_REPO/launch/common.sh}"
if [ -z "$_mm_common" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  _mm_common="$(scontrol show job "$SLURM_JOB_ID" -o 2>/dev/null | tr ' ' '\n' \
    | sed -n 's/^Command=//p' | head -n1)"
  _mm_common="${_mm_common:+$(dirname "$_mm_common")/common.sh}"
fi
for _mm_c in "$_mm_common" "${SLURM_SUBMIT_DIR:-.}/launch/common.sh" \
  "$(dirname "${BASH_SOURCE[0]}")/common.sh" ""; do
  [ -n "$_mm_c" ] || { echo "[preprocess] ERROR: cannot find launch/common.sh; set MM_REPO" >&2; exit 2; }
  [ -f "$_mm_c" ] && break
done
# shellcheck source=launch/common.sh
source "$_mm_c"

[ -n "${SLURM_JOB_ID:-}" ] || mm_die "not inside a SLURM job: submit with 'sbatch launch/preprocess.sh'"
MM_REPO="$(mm_find_repo)"
export MM_REPO
cd "$MM_REPO"
[ -n "${MM_PREP_INPUT:-}" ] || mm_die "MM_PREP_INPUT is required (input files, directories or globs)"
[ -n "${MM_PREP_OUTPUT_PREFIX:-}" ] || mm_die "MM_PREP_OUTPUT_PREFIX is required"
[ -n "${MM_TOKENIZER:-}" ] || mm_die "MM_TOKENIZER is required"
if [ -z "${MM_PYTHON:-}" ]; then
  if [ -z "${MM_CONTAINER_IMAGE:-}" ] && [ -x "$MM_REPO/.venv/bin/python" ]; then
    MM_PYTHON="$MM_REPO/.venv/bin/python"
  else
    MM_PYTHON=python3
  fi
fi
MM_CONTAINER_IMAGE="${MM_CONTAINER_IMAGE:-}"
MM_CONTAINER_MOUNTS="${MM_CONTAINER_MOUNTS:-}"
MM_SRUN_ARGS="${MM_SRUN_ARGS:-}"
MM_SRUN_WAIT="${MM_SRUN_WAIT:-120}"
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
