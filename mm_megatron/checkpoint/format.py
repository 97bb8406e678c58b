"""The run-directory format of our Megatron checkpoints: its names, tracker and manifest.

Layout under a run root (``checkpoint.dir``)::

    iter_0000100/                     one complete checkpoint (torch_dist format)
        mm_checkpoint.json            manifest: iteration, layout, file sizes and sha256
        config.yaml                   the resolved config of the run that saved it
        .metadata, common.pt, ...     torch_dist's own files
    latest_checkpointed_iteration.txt the newest complete checkpoint's iteration
    tokenizer/                        the run's tokenizer files

A checkpoint is complete when its manifest exists (it is written last, before the rename
from ``iter_XXXXXXX.tmp``); it is intact when every file matches the manifest's size and
sha256 (:func:`verify_checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

TRACKER = "latest_checkpointed_iteration.txt"
MANIFEST = "mm_checkpoint.json"
RUN_CONFIG = "config.yaml"
TOKENIZER_DIR = "tokenizer"
ITER_PREFIX = "iter_"
TMP_SUFFIX = ".tmp"
DIST_METADATA = ".metadata"  # torch_dist's tensor metadata
COMMON_STATE = "common.pt"  # torch_dist's non-sharded state
TOKENIZER_NAMES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "tokenizer.tiktoken",
)


class CheckpointFormatError(RuntimeError):
    """A path that is not a usable checkpoint of this format; the message names the file."""


def iteration_dir(root: str | Path, iteration: int) -> Path:
    """``<root>/iter_XXXXXXX`` of ``iteration``."""
    return Path(root) / f"{ITER_PREFIX}{iteration:07d}"


def iteration_of(path: str | Path) -> int | None:
    """The iteration an ``iter_XXXXXXX`` directory name stands for, None for other names."""
    name = Path(path).name
    if not name.startswith(ITER_PREFIX):
        return None
    try:
        return int(name[len(ITER_PREFIX) :])
    except ValueError:
        return None


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` through a ``.tmp`` sibling and a rename."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.write_text(text)
    os.replace(tmp, path)


def read_tracker(root: str | Path) -> int:
    """The iteration the tracker names; ValueError when unreadable, OSError when absent."""
    return int((Path(root) / TRACKER).read_text().strip())


def write_tracker(root: str | Path, iteration: int) -> None:
    """Point the tracker at ``iteration`` (atomically)."""
    write_text_atomic(Path(root) / TRACKER, f"{iteration}\n")


def read_manifest(ckpt_dir: str | Path) -> dict[str, Any]:
    """The manifest of an ``iter_*`` directory."""
    return json.loads((Path(ckpt_dir) / MANIFEST).read_text())


def write_manifest(ckpt_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Write the manifest (the last file of a save)."""
    (Path(ckpt_dir) / MANIFEST).write_text(json.dumps(manifest, indent=1))


def write_run_config(ckpt_dir: str | Path, config: dict[str, Any]) -> None:
    """Store the resolved run config with a checkpoint."""
    (Path(ckpt_dir) / RUN_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def list_checkpoints(root: str | Path) -> list[int]:
    """Iterations of the complete-looking checkpoint directories (manifest present)."""
    out = []
    for path in Path(root).glob(f"{ITER_PREFIX}*"):
        if path.name.endswith(TMP_SUFFIX) or not (path / MANIFEST).is_file():
            continue
        iteration = iteration_of(path)
        if iteration is not None:
            out.append(iteration)
    return sorted(out)


def verify_checkpoint(path: Path, share: tuple[int, int] = (0, 1)) -> str | None:
    """Why ``path`` is not a usable checkpoint, or None if its files match its manifest.

    Every file's presence and size are checked; the sha256 of the files whose index in the
    manifest is ``share[0]`` modulo ``share[1]`` (all of them by default), so that N ranks
    verify a checkpoint together, each reading 1/N of it.
    """
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return f"{path}: no {MANIFEST} (incomplete save)"
    try:
        manifest = read_manifest(path)
        files = manifest["files"]
        hashes = manifest.get("sha256", {})  # absent in checkpoints saved before hashes
    except (ValueError, KeyError, AttributeError) as err:
        return f"{manifest_path}: unreadable manifest ({err})"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{path}: missing file {name}"
        if f.stat().st_size != size:
            return f"{path}: {name} has {f.stat().st_size} bytes, manifest says {size}"
    index, count = share
    for i, name in enumerate(sorted(hashes)):
        if i % count == index and sha256_file(path / name) != hashes[name]:
            return f"{path}: {name} does not match its sha256 in the manifest (corrupted)"
    return None


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """The ``iter_*`` directory to read: ``path`` itself, or the tracker's iteration of a run
    root. Verified against its manifest; raises :class:`CheckpointFormatError` naming the
    file at fault."""
    path = Path(path)
    if not path.exists():
        raise CheckpointFormatError(f"{path}: does not exist")
    if (path / MANIFEST).is_file() or path.name.startswith(ITER_PREFIX):
        target = path
    else:
        tracker = path / TRACKER
        complete = list_checkpoints(path)
        if not tracker.is_file():
            hint = f" (complete: {complete}; pass an iter_* directory)" if complete else ""
            raise CheckpointFormatError(f"{path}: no {TRACKER}: not a checkpoint directory{hint}")
        try:
            iteration = read_tracker(path)
        except ValueError:
            raise CheckpointFormatError(
                f"{tracker}: unreadable tracker (complete iterations: {complete})"
            ) from None
        target = iteration_dir(path, iteration)
        if not target.is_dir():
            raise CheckpointFormatError(
                f"{tracker}: names iteration {iteration}, but "
                f"{target.name} does not exist (complete: {complete})"
            )
    problem = verify_checkpoint(target)
    if problem is not None:
        raise CheckpointFormatError(f"damaged or incomplete checkpoint: {problem}")
    return target


def run_tokenizer_dir(ckpt_dir: str | Path) -> Path:
    """The ``tokenizer/`` directory of the run an ``iter_*`` directory belongs to."""
    return Path(ckpt_dir).parent / TOKENIZER_DIR


def tokenizer_files(path: str | Path) -> list[Path]:
    """The tokenizer files in a directory, or a file and the known ones beside it."""
    path = Path(path)
    if path.is_file():
        return [path] + [p for p in tokenizer_files(path.parent) if p.name != path.name]
    return [path / n for n in TOKENIZER_NAMES if (path / n).is_file()]
