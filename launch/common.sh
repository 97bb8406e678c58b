# shellcheck shell=bash
# Shared functions of the launch scripts in launch/. Sourced, never run. The job scripts
# (mm8b.sh, mm1b5.sh, transformer8b.sh, transformer1b5.sh, mm8b_32k.sh) hold only their
# #SBATCH lines, their defaults (_mm_script, MM_CONFIG, MM_FINETUNE_FROM) and the bootstrap that
# finds this file, then call mm_train_main; preprocess.sh shares the bootstrap and
# mm_common_defaults and uses the helpers. launch/README.md describes the whole life of a job and
# is the one reference of the MM_* variables read here and by the scripts.
#
# Exit statuses of the training program (its contract):
#   0   training finished
#   75  stopped gracefully at a step boundary after saving a checkpoint (signal or stop file)
#   *   failure
# Exit statuses of a job script (the batch shell):
#   0   training finished, or the job was requeued
#   1   failure, or the requeue guard stopped the job (the log says which)
#   2   bad settings (the log says which)
#   75  stopped gracefully and not requeued (MM_REQUEUE=0, SIGUSR2 or SIGTERM)
# A failed health check counts as a failed start with status 3.

_MM_EXIT_STOPPED=75

# Signals, the training step and the time limit.
# shellcheck source=launch/common_signals.sh
source "$(dirname "${BASH_SOURCE[0]}")/common_signals.sh"
# The per-node health check.
# shellcheck source=launch/common_health.sh
source "$(dirname "${BASH_SOURCE[0]}")/common_health.sh"

# ----------------------------------------------------------------------------- logging
mm_log() {
  printf '[%s %s%s] %s\n' "${_mm_script:-launch}" "$(date '+%Y-%m-%dT%H:%M:%S')" \
    "${SLURM_JOB_ID:+ job $SLURM_JOB_ID}" "$*" >&2
}

mm_die() {
  mm_log "ERROR: $*"
  exit "${_mm_die_status:-2}"
}

# A decimal integer (no sign), or fail with a message naming the variable.
mm_require_uint() {
  local name="$1" value="$2"
  [[ "$value" =~ ^[0-9]+$ ]] || mm_die "$name must be a non-negative integer, got '$value'"
}

# ----------------------------------------------------------------------------- repository
# The repository root. Inside a batch job the script runs from a copy in the spool directory,
# so its own path says nothing; use MM_REPO, else the submitted script's path from scontrol,
# else the submit directory, else this file's location.
mm_find_repo() {
  if [ -n "${MM_REPO:-}" ]; then
    [ -f "$MM_REPO/launch/common.sh" ] || mm_die "MM_REPO=$MM_REPO holds no launch/common.sh"
    (cd "$MM_REPO" && pwd)
    return
  fi
  local cand cmd
  if [ -n "${SLURM_JOB_ID:-}" ] && command -v scontrol >/dev/null 2>&1; then
    cmd="$(scontrol show job "$SLURM_JOB_ID" -o 2>/dev/null | tr ' ' '\n' \
      | sed -n 's/^Command=//p' | head -n1)" || true
    if [ -n "$cmd" ] && [ -f "$(dirname "$cmd")/common.sh" ]; then
      (cd "$(dirname "$cmd")/.." && pwd)
      return
    fi
  fi
  for cand in "${SLURM_SUBMIT_DIR:-}" "$(dirname "${BASH_SOURCE[0]}")/.."; do
    if [ -n "$cand" ] && [ -f "$cand/launch/common.sh" ]; then
      (cd "$cand" && pwd)
      return
    fi
  done
  mm_die "cannot find the repository root; set MM_REPO or submit from the repository root"
}

# $1 made absolute against the repository root (MM_REPO must be set).
mm_abspath() {
  case "$1" in
    /*) printf '%s\n' "$1" ;;
    *) printf '%s/%s\n' "$MM_REPO" "$1" ;;
  esac
}

# ----------------------------------------------------------------------------- settings
# Defaults every job shares (training and preprocessing): the repository root (exported), the
# interpreter, the container and the srun flags.
mm_common_defaults() {
  MM_REPO="$(mm_find_repo)"
  export MM_REPO
  MM_CONTAINER_IMAGE="${MM_CONTAINER_IMAGE:-}"
  MM_CONTAINER_MOUNTS="${MM_CONTAINER_MOUNTS:-}"
  MM_SRUN_ARGS="${MM_SRUN_ARGS:-}"
  MM_SRUN_WAIT="${MM_SRUN_WAIT:-120}"
  if [ -z "${MM_PYTHON:-}" ]; then
    if [ -z "$MM_CONTAINER_IMAGE" ] && [ -x "$MM_REPO/.venv/bin/python" ]; then
      MM_PYTHON="$MM_REPO/.venv/bin/python"
    else
      MM_PYTHON=python3
    fi
  fi
}

# Defaults for everything a site may change in a training job. Callers set _mm_script,
# MM_RUN_NAME and MM_CONFIG defaults before calling this.
mm_defaults() {
  mm_common_defaults
  MM_RUN_NAME="${MM_RUN_NAME:-${_mm_script:-run}}"
  # Relative paths are relative to the repository root (the jobs run there).
  MM_OUTPUT_DIR="$(mm_abspath "${MM_OUTPUT_DIR:-runs/$MM_RUN_NAME}")"
  MM_CKPT_DIR="$(mm_abspath "${MM_CKPT_DIR:-$MM_OUTPUT_DIR/checkpoints}")"
  MM_LOG_DIR="$(mm_abspath "${MM_LOG_DIR:-$MM_OUTPUT_DIR/logs}")"
  MM_STATE_DIR="$(mm_abspath "${MM_STATE_DIR:-$MM_LOG_DIR/launch}")"
  MM_DATA_BLEND="${MM_DATA_BLEND:-}"
  MM_TOKENIZER="${MM_TOKENIZER:-}"
  MM_EXTRA_ARGS="${MM_EXTRA_ARGS:-}"
  MM_SITE_ENV="${MM_SITE_ENV:-}"
  MM_TRAIN_CMD="${MM_TRAIN_CMD:-$MM_PYTHON pretrain/pretrain_mm.py}"
  # GPUs per node: explicit, else what the allocation says, else 8. 0 = CPU mode (gloo).
  if [ -z "${MM_GPUS_PER_NODE:-}" ]; then
    MM_GPUS_PER_NODE="${SLURM_GPUS_PER_NODE:-8}"
    MM_GPUS_PER_NODE="${MM_GPUS_PER_NODE##*:}"   # "h100:8" -> "8"
  fi
  mm_require_uint MM_GPUS_PER_NODE "$MM_GPUS_PER_NODE"
  if [ -z "${MM_TASKS_PER_NODE:-}" ]; then
    if [ "$MM_GPUS_PER_NODE" -gt 0 ]; then
      MM_TASKS_PER_NODE="$MM_GPUS_PER_NODE"
    else
      MM_TASKS_PER_NODE="${SLURM_NTASKS_PER_NODE:-1}"
      MM_TASKS_PER_NODE="${MM_TASKS_PER_NODE%%(*}"
    fi
  fi
  mm_require_uint MM_TASKS_PER_NODE "$MM_TASKS_PER_NODE"
  [ "$MM_TASKS_PER_NODE" -ge 1 ] || mm_die "MM_TASKS_PER_NODE must be at least 1"
  MM_HEALTH_CHECK="${MM_HEALTH_CHECK:-1}"
  MM_HEALTH_TIMEOUT="${MM_HEALTH_TIMEOUT:-180}"
  MM_HEALTH_PYTHON="${MM_HEALTH_PYTHON:-1}"
  MM_HEALTH_MIN_FREE_GB="${MM_HEALTH_MIN_FREE_GB:-5}"
  MM_DRAIN_BAD_NODES="${MM_DRAIN_BAD_NODES:-0}"
  MM_REQUEUE="${MM_REQUEUE:-1}"
  MM_MAX_FAILURES="${MM_MAX_FAILURES:-3}"
  MM_MAX_NO_PROGRESS="${MM_MAX_NO_PROGRESS:-3}"
  MM_MAX_STARTS="${MM_MAX_STARTS:-100}"
  MM_FATAL_STATUSES="${MM_FATAL_STATUSES-2}"
  MM_FINETUNE_FROM="${MM_FINETUNE_FROM:-}"
  MM_FINETUNE_KEY="${MM_FINETUNE_KEY:-checkpoint.init_from}"
  MM_DRY_RUN="${MM_DRY_RUN:-0}"
  MM_NODE_LOGS="${MM_NODE_LOGS:-0}"
  MM_GUARD_MAIL="${MM_GUARD_MAIL:-}"
  [ -z "${MM_SIGNAL_LEAD:-}" ] || mm_require_uint MM_SIGNAL_LEAD "$MM_SIGNAL_LEAD"
  local v
  for v in MM_SRUN_WAIT MM_HEALTH_TIMEOUT MM_HEALTH_MIN_FREE_GB MM_MAX_FAILURES \
    MM_MAX_NO_PROGRESS MM_MAX_STARTS; do
    mm_require_uint "$v" "${!v}"
  done
  for v in MM_HEALTH_CHECK MM_HEALTH_PYTHON MM_DRAIN_BAD_NODES MM_REQUEUE MM_DRY_RUN \
    MM_NODE_LOGS; do
    [[ "${!v}" =~ ^[01]$ ]] || mm_die "$v must be 0 or 1, got '${!v}'"
  done
  # Read by the health check, which runs in a fresh shell on every node.
  export MM_RUN_NAME MM_OUTPUT_DIR MM_CKPT_DIR MM_LOG_DIR MM_STATE_DIR MM_PYTHON MM_DATA_BLEND \
    MM_GPUS_PER_NODE MM_TASKS_PER_NODE MM_HEALTH_PYTHON MM_HEALTH_MIN_FREE_GB
}

# Environment of the training processes: NCCL, Triton/Inductor caches, threads. Every value is
# a default; what the submitting shell or MM_SITE_ENV exported wins.
mm_runtime_env() {
  if [ -n "$MM_SITE_ENV" ]; then
    [ -f "$MM_SITE_ENV" ] || mm_die "MM_SITE_ENV=$MM_SITE_ENV does not exist"
    mm_log "sourcing site environment $MM_SITE_ENV"
    # shellcheck disable=SC1090
    source "$MM_SITE_ENV"
  fi
  export PYTHONUNBUFFERED=1
  # Megatron's tensor/sequence-parallel overlap needs one hardware queue per device.
  export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
  export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
  # Fail (and let the requeue logic restart) instead of hanging on a dead peer.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
  # Flight recorder: on a collective timeout every rank dumps its last collectives here.
  export TORCH_NCCL_DUMP_ON_TIMEOUT="${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}"
  export TORCH_FR_BUFFER_SIZE="${TORCH_FR_BUFFER_SIZE:-2000}"
  export TORCH_FR_DUMP_TEMP_FILE="${TORCH_FR_DUMP_TEMP_FILE:-$MM_LOG_DIR/flight_recorder/rank_}"
  [ "$MM_DRY_RUN" = 1 ] || mkdir -p "$MM_LOG_DIR/flight_recorder"
  export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
  export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
  # Triton and Inductor caches on node-local disk: a shared file system is slow and racy for
  # them. One cache per user, kept across requeues of the job.
  local local_tmp="${MM_LOCAL_TMP:-${TMPDIR:-/tmp}}"
  export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$local_tmp/mm-triton-$(id -un)}"
  export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$local_tmp/mm-inductor-$(id -un)}"
  if [ -z "${OMP_NUM_THREADS:-}" ]; then
    local cpus="${SLURM_CPUS_ON_NODE:-1}"
    cpus="${cpus%%(*}"
    [[ "$cpus" =~ ^[0-9]+$ ]] || cpus=1
    OMP_NUM_THREADS=$((cpus / MM_TASKS_PER_NODE))
    [ "$OMP_NUM_THREADS" -ge 1 ] || OMP_NUM_THREADS=1
    [ "$OMP_NUM_THREADS" -le 8 ] || OMP_NUM_THREADS=8
    export OMP_NUM_THREADS
  fi
}

# ----------------------------------------------------------------------------- rendezvous
mm_is_ipv4() { [[ "$1" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]]; }
mm_is_loopback() { [[ "$1" =~ ^127\. ]] || [ "$1" = "::1" ] || [ "$1" = localhost ]; }

# The rendezvous address: the NodeAddr of the first host of the allocation, as SLURM knows it.
# MM_MASTER_ADDR overrides (for example an InfiniBand host name). There is no fallback: when the
# host cannot be resolved the job fails here, instead of every node rendezvousing with itself.
mm_resolve_master_addr() {
  local _mm_die_status=2
  if [ -n "${MM_MASTER_ADDR:-}" ]; then
    printf '%s\n' "$MM_MASTER_ADDR"
    return 0
  fi
  [ -n "${SLURM_JOB_NODELIST:-}" ] \
    || mm_die "rendezvous: SLURM_JOB_NODELIST is not set (not inside a SLURM allocation?); set MM_MASTER_ADDR to run elsewhere"
  command -v scontrol >/dev/null 2>&1 || mm_die "rendezvous: scontrol not found in PATH"
  local hosts first node_line addr ip
  hosts="$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null)" \
    || mm_die "rendezvous: 'scontrol show hostnames $SLURM_JOB_NODELIST' failed"
  first="$(printf '%s\n' "$hosts" | sed -n '1p')"
  [ -n "$first" ] || mm_die "rendezvous: no host in SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST'"
  node_line="$(scontrol show node "$first" -o 2>/dev/null)" \
    || mm_die "rendezvous: 'scontrol show node $first' failed"
  addr="$(printf '%s\n' "$node_line" | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n1)"
  if [ -z "$addr" ] || [ "$addr" = "(null)" ]; then
    addr="$(printf '%s\n' "$node_line" | tr ' ' '\n' | sed -n 's/^NodeHostName=//p' | head -n1)"
  fi
  { [ -n "$addr" ] && [ "$addr" != "(null)" ]; } \
    || mm_die "rendezvous: SLURM reports no NodeAddr/NodeHostName for node '$first'"
  if mm_is_ipv4 "$addr" || [[ "$addr" == *:* ]]; then
    ip="$addr"
  else
    ip="$(getent ahosts "$addr" 2>/dev/null | awk 'NR==1 {print $1}')"
    [ -n "$ip" ] || mm_die "rendezvous: NodeAddr '$addr' of node '$first' does not resolve on $(hostname); set MM_MASTER_ADDR"
  fi
  if mm_is_loopback "$ip"; then
    # Loopback only works when every node of the allocation is this same machine.
    local distinct
    distinct="$(scontrol show node "$SLURM_JOB_NODELIST" -o 2>/dev/null | tr ' ' '\n' \
      | sed -n 's/^NodeHostName=//p' | sort -u | grep -c . || true)"
    [ "$distinct" = 1 ] \
      || mm_die "rendezvous: node '$first' resolves to loopback '$ip' but the allocation spans $distinct hosts; fix NodeAddr or set MM_MASTER_ADDR"
  fi
  printf '%s\n' "$addr"
}

# A port that is the same on every start of a job (requeues included) and differs between jobs.
mm_master_port() {
  if [ -n "${MM_MASTER_PORT:-}" ]; then
    printf '%s\n' "$MM_MASTER_PORT"
  else
    printf '%s\n' "$((20000 + ${SLURM_JOB_ID:-0} % 20000))"
  fi
}

# ----------------------------------------------------------------------------- data and overrides
# MM_DATA_BLEND "w1 prefix1 w2 prefix2" (spaces or commas, brackets optional) or one prefix.
mm_blend_items() {
  local s="$1"
  s="${s#[}"; s="${s%]}"
  printf '%s\n' "$s" | tr ',' ' ' | tr -s '[:space:]' '\n' | sed '/^$/d'
}

mm_blend_override() {
  local -a items
  mapfile -t items < <(mm_blend_items "$1")
  [ "${#items[@]}" -gt 0 ] || return 0
  if [ "${#items[@]}" -gt 1 ] && [ $(( ${#items[@]} % 2 )) -ne 0 ]; then
    mm_die "MM_DATA_BLEND must be one prefix or weight/prefix pairs, got ${#items[@]} items"
  fi
  local IFS=,
  printf 'data.train_blend=[%s]\n' "${items[*]}"
}

# Data prefixes named by MM_DATA_BLEND (every second item of a weighted blend).
mm_blend_prefixes() {
  local -a items
  mapfile -t items < <(mm_blend_items "$1")
  if [ "${#items[@]}" -eq 1 ]; then
    printf '%s\n' "${items[0]}"
    return
  fi
  local i
  for ((i = 1; i < ${#items[@]}; i += 2)); do printf '%s\n' "${items[i]}"; done
}

# ----------------------------------------------------------------------------- progress state
# The tracker file's name: mm_megatron.checkpoint.format.TRACKER (a test keeps them equal).
_mm_tracker_name="latest_checkpointed_iteration.txt"
mm_latest_iter() {
  local f="$MM_CKPT_DIR/$_mm_tracker_name" v
  if [ -f "$f" ]; then
    v="$(tr -d '[:space:]' <"$f")"
    if [[ "$v" =~ ^[0-9]+$ ]]; then
      printf '%s\n' "$v"
      return
    fi
    mm_log "warning: $f holds '$v', not an iteration; counting it as 0"
    printf '0\n'
    return
  fi
  printf -- '-1\n'
}

# "none" for -1 (no checkpoint yet), else the iteration.
mm_iter_label() {
  if [ "$1" -lt 0 ]; then echo "none"; else echo "$1"; fi
}

# The requeue state of this job lives in one key=value file per job id, so a fresh sbatch starts
# with fresh counters while requeues of the same job share them.
mm_state_file() { printf '%s/job-%s.state\n' "$MM_STATE_DIR" "${SLURM_JOB_ID:-nojob}"; }

mm_state_load() {
  _st_starts=0; _st_failures=0; _st_no_progress=0; _st_running=0; _st_start_iter=-1; _st_last_rc=
  local f k v
  f="$(mm_state_file)"
  [ -f "$f" ] || return 0
  while IFS='=' read -r k v; do
    case "$k" in
      starts | failures | no_progress | running | start_iter | last_rc)
        printf -v "_st_$k" '%s' "$v" ;;
    esac
  done <"$f"
}

mm_state_save() {
  local f tmp
  f="$(mm_state_file)"
  tmp="$f.tmp.$$"
  {
    echo "job_id=${SLURM_JOB_ID:-}"
    echo "starts=$_st_starts"
    echo "failures=$_st_failures"
    echo "no_progress=$_st_no_progress"
    echo "running=$_st_running"
    echo "start_iter=$_st_start_iter"
    echo "last_rc=$_st_last_rc"
    echo "updated=$(date '+%Y-%m-%dT%H:%M:%S')"
  } >"$tmp"
  mv -f "$tmp" "$f"
}

# Counts the run that just ended: $1 = its status, $2 = latest iteration now.
mm_state_account() {
  local rc="$1" now="$2"
  if [ "$now" -gt "$_st_start_iter" ]; then
    _st_no_progress=0
    _st_failures=0
  else
    _st_no_progress=$((_st_no_progress + 1))
  fi
  if [ "$rc" != 0 ] && [ "$rc" != "$_MM_EXIT_STOPPED" ]; then
    _st_failures=$((_st_failures + 1))
  fi
  _st_running=0
  _st_last_rc="$rc"
}

# Whether another start is allowed. Prints the reason and returns 1 when a guard trips.
mm_guard_reason() {
  if [ "$_st_failures" -ge "$MM_MAX_FAILURES" ]; then
    echo "$_st_failures consecutive failed starts (cap MM_MAX_FAILURES=$MM_MAX_FAILURES)"
    return 1
  fi
  if [ "$_st_no_progress" -ge "$MM_MAX_NO_PROGRESS" ]; then
    echo "no progress since checkpoint $(mm_iter_label "$_st_start_iter") over the last $_st_no_progress starts (cap MM_MAX_NO_PROGRESS=$MM_MAX_NO_PROGRESS)"
    return 1
  fi
  if [ "$_st_starts" -ge "$MM_MAX_STARTS" ]; then
    echo "$_st_starts starts of this job (cap MM_MAX_STARTS=$MM_MAX_STARTS)"
    return 1
  fi
  return 0
}

# Called when a start begins. A previous start that never recorded its end (node failure,
# hard kill, preemption by SLURM) is accounted here; a tripped guard ends the job now.
mm_state_begin() {
  mkdir -p "$MM_STATE_DIR"
  mm_state_load
  local now reason
  now="$(mm_latest_iter)"
  if [ "$_st_running" = 1 ]; then
    # Not known to be a failure (SLURM may have preempted it): only the progress guard counts it.
    mm_log "the previous start (from checkpoint $(mm_iter_label "$_st_start_iter")) ended without reporting; latest checkpoint now $(mm_iter_label "$now")"
    mm_state_account "$_MM_EXIT_STOPPED" "$now"
    if ! reason="$(mm_guard_reason)"; then
      mm_state_save
      mm_log "REQUEUE GUARD: not starting again: $reason"
      mm_guard_mail "$reason"
      exit 1
    fi
  fi
  _st_starts=$((_st_starts + 1))
  _st_running=1
  _st_start_iter="$now"
  mm_state_save
  _mm_start_iter="$now"
}

# ----------------------------------------------------------------------------- requeue
mm_requeue() {
  # The requeue cancels this batch shell; ignore the signals it brings.
  trap '' TERM USR1 USR2
  if ! command -v scontrol >/dev/null 2>&1 || [ -z "${SLURM_JOB_ID:-}" ]; then
    mm_log "ERROR: cannot requeue: not a SLURM job or no scontrol"
    return 1
  fi
  if scontrol requeue "$SLURM_JOB_ID"; then
    mm_log "requeued job $SLURM_JOB_ID; the next start resumes from the latest checkpoint"
    return 0
  fi
  mm_log "ERROR: 'scontrol requeue $SLURM_JOB_ID' failed (was the job submitted with --requeue?)"
  return 1
}

# Mail MM_GUARD_MAIL (if set) that a guard stopped the job: $1 = the reason.
mm_guard_mail() {
  [ -n "${MM_GUARD_MAIL:-}" ] || return 0
  local subject="[$MM_RUN_NAME] job ${SLURM_JOB_ID:-?} stopped by the requeue guard"
  if command -v mail >/dev/null 2>&1; then
    printf '%s\n\nLog: %s\nState: %s\n' "$1" "$(scontrol show job "${SLURM_JOB_ID:-0}" -o \
      2>/dev/null | tr ' ' '\n' | sed -n 's/^StdOut=//p')" "$(mm_state_file)" \
      | mail -s "$subject" "$MM_GUARD_MAIL" && mm_log "mailed $MM_GUARD_MAIL" && return 0
  fi
  mm_log "warning: could not mail $MM_GUARD_MAIL (no working 'mail' command)"
}

# Decide what follows a run that ended with status $1 and exit the batch shell accordingly.
mm_finish() {
  local rc="$1" now reason
  now="$(mm_latest_iter)"
  mm_state_account "$rc" "$now"
  mm_state_save
  if [ "$rc" = 0 ]; then
    mm_log "training finished (latest checkpoint: $(mm_iter_label "$now"))"
    exit 0
  fi
  if [ "$rc" = "$_MM_EXIT_STOPPED" ]; then
    mm_log "training stopped gracefully; latest checkpoint $(mm_iter_label "$now") (this start began at $(mm_iter_label "$_mm_start_iter"))"
  else
    mm_log "training failed with $(mm_status_text "$rc"); latest checkpoint $(mm_iter_label "$now") (this start began at $(mm_iter_label "$_mm_start_iter"))"
  fi
  if [ "$MM_REQUEUE" != 1 ]; then
    mm_log "not requeueing: MM_REQUEUE=0"
    exit "$( [ "$rc" = "$_MM_EXIT_STOPPED" ] && echo "$_MM_EXIT_STOPPED" || echo 1)"
  fi
  if [[ " $MM_FATAL_STATUSES " == *" $rc "* ]]; then
    mm_log "not requeueing: status $rc is final (MM_FATAL_STATUSES=\"$MM_FATAL_STATUSES\"; 2 is the training program's configuration error)"
    exit 1
  fi
  if [ -n "${_mm_no_requeue_reason:-}" ]; then
    mm_log "not requeueing: $_mm_no_requeue_reason"
    exit "$( [ "$rc" = "$_MM_EXIT_STOPPED" ] && echo "$_MM_EXIT_STOPPED" || echo 1)"
  fi
  if ! reason="$(mm_guard_reason)"; then
    mm_log "REQUEUE GUARD: not requeueing: $reason; fix the cause and resubmit (a new job resumes from checkpoint $(mm_iter_label "$now"))"
    mm_guard_mail "$reason"
    exit 1
  fi
  mm_log "requeueing: start $_st_starts of at most $MM_MAX_STARTS; consecutive failures $_st_failures of $MM_MAX_FAILURES; starts without progress $_st_no_progress of $MM_MAX_NO_PROGRESS"
  mm_requeue || exit 1
  exit 0
}

# ----------------------------------------------------------------------------- srun
# Common srun options: containers (pyxis), extra site flags.
mm_srun_common() {
  _mm_srun=(srun --export=ALL --kill-on-bad-exit=0 --wait="$MM_SRUN_WAIT")
  if [ -n "$MM_CONTAINER_IMAGE" ]; then
    _mm_srun+=(--container-image="$MM_CONTAINER_IMAGE" --container-workdir="$MM_REPO")
    [ -z "$MM_CONTAINER_MOUNTS" ] || _mm_srun+=(--container-mounts="$MM_CONTAINER_MOUNTS")
  fi
  if [ -n "$MM_SRUN_ARGS" ]; then
    local -a extra
    read -r -a extra <<<"$MM_SRUN_ARGS"
    _mm_srun+=("${extra[@]}")
  fi
}

# The section.key=value overrides of the training command (in _mm_overrides): the run's
# directories, MM_DATA_BLEND, MM_TOKENIZER, MM_FINETUNE_FROM, MM_EXTRA_ARGS, then "$@".
# Also used by launch/check.sh, so that the check sees what the job would run.
mm_job_overrides() {
  local -a extra
  _mm_overrides=("checkpoint.dir=$MM_CKPT_DIR" "logging.dir=$MM_LOG_DIR" "runtime.stop_file=$MM_STOP_FILE")
  local blend
  blend="$(mm_blend_override "$MM_DATA_BLEND")" || exit 2
  [ -z "$blend" ] || _mm_overrides+=("$blend")
  [ -z "$MM_TOKENIZER" ] || _mm_overrides+=("data.tokenizer=$MM_TOKENIZER")
  if [ -n "$MM_FINETUNE_FROM" ]; then
    # Initialise from the pretrained checkpoint. The training program uses it only while
    # MM_CKPT_DIR holds no checkpoint; later starts resume from the fine-tuning checkpoints.
    MM_FINETUNE_FROM="$(mm_abspath "$MM_FINETUNE_FROM")"
    if [ "$(mm_latest_iter)" -lt 0 ] && [ ! -d "$MM_FINETUNE_FROM" ] && [ "$MM_DRY_RUN" != 1 ]; then
      mm_die "MM_FINETUNE_FROM=$MM_FINETUNE_FROM does not exist (no checkpoint to fine-tune from)"
    fi
    _mm_overrides+=("$MM_FINETUNE_KEY=$MM_FINETUNE_FROM")
  fi
  read -r -a extra <<<"$MM_EXTRA_ARGS"
  _mm_overrides+=("${extra[@]}" "$@")
}

# ----------------------------------------------------------------------------- main
# The life of one start of a training job. Callers set _mm_script and defaults, then call this
# with the script's arguments (extra section.key=value overrides).
mm_train_main() {
  [ "${MM_DRY_RUN:-0}" = 1 ] || mm_install_traps
  mm_defaults
  if [ -z "${SLURM_JOB_ID:-}" ] && [ "$MM_DRY_RUN" != 1 ]; then
    mm_die "not inside a SLURM job: submit with 'sbatch launch/${_mm_script}.sh' (see launch/README.md)"
  fi
  cd "$MM_REPO" || mm_die "cannot cd to $MM_REPO"
  [ -f "$MM_CONFIG" ] || [ "$MM_DRY_RUN" = 1 ] || mm_die "config $MM_CONFIG not found (MM_CONFIG)"
  local -a cmd overrides
  read -r -a cmd <<<"$MM_TRAIN_CMD"
  [ "${#cmd[@]}" -gt 0 ] || mm_die "MM_TRAIN_CMD is empty"
  [ "$MM_DRY_RUN" = 1 ] || mkdir -p "$MM_CKPT_DIR" "$MM_LOG_DIR" "$MM_STATE_DIR"

  local nodes="${SLURM_JOB_NUM_NODES:-1}" addr port
  mm_require_uint SLURM_JOB_NUM_NODES "$nodes"
  local ntasks=$((nodes * MM_TASKS_PER_NODE))
  addr="$(mm_resolve_master_addr)" || exit 2
  port="$(mm_master_port)"
  export MASTER_ADDR="$addr" MASTER_PORT="$port"
  export WORLD_SIZE="$ntasks"
  mm_runtime_env

  MM_STOP_FILE="$(mm_abspath "${MM_STOP_FILE:-$MM_STATE_DIR/stop-${SLURM_JOB_ID:-0}}")"
  mm_job_overrides "$@"
  overrides=("${_mm_overrides[@]}")

  mm_srun_common
  local -a step=("${_mm_srun[@]}" --nodes="$nodes" --ntasks-per-node="$MM_TASKS_PER_NODE"
    --ntasks="$ntasks")
  if [ -n "${SLURM_CPUS_ON_NODE:-}" ]; then
    local cpus="${SLURM_CPUS_ON_NODE%%(*}" cpt
    cpt=$((cpus / MM_TASKS_PER_NODE))
    [ "$cpt" -lt 1 ] || step+=(--cpus-per-task="$cpt")
  fi
  if [ "$MM_GPUS_PER_NODE" -gt 0 ] && [ -n "${SLURM_GPUS_PER_NODE:-}${SLURM_JOB_GPUS:-}" ]; then
    step+=(--gpus-per-node="$MM_GPUS_PER_NODE")
  fi
  if [ "$MM_NODE_LOGS" = 1 ]; then
    # The training output in one log per node (%N); the job log keeps the batch shell's lines.
    [ "$MM_DRY_RUN" = 1 ] || mkdir -p "$MM_LOG_DIR/nodes"
    step+=(--output="$MM_LOG_DIR/nodes/%j-%N.log" --open-mode=append)
  fi
  step+=("${cmd[@]}" --config "$MM_CONFIG" "${overrides[@]}")

  if [ "$MM_DRY_RUN" = 1 ]; then
    mm_log "dry run; MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
    printf '%q ' "${step[@]}"
    printf '\n'
    return 0
  fi

  mm_check_signal_lead
  mm_state_begin
  mm_log "start $_st_starts of job $SLURM_JOB_ID (SLURM restart count ${SLURM_RESTART_COUNT:-0}): $MM_RUN_NAME"
  mm_log "nodes $nodes ($SLURM_JOB_NODELIST) x $MM_TASKS_PER_NODE tasks, GPUs per node $MM_GPUS_PER_NODE$( [ "$MM_GPUS_PER_NODE" = 0 ] && echo ' (CPU mode, gloo)')"
  mm_log "rendezvous $MASTER_ADDR:$MASTER_PORT; config $MM_CONFIG"
  mm_log "time limit $( [ -n "$_mm_time_limit" ] && echo "${_mm_time_limit} s" || echo "none/unknown"); time-limit signal lead $( [ -n "$_mm_signal_lead" ] && echo "${_mm_signal_lead} s ($_mm_signal_lead_src)" || echo "unknown (set MM_SIGNAL_LEAD)")"
  mm_log "checkpoints $MM_CKPT_DIR (tracker says $(mm_iter_label "$_mm_start_iter"); the program verifies it before resuming, falling back when damaged); logs $MM_LOG_DIR"
  mm_log "commit $(git -C "$MM_REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  rm -f "$MM_STOP_FILE"

  local health=0
  mm_health_check || health=$?
  if [ "$health" = 2 ]; then
    _mm_no_requeue_reason="$_mm_health_job_error"
    mm_finish 3
  elif [ "$health" != 0 ]; then
    mm_finish 3
  fi
  if [ -n "$_mm_stop_signal" ]; then
    mm_log "stop requested (SIG$_mm_stop_signal) before training started"
    mm_finish "$_MM_EXIT_STOPPED"
  fi

  mm_log "launching: $(printf '%q ' "${step[@]}")"
  local rc=0
  mm_run_step "${step[@]}" || rc=$?
  rm -f "$MM_STOP_FILE"
  mm_finish "$rc"
}
