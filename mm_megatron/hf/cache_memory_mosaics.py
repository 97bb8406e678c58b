"""Generation cache of the Hugging Face model of Memory Mosaics v2 ("Memory Mosaics at scale",
arXiv 2507.03285): per layer and per memory, the key-recurrence state, the pending look-ahead
pair and the stored (key, value) pairs.

Self-contained (torch, transformers and the standard library); shipped beside
``modeling_memory_mosaics.py`` in every export.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache

from .configuration_memory_mosaics import MemoryMosaicsConfig

Tensor = torch.Tensor


class PairBuffer:
    """Stored (key, value) pairs of one memory with their absolute positions (-1: empty slot).
    ``ring`` > 0 keeps only the last ``ring`` pairs (short-term memory); otherwise the buffer
    grows by doubling (long-term memory). The memory is a set: slot order does not matter."""

    def __init__(self, ring: int = 0) -> None:
        self.ring = ring
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.pos: Tensor | None = None
        self.size = 0

    def view(self) -> tuple[Tensor, Tensor, Tensor] | None:
        if self.keys is None:
            return None
        n = self.keys.shape[2] if self.ring else self.size
        return self.keys[:, :, :n], self.values[:, :, :n], self.pos[:n]

    def append(self, k: Tensor, v: Tensor, pos: Tensor) -> None:
        if self.keys is None:
            B, H, _, D = k.shape
            cap = self.ring or max(64, k.shape[2])
            self.keys, self.values = k.new_zeros(B, H, cap, D), v.new_zeros(B, H, cap, D)
            self.pos = pos.new_full((cap,), -1)
        if self.ring:
            k, v, pos = k[:, :, -self.ring :], v[:, :, -self.ring :], pos[-self.ring :]
            slot = pos % self.ring
            self.keys[:, :, slot], self.values[:, :, slot], self.pos[slot] = k, v, pos
            return
        need = self.size + k.shape[2]
        if need > self.keys.shape[2]:
            cap = max(need, 2 * self.keys.shape[2])
            grow = cap - self.keys.shape[2]
            self.keys = torch.cat([self.keys, self.keys.new_zeros(*self.keys.shape[:2], grow,
                                                                  self.keys.shape[3])], 2)
            self.values = torch.cat([self.values, self.values.new_zeros(
                *self.values.shape[:2], grow, self.values.shape[3])], 2)  # fmt: skip
            self.pos = torch.cat([self.pos, self.pos.new_full((grow,), -1)])
        self.keys[:, :, self.size : need], self.values[:, :, self.size : need] = k, v
        self.pos[self.size : need] = pos
        self.size = need

    def map_batch(self, fn: Any) -> None:
        if self.keys is not None:
            self.keys, self.values = fn(self.keys), fn(self.values)


class MemoryState:
    """Decoding state of one memory of one layer (spec §8 "Inference")."""

    def __init__(self, ring: int) -> None:
        self.carry: tuple[Tensor, Tensor] | None = None  # key recurrence (c, S), k̄ = e^c S
        self.last_key: Tensor | None = None  # k of the last token: its pair awaits ṽ_{t+1}
        self.last_v: Tensor | None = None  # ṽ of the last token
        self.pairs = PairBuffer(ring)

    def map_batch(self, fn: Any) -> None:
        if self.carry is not None:
            self.carry = (fn(self.carry[0]), fn(self.carry[1]))
            self.last_key, self.last_v = fn(self.last_key), fn(self.last_v)
        self.pairs.map_batch(fn)


class MemoryMosaicsCache(Cache):
    """Generation cache of MM v2: per layer and per memory, a :class:`MemoryState`.

    Holds the key-recurrence state (log-scale pair, fp32), the pending look-ahead value ṽ and
    key of the last token, a ring buffer of the last ``stm_max_lag`` short-term pairs and all
    complete long-term pairs. A new token costs O(context). ``start`` is each row's first real
    token (left padding).
    """

    def __init__(self, config: MemoryMosaicsConfig | None = None) -> None:
        super().__init__(layers=[])
        self.config = config
        self.memories: list[dict[str, MemoryState]] = []
        self.seen_tokens = 0
        self.start: Tensor | None = None

    def layer(self, idx: int) -> dict[str, MemoryState]:
        while len(self.memories) <= idx:
            ring = self.config.stm_max_lag
            self.memories.append({k: MemoryState(ring if k == "short" else 0)
                                  for k in self.config.memory_kinds})  # fmt: skip
        return self.memories[idx]

    def __len__(self) -> int:
        return len(self.memories)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def batch_size(self) -> int:
        return -1 if self.start is None else int(self.start.shape[0])

    def _map_batch(self, fn: Any) -> None:
        for layer in self.memories:
            for state in layer.values():
                state.map_batch(fn)
        if self.start is not None:
            self.start = fn(self.start)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("MemoryMosaicsCache cannot drop tokens")

    def reset(self) -> None:
        self.memories, self.seen_tokens, self.start = [], 0, None
