#!/bin/bash
#SBATCH --job-name=transformer8b
#SBATCH --nodes=32
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@900
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.log
#
# Transformer baseline, large (8B class) pretraining: the paper's comparison model.
# Config: pretrain/configs/transformer_8b.yaml
#
# Submit from the repository root:
#   sbatch launch/transformer8b.sh [section.key=value ...]
# Default allocation: 32 nodes x 8 GPUs (256 GPUs), whole nodes, 24:00:00 per job, requeued
# until training finishes. SIGUSR1 reaches the batch shell 900 s before the time limit; the
# training program then saves a checkpoint and exits 75, and the job requeues itself; every
# start resumes from the latest checkpoint. Log: ./<job-name>-<job-id>.log, appended per start.
#
# Allocation: change it with sbatch flags (they override the #SBATCH lines above) or the
# SBATCH_* variables sbatch reads (SBATCH_ACCOUNT, SBATCH_PARTITION, SBATCH_QOS,
# SBATCH_TIMELIMIT, SBATCH_GPUS_PER_NODE, SBATCH_OUTPUT, ...), for example
#   sbatch --nodes=16 --account=proj --partition=gpu --time=48:00:00 launch/transformer8b.sh
#   sbatch --gpus-per-node=4 --ntasks-per-node=4 launch/transformer8b.sh    # 4-GPU nodes
#   sbatch --output=/shared/logs/%x-%j.log launch/transformer8b.sh
#
# Environment (all optional; exported at submission, they reach the job):
#   MM_CONFIG            training config YAML (default pretrain/configs/transformer_8b.yaml)
#   MM_RUN_NAME          run name (default transformer8b); names the default output directory
#   MM_OUTPUT_DIR        run directory on a shared file system (default <repo>/runs/$MM_RUN_NAME)
#   MM_CKPT_DIR          checkpoint.dir: save and auto-resume directory (default $MM_OUTPUT_DIR/checkpoints)
#   MM_LOG_DIR           logging.dir: TensorBoard and logs (default $MM_OUTPUT_DIR/logs)
#   MM_STATE_DIR         requeue state, health reports, stop file (default $MM_LOG_DIR/launch)
#   MM_STOP_FILE         runtime.stop_file (default $MM_STATE_DIR/stop-<job id>)
#   MM_DATA_BLEND        data.train_blend: "w1 prefix1 w2 prefix2 ..." (or one prefix); default: the config's
#   MM_TOKENIZER         data.tokenizer (default: the config's)
#   MM_EXTRA_ARGS        more section.key=value overrides, whitespace-separated (arguments to the
#                        script are appended after them)
#   MM_GPUS_PER_NODE     GPUs per node (default: the allocation's --gpus-per-node, else 8);
#                        0 = CPU mode: gloo, MM_TASKS_PER_NODE tasks per node
#   MM_TASKS_PER_NODE    training processes per node (default MM_GPUS_PER_NODE; in CPU mode the
#                        allocation's --ntasks-per-node, else 1)
#   MM_REPO              repository root (default: found from the submitted script's path)
#   MM_PYTHON            Python interpreter (default <repo>/.venv/bin/python if present and no
#                        container, else python3)
#   MM_TRAIN_CMD         training command, whitespace-separated (default "$MM_PYTHON
#                        pretrain/pretrain_mm.py"); it gets --config and the overrides
#   MM_CONTAINER_IMAGE   run the steps in this container (pyxis: srun --container-image)
#   MM_CONTAINER_MOUNTS  pyxis --container-mounts (the repository and the output paths must be
#                        visible at the same paths inside)
#   MM_SRUN_ARGS         extra srun flags, whitespace-separated (e.g. "--label --mpi=pmix")
#   MM_SRUN_WAIT         seconds the other tasks may run on after the first one exits (default 120)
#   MM_SITE_ENV          a file sourced before launching: NCCL_SOCKET_IFNAME, NCCL_IB_HCA, module loads
#   MM_LOCAL_TMP         node-local directory for the Triton and Inductor caches (default $TMPDIR or /tmp)
#   MM_MASTER_ADDR       rendezvous host (default: NodeAddr of the allocation's first node, from
#                        scontrol; the job fails if that cannot be resolved)
#   MM_MASTER_PORT       rendezvous port (default 20000 + job id mod 20000)
#   MM_HEALTH_CHECK      1 = run the per-node health check before training (default 1)
#   MM_HEALTH_TIMEOUT    seconds for the whole health check (default 180)
#   MM_HEALTH_PYTHON     1 = the check imports torch and runs a matmul on every GPU (default 1)
#   MM_HEALTH_MIN_FREE_GB  free space the checkpoint directory needs (default 5; 0 = no check)
#   MM_DRAIN_BAD_NODES   1 = drain nodes that fail the health check (needs operator rights; default 0)
#   MM_REQUEUE           1 = requeue after a graceful stop or a failure (default 1)
#   MM_MAX_FAILURES      stop requeueing after this many consecutive failed starts (default 3)
#   MM_MAX_NO_PROGRESS   stop requeueing after this many consecutive starts that did not advance
#                        the latest checkpoint (default 3)
#   MM_MAX_STARTS        stop requeueing after this many starts of one job (default 100)
#   MM_FATAL_STATUSES    training exit statuses that never requeue (default "2": configuration error)
#   MM_FINETUNE_FROM     checkpoint to initialise from when MM_CKPT_DIR holds none yet (default: none)
#   MM_FINETUNE_KEY      the override that passes it (default checkpoint.init_from)
#   MM_SIGNAL_LEAD       seconds of lead of the time-limit signal (default: SBATCH_SIGNAL, else
#                        the --signal line above). A --signal on the sbatch command line is
#                        invisible to the job: set this with it. A lead not shorter than the
#                        time limit is refused when set here, warned about otherwise
#   MM_NODE_LOGS         1 = the training output goes to $MM_LOG_DIR/nodes/<job>-<node>.log
#                        (one file per node) instead of the job log (default 0)
#   MM_GUARD_MAIL        mail this address when a requeue guard stops the job (needs 'mail')
#   MM_DRY_RUN           1 = print the srun command and exit (default 0)
# NCCL_*, TORCH_NCCL_*, CUDA_DEVICE_MAX_CONNECTIONS, TRITON_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR and
# OMP_NUM_THREADS get defaults in launch/common.sh unless already set.
#
# Signals to the batch shell (scancel --batch --signal=SIG <job>):
#   USR1  stop at the next step boundary, save, requeue (what --signal=B:USR1@900 sends)
#   USR2  stop at the next step boundary, save, do not requeue
#   TERM  forwarded; the program saves and exits; no requeue (scancel, time limit, preemption)
set -euo pipefail
_mm_script=transformer8b
MM_CONFIG="${MM_CONFIG:-pretrain/configs/transformer_8b.yaml}"

# Find launch/common.sh: sbatch runs a copy of this file, so its own path does not help.
_mm_common="${MM_REPO:+$MM_REPO/launch/common.sh}"
if [ -z "$_mm_common" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  _mm_common="$(scontrol show job "$SLURM_JOB_ID" -o 2>/dev/null | tr ' ' '\n' \
    | sed -n 's/^Command=//p' | head -n1)"
  _mm_common="${_mm_common:+$(dirname "$_mm_common")/common.sh}"
fi
for _mm_c in "$_mm_common" "${SLURM_SUBMIT_DIR:-.}/launch/common.sh" \
  "$(dirname "${BASH_SOURCE[0]}")/common.sh"; do
  if [ -n "$_mm_c" ] && [ -f "$_mm_c" ]; then
    # shellcheck source=launch/common.sh
    source "$_mm_c"
    mm_train_main "$@"
    exit $?
  fi
done
echo "[transformer8b] ERROR: cannot find launch/common.sh; set MM_REPO or submit from the repository root" >&2
exit 2
