"""The embedded demo corpus: the Python standard library's own ``.py`` sources.

Every fresh machine with Python has it, so demos and tests need no download. One document
per module (the text is the module's source), in sorted path order, so the corpus is
deterministic for a given Python installation.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

_SKIP_DIRS = {
    "site-packages",
    "dist-packages",
    "__pycache__",
    "test",
    "tests",
    "idle_test",
    "lib2to3",
}


def stdlib_dir() -> Path:
    """Directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def iter_stdlib_modules(
    root: Path | None = None, include_tests: bool = False
) -> Iterator[tuple[str, Path]]:
    """``(module name, path)`` of the standard library's ``.py`` files, in sorted order."""
    root = root or stdlib_dir()
    skip = _SKIP_DIRS - ({"test", "tests", "idle_test", "lib2to3"} if include_tests else set())
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith(".")]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                rel = path.relative_to(root).with_suffix("")
                parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
                found.append((".".join(parts) or rel.name, path))
    found.sort(key=lambda item: item[1].relative_to(root).as_posix())
    yield from found


def gather_demo_corpus(
    output: str | os.PathLike,
    max_docs: int | None = None,
    max_bytes: int | None = None,
    include_tests: bool = False,
    root: Path | None = None,
) -> dict[str, int]:
    """Write the standard library sources as jsonl (``{"id", "module", "text"}`` per line).

    Files that are not valid UTF-8 or are empty are left out. Stops after ``max_docs``
    documents or once ``max_bytes`` of text have been written. Returns counts.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    root = root or stdlib_dir()
    docs = nbytes = left_out = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for module, path in iter_stdlib_modules(root, include_tests):
            if max_docs is not None and docs >= max_docs:
                break
            if max_bytes is not None and nbytes >= max_bytes:
                break
            try:
                text = path.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                left_out += 1
                continue
            if not text.strip():
                left_out += 1
                continue
            rel = path.relative_to(root).as_posix()
            record = {"id": f"stdlib/{rel}", "module": module, "text": text}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            docs += 1
            nbytes += len(text.encode("utf-8"))
    os.replace(tmp, output)
    return {"documents": docs, "bytes": nbytes, "left_out": left_out}
