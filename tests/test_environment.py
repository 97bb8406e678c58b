"""The locked environment: requirements.lock pins every package exactly, satisfies
requirements.txt, and is what is installed (scripts/setup_env.sh installs the lock), with the
project itself installed from this checkout."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from paths import ROOT


def _lock() -> dict[str, str]:
    pins = {}
    for n, line in enumerate((ROOT / "requirements.lock").read_text().splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+\-]+", line), f"line {n}: {line}"
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_lock_satisfies_requirements_txt():
    pins = _lock()
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        spec = line.split("#")[0].strip()
        if not spec:
            continue
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is in requirements.txt but not in requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])


def test_installed_environment_is_the_lock():
    """Every locked package is installed at its locked version (a CPU build of torch reports
    a local version such as 2.13.0+cpu)."""
    wrong = {}
    for name, version in _lock().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            wrong[name] = (version, None)
            continue
        if installed.split("+")[0] != version:
            wrong[name] = (version, installed)
    assert not wrong, f"installed versions differ from requirements.lock: {wrong}"


def test_project_is_installed_from_this_checkout(tmp_path: Path):
    """The tools and entry points import mm_megatron and pretrain as installed packages (no
    sys.path edits): from another directory, both resolve to this checkout."""
    assert metadata.version("mm-megatron")
    code = "import mm_megatron, pretrain; print(mm_megatron.__file__); print(pretrain.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, text=True, capture_output=True, check=True
    ).stdout.split()
    assert [Path(f).resolve() for f in out] == [
        ROOT / "mm_megatron" / "__init__.py",
        ROOT / "pretrain" / "__init__.py",
    ]
