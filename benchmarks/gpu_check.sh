#!/bin/bash
# One-command GPU check of the MM v2 hot path (see benchmarks/gpu_check.py for the parts and
# the targets). Fits in 10 minutes on one H100/H200, needs no network, and prints one table.
#
#   bash benchmarks/gpu_check.sh                 # full check on the visible GPU
#   bash benchmarks/gpu_check.sh --smoke         # tiny shapes; also runs on a CPU-only machine
#   bash benchmarks/gpu_check.sh --parts memories,step --json check.json
#
# Environment: MM_PYTHON (interpreter; default <repo>/.venv/bin/python if present, else
# python3), MM_CHECK_TIMEOUT (hard limit for the whole check in seconds, default 600).
# Requires torch (with CUDA for the full check); Transformer Engine and Triton are optional.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python="${MM_PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
limit="${MM_CHECK_TIMEOUT:-600}"

smoke=0
for arg in "$@"; do
    [[ "$arg" == "--smoke" ]] && smoke=1
done
if [[ "$smoke" == 0 ]] && ! "$python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu_check: no CUDA device visible to $python; run with --smoke for the CPU self-test" >&2
    exit 2
fi

export CUDA_DEVICE_MAX_CONNECTIONS=1
export PYTHONUNBUFFERED=1
# The parts leave ~30 s of the limit for start-up and the table.
exec timeout --signal=TERM --kill-after=10 "$limit" "$python" benchmarks/gpu_check.py \
    --budget "$((limit - 30))" "$@"
