"""Running tools/convert_checkpoint.py from the tests: one conversion per process, or
several in one process (the imports are paid once)."""

from __future__ import annotations

import json
import subprocess
import sys

from paths import ROOT
from train_runner import env

TOOL = ROOT / "tools" / "convert_checkpoint.py"


def _python(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        env=env(),
        cwd=ROOT,
        timeout=timeout,
    )


def convert(*args: object) -> subprocess.CompletedProcess:
    result = _python([TOOL, *args])
    return result


MANY = """
import contextlib, io, json, sys
sys.path.insert(0, {tools!r})
import convert_checkpoint
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = convert_checkpoint.main(argv)
    out.append([rc, err.getvalue()])
print("RESULTS" + json.dumps(out))
"""


def convert_many(argvs: list[list[object]]) -> list[tuple[int, str]]:
    """Several conversions in one process (saves the imports): (exit status, stderr) each."""
    script = MANY.format(tools=str(ROOT / "tools"))
    result = _python(["-c", script, json.dumps([[str(a) for a in argv] for argv in argvs])])
    assert "RESULTS" in result.stdout, result.stderr[-3000:]
    return [tuple(r) for r in json.loads(result.stdout.split("RESULTS", 1)[1])]
