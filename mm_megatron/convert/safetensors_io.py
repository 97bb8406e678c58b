"""Safetensors shards of an export: written whole or one tensor at a time, read lazily.

:func:`save_sharded` writes a state dict held in memory. :class:`ShardedSafetensorsWriter`
produces the same files (``safetensors.torch.save_file`` per shard, same
shard boundaries, same index), byte for byte, without holding a shard in memory: the shard
plan and every file header are computed up front from the tensors' names, shapes and dtypes,
and each tensor is written at its offset as soon as it is converted. Files are created
readable by everyone the umask allows (0644 by default), not 0600.

:class:`LazySafetensors` opens a directory's shards with ``safe_open`` and reads one tensor
at a time; names and shapes come from the headers alone.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mm_megatron.convert.outputs import ConversionError

Tensor = torch.Tensor
INDEX = "model.safetensors.index.json"

# safetensors' dtype names, in its enum order: a file lists its tensors by dtype, the later
# (wider) dtypes first, then by name.
_DTYPES: list[tuple[torch.dtype, str]] = [
    (torch.bool, "BOOL"),
    (torch.uint8, "U8"),
    (torch.int8, "I8"),
    (torch.float8_e5m2, "F8_E5M2"),
    (torch.float8_e4m3fn, "F8_E4M3"),
    (torch.int16, "I16"),
    (torch.uint16, "U16"),
    (torch.float16, "F16"),
    (torch.bfloat16, "BF16"),
    (torch.int32, "I32"),
    (torch.uint32, "U32"),
    (torch.float32, "F32"),
    (torch.float64, "F64"),
    (torch.int64, "I64"),
    (torch.uint64, "U64"),
]
_NAME = dict(_DTYPES)
_RANK = {dtype: i for i, (dtype, _) in enumerate(_DTYPES)}


class SafetensorsStreamError(ConversionError):
    """A shard that cannot be written or read as planned; the message names the file."""


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    count = 1
    for n in shape:
        count *= n
    return count * torch.empty((), dtype=dtype).element_size()


def plan_shards(
    entries: list[tuple[str, tuple[int, ...], torch.dtype]], limit: int
) -> list[list[tuple[str, tuple[int, ...], torch.dtype]]]:
    """Split ``(name, shape, dtype)`` entries, in order, into shards of at most ``limit``
    bytes (a larger tensor gets a shard of its own): the rule of ``save_sharded``."""
    shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
    used = 0
    for entry in entries:
        nbytes = _nbytes(entry[1], entry[2])
        if shards[-1] and used + nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append(entry)
        used += nbytes
    return shards


def _header(
    entries: list[tuple[str, tuple[int, ...], torch.dtype]], metadata: dict[str, str]
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The header bytes (length prefix included) ``save_file`` writes for these tensors, and
    each tensor's (start, end) in the data section."""
    for name, _, dtype in entries:
        if dtype not in _NAME:
            raise SafetensorsStreamError(f"{name}: dtype {dtype} cannot be written")
    ordered = sorted(entries, key=lambda e: (-_RANK[e[2]], e[0]))
    offsets: dict[str, tuple[int, int]] = {}
    head: dict[str, Any] = {"__metadata__": metadata}
    start = 0
    for name, shape, dtype in ordered:
        end = start + _nbytes(shape, dtype)
        offsets[name] = (start, end)
        head[name] = {"dtype": _NAME[dtype], "shape": list(shape), "data_offsets": [start, end]}
        start = end
    text = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offsets


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def parse_size(size: int | str) -> int:
    """Bytes of a shard size given as an int or a string such as ``5GB``, ``500MiB``."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B)?\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read shard size {size!r} (e.g. 5GB, 500MB, 1048576)")
    units = {
        "": 1,
        "b": 1,
        "kb": 10**3,
        "mb": 10**6,
        "gb": 10**9,
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
    }
    return int(float(match.group(1)) * units[(match.group(2) or "").lower()])


def save_sharded(tensors: dict[str, Tensor], out: Path, max_shard_size: int | str) -> list[str]:
    """Write safetensors shards of at most ``max_shard_size`` bytes (a larger single tensor
    gets a shard of its own) and ``model.safetensors.index.json``. Returns the shard names."""
    plan = plan_shards(
        [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], parse_size(max_shard_size)
    )
    names = [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    weight_map = {}
    for fname, shard in zip(names, plan, strict=True):
        part = {n: tensors[n].detach().cpu().contiguous().clone() for n, _, _ in shard}
        save_file(part, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names


class ShardedSafetensorsWriter:
    """Write the planned tensors, given in any order, into ``model-0000i-of-0000n``
    shards under ``out_dir`` and ``model.safetensors.index.json`` on :meth:`close`.

    ``entries`` is the ``(name, shape, dtype)`` list in the order ``save_sharded`` would
    iterate the state dict; ``single_file`` writes one ``model.safetensors`` instead (no
    index). Every planned tensor must be written exactly once, with its shape and dtype.
    """

    def __init__(
        self,
        out_dir: Path,
        entries: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
        limit: int,
        *,
        single_file: str | None = None,
    ) -> None:
        entries = [(n, tuple(s), d) for n, s, d in entries]
        shards = [entries] if single_file else plan_shards(entries, limit)
        names = (
            [single_file]
            if single_file
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        self.out_dir, self.single_file = Path(out_dir), single_file
        self.entries = entries
        self.where: dict[str, tuple[Path, int, int, tuple[int, ...], torch.dtype]] = {}
        self.files: dict[Path, BinaryIO] = {}
        self.pending: set[str] = set()
        self.weight_map: dict[str, str] = {}
        mode = 0o666 & ~_umask()
        for fname, shard in zip(names, shards, strict=True):
            path = self.out_dir / fname
            header, offsets = _header(shard, {"format": "pt"})
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode)
            handle = os.fdopen(fd, "r+b")
            self.files[path] = handle
            handle.write(header)
            handle.truncate(len(header) + sum(e - s for s, e in offsets.values()))
            for name, shape, dtype in shard:
                start, end = offsets[name]
                self.where[name] = (path, len(header) + start, end - start, shape, dtype)
                self.weight_map[name] = fname
        self.pending = set(self.where)

    def write(self, name: str, tensor: Tensor) -> None:
        """Write one planned tensor (converted to contiguous CPU memory first)."""
        if name not in self.where:
            raise SafetensorsStreamError(f"{name}: not a planned tensor of {self.out_dir}")
        path, offset, nbytes, shape, dtype = self.where[name]
        if name not in self.pending:
            raise SafetensorsStreamError(f"{path}: {name} written twice")
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise SafetensorsStreamError(
                f"{path}: {name} is {tuple(tensor.shape)} {tensor.dtype}, planned {shape} {dtype}"
            )
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        assert data.nbytes == nbytes
        handle = self.files[path]
        handle.seek(offset)
        handle.write(memoryview(data))
        self.pending.discard(name)

    def close(self) -> list[Path]:
        """Check that every tensor was written, close the files and write the index."""
        for handle in self.files.values():
            handle.close()
        if self.pending:
            raise SafetensorsStreamError(
                f"{self.out_dir}: tensors never written: {sorted(self.pending)[:6]}"
            )
        if not self.single_file:
            total = sum(_nbytes(s, d) for _, s, d in self.entries)
            index = {"metadata": {"total_size": total}, "weight_map": self.weight_map}
            (self.out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return list(self.files)

    def abort(self) -> None:
        """Close the files without checks (the caller removes the directory)."""
        for handle in self.files.values():
            handle.close()

    def __enter__(self) -> ShardedSafetensorsWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is not None:
            self.abort()


class LazySafetensors:
    """The tensors of a Hugging Face directory (``model.safetensors`` or an index and its
    shards), read one at a time. Opening checks every shard's header against the index."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        index = self.model_dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as err:
                raise SafetensorsStreamError(f"{index}: cannot read ({err})") from None
        elif (self.model_dir / "model.safetensors").is_file():
            weight_map = None
        else:
            raise SafetensorsStreamError(f"{self.model_dir}: no model.safetensors(.index.json)")
        names = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self.handles: dict[str, Any] = {}
        self.location: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name in names:
            path = self.model_dir / name
            try:
                handle = safe_open(str(path), framework="pt")
                keys = set(handle.keys())
                shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in keys}
            except (OSError, SafetensorError) as err:
                raise SafetensorsStreamError(f"{path}: cannot read ({err})") from None
            if weight_map is not None and keys != {k for k, v in weight_map.items() if v == name}:
                raise SafetensorsStreamError(
                    f"{path}: does not hold the tensors that {INDEX} lists for it"
                )
            self.handles[name] = handle
            self.location.update(dict.fromkeys(keys, name))
            self.shapes.update(shapes)

    def __contains__(self, name: object) -> bool:
        return name in self.location

    def __getitem__(self, name: str) -> Tensor:
        shard = self.location[name]
        try:
            return self.handles[shard].get_tensor(name)
        except (OSError, SafetensorError) as err:
            raise SafetensorsStreamError(
                f"{self.model_dir / shard}: cannot read {name} ({err})"
            ) from None

    def keys(self) -> list[str]:
        """Every tensor name."""
        return list(self.location)

    def get(self, names: Iterable[str]) -> dict[str, Tensor]:
        """The named tensors."""
        return {n: self[n] for n in names}


def open_tensors(path: str | Path) -> Any:
    """A name → tensor mapping of a ``.safetensors`` file (read lazily, the file being the
    directory's ``model.safetensors``) or a ``torch.save`` file (memory-mapped)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if path.name != "model.safetensors":
            raise SafetensorsStreamError(f"{path}: expected a model.safetensors file")
        return LazySafetensors(path.parent)
    return torch.load(path, mmap=True, weights_only=True)
