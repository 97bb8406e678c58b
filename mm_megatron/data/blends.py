"""Dataset blends: parsing, validation, and conversion to Megatron's blend tuples.

A blend is written in the training config as a flat list ``[weight, prefix, weight, prefix,
...]`` (or a list of prefixes, meaning equal weights), either once for all splits
(``blend``, with ``split`` dividing it into train/valid/test) or per split
(``blend_per_split: {train: [...], valid: [...], test: [...]}``). A weight is the
probability that a training *sample* comes from that dataset, after normalization; it does
not depend on the dataset's size (a small dataset with a large weight is repeated).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from numbers import Real

from .indexed import bin_path, idx_path, read_index

SPLITS = ("train", "valid", "test")


class BlendError(ValueError):
    """A malformed blend or a missing dataset."""


@dataclass(frozen=True)
class BlendEntry:
    """One dataset of a blend, with its normalized per-sample probability."""

    prefix: str
    weight: float
    documents: int
    tokens: int


def parse_blend(blend: list | tuple | str) -> list[tuple[float, str]]:
    """``[w, p, w, p]``, ``[p, p]`` or ``"w p w p"`` -> ``[(w, p), ...]`` (not normalized)."""
    if isinstance(blend, str):
        blend = blend.split()
    items = list(blend)
    if not items:
        raise BlendError("empty blend")
    if all(isinstance(x, str) and not _is_number(x) for x in items):
        return [(1.0, x) for x in items]
    if len(items) % 2:
        raise BlendError(f"a blend alternates weight and prefix; got {len(items)} items")
    pairs = []
    for i in range(0, len(items), 2):
        weight, prefix = items[i], items[i + 1]
        if not _is_number(weight):
            raise BlendError(f"blend item {i}: expected a weight, got {weight!r}")
        if not isinstance(prefix, str | os.PathLike) or _is_number(prefix):
            raise BlendError(f"blend item {i + 1}: expected a dataset prefix, got {prefix!r}")
        w = float(weight)
        if not w >= 0 or w == float("inf"):
            raise BlendError(f"blend weight {weight!r} for {prefix!r} must be finite and >= 0")
        pairs.append((w, os.fspath(prefix)))
    if sum(w for w, _ in pairs) <= 0:
        raise BlendError("blend weights add up to zero")
    return pairs


def _is_number(x: object) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, Real):
        return True
    if isinstance(x, str):
        try:
            float(x)
        except ValueError:
            return False
        return True
    return False


def validate_blend(
    blend: list | tuple | str | dict,
    root: str | os.PathLike | None = None,
    check_contents: bool = True,
) -> dict[str, list[BlendEntry]] | list[BlendEntry]:
    """Check that every prefix of a blend exists; return normalized entries.

    ``blend`` is a flat blend (list or string) or a per-split mapping with keys among
    ``train``, ``valid``, ``test`` (a split may be None or empty). Relative prefixes are
    resolved against ``root`` when given. With ``check_contents`` each ``.idx`` is read
    and its ``.bin`` size checked. Raises ``BlendError`` listing every problem found.
    """
    if isinstance(blend, dict):
        unknown = set(blend) - set(SPLITS)
        if unknown:
            raise BlendError(f"unknown split(s) {sorted(unknown)}; expected {SPLITS}")
        out: dict[str, list[BlendEntry]] = {}
        problems = []
        for split in SPLITS:
            if blend.get(split):
                try:
                    out[split] = _validate_flat(blend[split], root, check_contents)
                except BlendError as exc:
                    problems.append(f"{split}: {exc}")
        if problems:
            raise BlendError("\n".join(problems))
        if "train" not in out:
            raise BlendError("a per-split blend needs a non-empty 'train' list")
        return out
    return _validate_flat(blend, root, check_contents)


def _validate_flat(
    blend: list | tuple | str, root: str | os.PathLike | None, check_contents: bool
) -> list[BlendEntry]:
    pairs = parse_blend(blend)
    total = sum(w for w, _ in pairs)
    entries, problems = [], []
    for weight, prefix in pairs:
        path = os.path.join(root, prefix) if root is not None else prefix
        missing = [p for p in (bin_path(path), idx_path(path)) if not os.path.isfile(p)]
        if missing:
            problems.append(f"{prefix}: missing {', '.join(missing)}")
            continue
        docs = tokens = -1
        if check_contents:
            try:
                index = read_index(path)
            except (OSError, ValueError) as exc:
                problems.append(f"{prefix}: {exc}")
                continue
            docs, tokens = index.num_documents, index.num_tokens
            if docs == 0:
                problems.append(f"{prefix}: dataset has no documents")
                continue
        entries.append(BlendEntry(path, weight / total, docs, tokens))
    if problems:
        raise BlendError("\n".join(problems))
    return entries


def to_megatron_blend(entries: list[BlendEntry]) -> tuple[list[str], list[float]]:
    """Validated entries -> ``(prefixes, weights)``, Megatron's ``BlendedMegatronDatasetConfig``
    ``blend`` (and each item of ``blend_per_split``)."""
    return [e.prefix for e in entries], [e.weight for e in entries]
