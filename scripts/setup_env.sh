#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install requirements.lock:
# every package at the exact version the test suite ran with (made from requirements.txt by
# scripts/lock_env.sh). A stamp file records the lock's hash, so a second run installs nothing
# and a changed lock re-installs. Then the project itself (mm_megatron, pretrain) is installed
# editable, without dependencies, so the tools and entry points import it from this checkout.
# Source it or run it; afterwards .venv/bin/python is ready.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MM_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
lock="$root/requirements.lock"
if [ ! -f "$lock" ]; then
  echo "[setup] $lock is missing: make it with 'bash scripts/lock_env.sh'" >&2
  exit 2
fi
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$lock" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing requirements.lock into $venv" >&2
  # torch==2.13.0 and megatron-core come in the same call, so pip never resolves a loose
  # torch requirement to a CUDA build on a machine without a GPU.
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$lock"
  echo "$want" > "$stamp"
fi
# The project, editable (its code is read from this checkout); re-installed when
# pyproject.toml or the checkout's location changes.
project_stamp="$venv/.project.sha256"
want="$( { sha256sum "$root/pyproject.toml" | cut -d' ' -f1; echo "$root"; } | sha256sum | cut -d' ' -f1)"
if [ ! -f "$project_stamp" ] || [ "$(cat "$project_stamp")" != "$want" ]; then
  echo "[setup] installing the project (editable) into $venv" >&2
  "$venv/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation \
    -e "$root"
  echo "$want" > "$project_stamp"
fi
