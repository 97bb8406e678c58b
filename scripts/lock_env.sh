#!/usr/bin/env bash
# Make requirements.lock from requirements.txt: resolve requirements.txt in a new, empty
# virtual environment and record every installed package at its exact version (transitively).
#   bash scripts/lock_env.sh            write requirements.lock
#   bash scripts/lock_env.sh --check    resolve again and show how it differs from the lock
# Upgrading the environment is a deliberate commit: run this, then the transformers matrix
# (tools/transformers_matrix.py) and the whole suite (scripts/test.sh) on the new lock.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
mode="${1:-write}"
case "$mode" in write|--check) ;; *) echo "usage: $0 [--check]" >&2; exit 2 ;; esac
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$py" -m venv "$work/venv"
echo "[lock] resolving requirements.txt in a new virtual environment" >&2
"$work/venv/bin/pip" install -q --disable-pip-version-check -r "$root/requirements.txt"
{
  echo "# Every package of the project's environment at its exact version, made from"
  echo "# requirements.txt by 'bash scripts/lock_env.sh' with $("$work/venv/bin/python" -V)."
  echo "# Installed by scripts/setup_env.sh; do not edit by hand."
  # A CPU build reports torch as 2.13.0+cpu; the lock names the release so that a GPU
  # machine installs its own build of the same version.
  "$work/venv/bin/pip" freeze --disable-pip-version-check --exclude-editable \
    | sed -E 's/^(torch==[^+]+)\+.*/\1/' | LC_ALL=C sort -f
} > "$work/requirements.lock"
if [ "$mode" = --check ]; then
  if diff -u "$root/requirements.lock" "$work/requirements.lock"; then
    echo "[lock] requirements.lock is current" >&2
  else
    echo "[lock] requirements.lock differs from a fresh resolution (above)" >&2; exit 1
  fi
else
  mv "$work/requirements.lock" "$root/requirements.lock.tmp"
  mv "$root/requirements.lock.tmp" "$root/requirements.lock"
  echo "[lock] wrote requirements.lock ($(grep -vc '^#' "$root/requirements.lock") packages)" >&2
fi
