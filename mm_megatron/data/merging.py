"""Merging the per-rank parts of a multi-node preprocessing run (or any datasets)."""

from __future__ import annotations

import glob
import os
import re
from collections import Counter

from .indexed import DatasetIndex, bin_path, idx_path, merge_datasets, meta_path
from .inspection import read_meta

_PART = re.compile(r"\.part-(\d{5})-of-(\d{5})$")


def find_parts(prefix: str) -> list[str]:
    """The prefixes ``PREFIX.part-RRRRR-of-NNNNN`` in rank order; all N must be complete."""
    found: dict[int, set[int]] = {}
    for path in glob.glob(glob.escape(prefix) + ".part-*-of-*.idx"):
        m = _PART.search(path[: -len(".idx")])
        if m:
            found.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    if not found:
        raise FileNotFoundError(f"no parts {prefix}.part-*-of-*.{{bin,idx}} found")
    if len(found) > 1:
        raise ValueError(f"parts of several runs (world sizes {sorted(found)}) under {prefix}")
    world, ranks = next(iter(found.items()))
    parts = [f"{prefix}.part-{r:05d}-of-{world:05d}" for r in range(world)]
    missing = [
        p
        for p, r in zip(parts, range(world), strict=True)
        if r not in ranks or not os.path.isfile(bin_path(p))
    ]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {world} parts are missing or incomplete, "
            f"e.g. {missing[:3]} (did every rank finish?)"
        )
    return parts


def merged_meta(prefixes: list[str]) -> dict | None:
    """Combine the sidecars of the parts (None if any is missing); tokenizers must agree."""
    metas = [read_meta(p) for p in prefixes]
    if any(m is None for m in metas):
        return None
    tokenizers = {(m.get("tokenizer"), m.get("tokenizer_sha256")) for m in metas}
    if len(tokenizers) > 1:
        names = sorted(map(str, tokenizers))
        raise ValueError(f"parts were made with different tokenizers: {names}")
    skipped: Counter[str] = Counter()
    for m in metas:
        skipped.update(m.get("skipped", {}))
    out = {k: v for k, v in metas[0].items() if k not in ("rank", "world_size")}
    out.update(
        inputs=[path for m in metas for path in m.get("inputs", [])],
        documents=sum(m.get("documents", 0) for m in metas),
        tokens=sum(m.get("tokens", 0) for m in metas),
        skipped=dict(sorted(skipped.items())),
        merged_from=[os.path.basename(p) for p in prefixes],
    )
    return out


def merge(prefixes: list[str], output_prefix: str, delete_inputs: bool = False) -> DatasetIndex:
    """Concatenate ``prefixes`` in order into ``output_prefix`` (atomically)."""
    meta = merged_meta(prefixes)
    index = merge_datasets(prefixes, output_prefix, meta)
    if delete_inputs:
        for p in prefixes:
            for path in (idx_path(p), bin_path(p), meta_path(p)):
                if os.path.exists(path):
                    os.unlink(path)
    return index
