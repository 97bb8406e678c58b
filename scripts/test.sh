#!/usr/bin/env bash
# Run the test suite (the README's test command; CI runs exactly this). Extra arguments go
# to pytest. What it needs is installed first: the virtual environment, the demo data, and,
# when running as root, Debian's slurm-wlm, munge and shellcheck for the launch tests (a
# local SLURM cluster; without them those tests are skipped with the reason, unless
# MM_REQUIRE_SLURM=1). GPU tests (-m gpu) and slow ones (-m slow) are run on purpose.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
    && ! { command -v slurmctld && command -v munged && command -v shellcheck; } >/dev/null 2>&1; then
  echo "[test] installing slurm-wlm, munge and shellcheck for the launch tests" >&2
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
      slurm-wlm munge shellcheck; } >/tmp/mm-apt.log 2>&1 \
    || echo "[test] apt-get failed (see /tmp/mm-apt.log): launch tests will say why" >&2
fi
bash scripts/prepare_demo_data.sh >/dev/null
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -m "not slow and not gpu" "$@"
