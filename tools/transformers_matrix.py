"""Run the Hugging Face release's tests (``pytest -m hf``) against several transformers releases,
each in its own virtual environment, and print a table.

    python tools/transformers_matrix.py                        # oldest, 5.0.0, locked, newest
    python tools/transformers_matrix.py --versions 4.57.6 5.0.0 locked
    python tools/transformers_matrix.py --allow-untested       # also load versions past the range

Version names: ``oldest`` (the minimum the export's configuration file accepts), ``locked`` (the
one in requirements.lock, which CI runs), ``newest`` (the newest release the package index
serves) or an exact version. The default adds 5.0.0, the first 5.x release, whose loading
differs from both 4.x and the latest 5.x. Each environment is requirements.lock with the
packages that follow transformers (tokenizers, huggingface_hub, accelerate, peft, lm_eval,
...) left to the resolver; environments are kept under ``--venvs`` and reused. Run it before
changing the lock or the supported range (docs/release.md). Exit status 1 when a supported
version fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILE = ROOT / "mm_megatron" / "hf" / "configuration_memory_mosaics.py"
LOCK = ROOT / "requirements.lock"
# Packages whose versions must move with transformers; everything else keeps its locked pin.
FOLLOWERS = {
    "transformers",
    "tokenizers",
    "huggingface-hub",
    "hf-xet",
    "safetensors",
    "accelerate",
    "peft",
    "lm-eval",
    "datasets",
    "evaluate",
    "fsspec",
}
# Tests whose passing means generate() decodes the same tokens with and without the cache as
# repeated full forwards of the reference (and the user paths built on it).
GENERATION_TESTS = ("test_hf_generation", "test_hf_user_paths")
ALLOW_ENV = "MEMORY_MOSAICS_ALLOW_UNTESTED_TRANSFORMERS"


@dataclass
class Row:
    version: str
    role: str
    status: str = "not run"
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    generation_ok: bool = False
    seconds: float = 0.0
    detail: str = ""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def supported_range() -> tuple[Version, Version]:
    """(minimum, first unsupported minor) as declared by the shipped configuration file."""
    text = CONFIG_FILE.read_text()
    low = re.search(r'^MIN_TRANSFORMERS = "([^"]+)"', text, re.M)
    high = re.search(r'^BELOW_TRANSFORMERS = "([^"]+)"', text, re.M)
    if not (low and high):
        raise SystemExit(f"{CONFIG_FILE}: MIN_TRANSFORMERS / BELOW_TRANSFORMERS not found")
    return Version(low.group(1)), Version(high.group(1))


def lock_pins() -> dict[str, str]:
    """requirements.lock as {normalised name: 'name==version'}."""
    pins = {}
    for n, line in enumerate(LOCK.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "==" not in line:
            raise SystemExit(f"{LOCK}:{n}: expected 'name==version', got {line!r}")
        pins[_norm(line.split("==")[0])] = line
    return pins


def newest_release(python: str) -> str:
    out = subprocess.run(
        [python, "-m", "pip", "index", "versions", "transformers"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"transformers \(([^)]+)\)", out)
    if not match:
        raise SystemExit(f"cannot read the newest transformers from 'pip index versions': {out!r}")
    return match.group(1)


def resolve(names: list[str]) -> list[tuple[str, str]]:
    """[(version, role)] for version names or exact versions, validated."""
    low, _ = supported_range()
    locked = lock_pins()["transformers"].split("==")[1]
    out = []
    for name in names:
        if name == "oldest":
            out.append((str(low), "oldest"))
        elif name == "locked":
            out.append((locked, "locked"))
        elif name == "newest":
            out.append((newest_release(sys.executable), "newest"))
        else:
            try:
                Version(name)
            except InvalidVersion:
                raise SystemExit(
                    f"--versions: {name!r} is not oldest, locked, newest or a version number"
                ) from None
            out.append((name, "given"))
    return out


def in_range(version: str) -> bool:
    low, below = supported_range()
    return low <= Version(version) and Version(version).release[:2] < below.release[:2]


def build_venv(version: str, venvs: Path) -> tuple[Path | None, str]:
    """A virtual environment with the locked set and transformers==version; (python, error)."""
    venv = venvs / f"transformers-{version}"
    python = venv / "bin" / "python"
    pins = lock_pins()
    reqs = [line for name, line in sorted(pins.items()) if name not in FOLLOWERS]
    reqs += sorted(n for n in FOLLOWERS if n in pins and n != "transformers")
    reqs.append(f"transformers=={version}")
    stamp, want = venv / ".matrix-requirements", "\n".join(reqs) + "\n"
    if python.exists() and stamp.exists() and stamp.read_text() == want:
        return python, ""
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    req_file = venv / "requirements.txt"
    req_file.write_text(want)
    error = pip_install(python, "-r", str(req_file))
    if error:
        return None, error
    stamp.write_text(want)
    return python, ""


def pip_install(python: Path, *args: str) -> str:
    """``pip install -q ARGS`` in the environment of ``python``; its last error line or ''."""
    cmd = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        return res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "pip failed"
    return ""


def install_project(python: Path) -> str:
    """This checkout installed editable (no dependencies) into the environment, as
    scripts/setup_env.sh does for .venv, so tools run by the tests import it; error or ''."""
    return pip_install(python, "--no-deps", "--no-build-isolation", "-e", str(ROOT))


def run_tests(
    python: Path, row: Row, report: Path, allow_untested: bool, pytest_args: list[str]
) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.pop(ALLOW_ENV, None)
    if allow_untested:
        env[ALLOW_ENV] = "1"
    cmd = [
        str(python),
        "-m",
        "pytest",
        "-m",
        "hf and not slow and not gpu",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={report}",
        *pytest_args,
    ]
    report.unlink(missing_ok=True)
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if not report.exists():
        row.status, row.detail = "pytest failed", (res.stdout + res.stderr)[-300:]
        return
    gen_ok, gen_seen = True, 0
    for case in ET.parse(report).getroot().iter("testcase"):
        bad = case.find("failure") is not None or case.find("error") is not None
        skipped = case.find("skipped") is not None
        row.failed += bad
        row.skipped += skipped and not bad
        row.passed += not (bad or skipped)
        if any(t in case.get("classname", "") for t in GENERATION_TESTS):
            gen_seen += 1
            gen_ok &= not (bad or skipped)
            if bad and not row.detail:
                node = case.find("failure")
                node = node if node is not None else case.find("error")
                msg = node.get("message", "")
                row.detail = f"{case.get('name')}: {msg.splitlines()[0] if msg else ''}"[:160]
    row.generation_ok = gen_ok and gen_seen > 0
    row.status = "ok" if row.failed == 0 and row.passed else "failed"


def table(rows: list[Row]) -> str:
    head = (
        "transformers",
        "role",
        "range",
        "result",
        "pass/fail/skip",
        "generate == no cache == reference",
        "time",
    )
    lines = [head]
    for r in rows:
        lines.append(
            (
                r.version,
                r.role,
                "supported" if in_range(r.version) else "outside",
                r.status,
                f"{r.passed}/{r.failed}/{r.skipped}",
                "yes" if r.generation_ok else "NO",
                f"{r.seconds:.0f} s",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {r.version}: {r.detail}" for r in rows if r.detail]
    return "\n".join(text + (["", "first failure per version:"] + notes if notes else []))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--versions",
        nargs="+",
        default=["oldest", "5.0.0", "locked", "newest"],
        help="oldest | locked | newest | an exact version (default: oldest 5.0.0 locked newest)",
    )
    p.add_argument(
        "--venvs",
        type=Path,
        default=ROOT / ".cache" / "transformers-matrix",
        help="where the environments are kept and reused",
    )
    p.add_argument(
        "--allow-untested",
        action="store_true",
        help=f"set {ALLOW_ENV}=1, to see whether a version past the range works",
    )
    p.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = []
    args.venvs.mkdir(parents=True, exist_ok=True)
    for version, role in resolve(args.versions):
        row = Row(version, role)
        t0 = time.time()
        print(f"[matrix] transformers {version} ({role}): environment", file=sys.stderr)
        python, error = build_venv(version, args.venvs)
        if python is not None and (error := install_project(python)):
            python = None
        if python is None:
            row.status, row.detail = "install failed", error
        else:
            print(f"[matrix] transformers {version}: pytest -m hf", file=sys.stderr)
            run_tests(
                python,
                row,
                args.venvs / f"report-{version}.xml",
                args.allow_untested,
                args.pytest_args,
            )
        row.seconds = time.time() - t0
        rows.append(row)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=1) + "\n")
    bad = [r for r in rows if in_range(r.version) and not (r.status == "ok" and r.generation_ok)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
