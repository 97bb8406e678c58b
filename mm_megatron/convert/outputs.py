"""Where a conversion writes: refuse a non-empty output, work in a temporary sibling, publish
by a rename. A failed or interrupted conversion leaves nothing at the output path; its
temporaries (``.NAME.tmp-PID-*``, ``.NAME.old-PID``) are removed by the next conversion to
the same path once that process is gone."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from mm_megatron.data.indexed import pid_alive


class ConversionError(RuntimeError):
    """A checkpoint that cannot be read or written as asked; the message names the file."""


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out_dir`` unless ``overwrite`` (before any work is done)."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ConversionError(f"{out_dir}: exists and is not empty (pass --overwrite)")


def remove_stale_temporaries(out_dir: Path) -> list[Path]:
    """Remove the ``.NAME.tmp-PID-*`` / ``.NAME.old-PID`` siblings of ``out_dir`` left by a
    conversion that was killed (its process no longer runs); returns what was removed."""
    removed = []
    pattern = re.compile(rf"^\.{re.escape(out_dir.name)}\.(?:tmp|old)-(\d+)(?:-.*)?$")
    if not out_dir.parent.is_dir():
        return removed
    for path in out_dir.parent.iterdir():
        match = pattern.match(path.name)
        if match and int(match.group(1)) != os.getpid() and not pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
            removed.append(path)
    return removed


def make_temporary(out_dir: Path) -> Path:
    """A fresh ``.NAME.tmp-PID-*`` directory beside ``out_dir`` (stale ones removed first)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_dir(tmp: Path, out_dir: Path) -> None:
    """Rename the finished directory ``tmp`` to ``out_dir``, replacing an old one, readable as
    the umask allows (``mkdtemp`` and some writers create theirs private)."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
    mask = _umask()
    tmp.chmod(0o777 & ~mask)
    for path in tmp.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~mask)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
