"""Generation cache of the Hugging Face model of Memory Mosaics v2 ("Memory Mosaics at scale",
arXiv 2507.03285): per layer and per memory, the key-recurrence state, the pending look-ahead
pair and the stored (key, value) pairs; and the gated key scan (Eq. 8) that carries that
state from one call to the next.

Self-contained (torch, transformers and the standard library); shipped beside
``modeling_memory_mosaics.py`` in every export. The definitions marked ``# Copied from`` are
copies of the library's (``mm_megatron``), checked by ``tools/check_copies.py``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache

from .configuration_memory_mosaics import MemoryMosaicsConfig

Tensor = torch.Tensor


# Copied from mm_megatron.ops.naive.L2_EPS
L2_EPS = 1e-6


# The gated key extractor of Eq. 8 with a carried state: one function runs a whole sequence,
# a prefill and one decoding step (the state between calls is MemoryState.carry).
# Copied from mm_megatron.ops.gated_scan.ScanState
ScanState = tuple[torch.Tensor, torch.Tensor]


# Copied from mm_megatron.ops.gated_scan._inner_log_dtype
def _inner_log_dtype(device: torch.device) -> torch.dtype:
    """dtype of the log-space prefix sums: fp64, or fp32 on MPS (no fp64).

    Differences of prefix sums cancel: within a chunk (C tokens) a fp32 sum of |W_λ x| loses
    ~1e-6 of relative accuracy in every weight, which moved fp32 keys by ~2e-6 and made a
    left-padded row differ from the same row alone; the chunk-level recursion spans C chunks
    (C**2 tokens, up to ~1e4 in log units), and so does the decay of a carried state. So all
    of them are formed in fp64; the exponentials and the sums of keys stay in the working
    dtype."""
    return torch.float32 if device.type == "mps" else torch.float64


# Copied from mm_megatron.ops.gated_scan._check_inputs
def _check_inputs(
    k_tilde: torch.Tensor,
    log_gate: torch.Tensor,
    log_decay: torch.Tensor,
    doc_pos: torch.Tensor,
    chunk_size: int,
) -> None:
    if k_tilde.dim() != 4:
        raise ValueError(f"k_tilde must be [B, H, T, D], got shape {tuple(k_tilde.shape)}")
    B, H, T, _ = k_tilde.shape
    for name, t in (("log_gate", log_gate), ("log_decay", log_decay)):
        if tuple(t.shape) != (B, H, T):
            raise ValueError(f"{name} must be [B, H, T] = {(B, H, T)}, got {tuple(t.shape)}")
    if tuple(doc_pos.shape) != (B, T):
        raise ValueError(f"doc_pos must be [B, T] = {(B, T)}, got {tuple(doc_pos.shape)}")
    if doc_pos.is_floating_point() or doc_pos.is_complex():
        raise ValueError(f"doc_pos must be an integer tensor, got {doc_pos.dtype}")
    if not isinstance(chunk_size, int) or chunk_size < 2:
        raise ValueError(f"chunk_size must be an int >= 2, got {chunk_size!r}")


# Copied from mm_megatron.ops.gated_scan._chunked_state
def _chunked_state(
    kt: torch.Tensor,
    log_gate: torch.Tensor,
    log_decay: torch.Tensor,
    doc_pos: torch.Tensor,
    chunk_size: int,
    log_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised states of Eq. 8 as (log_scale [B,H,T], state [B,H,T,D]).

    k̄_t = exp(log_scale_t) · state_t, with every weight inside ``state`` at most 1.
    Inputs are already in the working dtype; prefix sums and exponents are formed in
    ``log_dtype`` (exponentials and sums in the working dtype); ``doc_pos`` is ``[B, T]``.
    """
    B, H, T, D = kt.shape
    C = min(chunk_size, T)
    N = -(-T // C)
    pad = N * C - T
    if pad:  # padded tokens come last, start their own documents and hold zero keys
        kt = F.pad(kt, (0, 0, 0, pad))
        log_gate = F.pad(log_gate, (0, pad))
        log_decay = F.pad(log_decay, (0, pad))
        doc_pos = F.pad(doc_pos, (0, pad))
    dev = kt.device
    neg_inf = float("-inf")

    k_c = kt.reshape(B, H, N, C, D)
    l_loc = log_decay.to(log_dtype).reshape(B, H, N, C).cumsum(-1)  # L from the chunk start
    a = log_gate.to(log_dtype).reshape(B, H, N, C) + l_loc  # a_s = G_s + L^loc_s
    dp = doc_pos.reshape(B, N, C)
    idx = torch.arange(C, device=dev)
    lag = idx.view(C, 1) - idx.view(1, C)  # t - s
    allowed = ((lag >= 0) & (lag <= dp.unsqueeze(-1))).unsqueeze(1)  # [B, 1, N, C, C]

    a_ts = a.unsqueeze(-2)  # [B, H, N, 1, C], source s on the last axis
    with torch.no_grad():
        m = a_ts.masked_fill(~allowed, neg_inf).amax(-1)  # [B, H, N, C], finite (s = t)
    weights = torch.where(allowed, a_ts - m.unsqueeze(-1), neg_inf).to(kt.dtype).exp()
    s_intra = torch.matmul(weights, k_c)  # [B, H, N, C, D]

    if N == 1:
        c, state = m, s_intra
    else:
        # Chunk-level recurrence: P_{j+1} = e^{-D_j} (P_j + e^{m_end,j} S_end,j), reset when a
        # document starts inside chunk j; same form as Eq. 8, solved recursively.
        d_tot = l_loc[..., -1]  # [B, H, N]
        ends = torch.arange(N, device=dev) * C + (C - 1)
        doc_start_chunk = torch.div(ends - doc_pos[:, ends], C, rounding_mode="floor")
        dp_chunk = (torch.arange(N, device=dev) - doc_start_chunk.clamp_min(0)).to(doc_pos.dtype)
        log_c, s_c = _chunked_state(
            s_intra[..., -1, :],
            m[..., -1] - d_tot,
            d_tot,
            dp_chunk,
            chunk_size,
            _inner_log_dtype(dev),
        )
        # carry into chunk j = state at the end of chunk j - 1
        cp = F.pad(log_c[..., :-1].to(log_dtype), (1, 0), value=neg_inf)  # [B, H, N]
        sp = F.pad(s_c[..., :-1, :], (0, 0, 1, 0))  # [B, H, N, D]
        carry_ok = (dp >= idx + 1).unsqueeze(1)  # document began before the chunk
        cp_t = torch.where(carry_ok, cp.unsqueeze(-1), neg_inf)  # [B, H, N, C]
        with torch.no_grad():
            c = torch.maximum(cp_t, m)
        state = sp.unsqueeze(-2) * (cp_t - c).to(kt.dtype).exp().unsqueeze(-1)
        state = state + s_intra * (m - c).to(kt.dtype).exp().unsqueeze(-1)

    # true k̄_t = exp(c_t - L^loc_t) * state_t: c_t is a detached stabiliser; the frame of
    # chunk j is L relative to its start, and the carry's log-scale tracks the decays D_j.
    log_scale = (c - l_loc).reshape(B, H, N * C)[..., :T]
    return log_scale, state.reshape(B, H, N * C, D)[..., :T, :]


# Copied from mm_megatron.ops.gated_scan.doc_pos_from_reset
def doc_pos_from_reset(reset: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` position within the document from ``reset`` (True at a document's first token).

    Tokens before the first reset count from 0 at t = 0 (they continue the carried document).
    """
    T = reset.shape[-1]
    idx = torch.arange(T, device=reset.device).expand_as(reset)
    last_start = torch.where(reset, idx, torch.zeros_like(idx)).cummax(-1).values
    return idx - last_start


# Copied from mm_megatron.ops.gated_scan._normalize
def _normalize(log_scale: torch.Tensor, state: torch.Tensor, eps: float) -> torch.Tensor:
    """k = k̄ / max(‖k̄‖, eps) for k̄ = exp(log_scale) · state, without forming k̄.

    ‖k̄‖ < eps  <=>  ‖state‖ < eps · exp(−log_scale). The exponent is capped so that exp stays
    finite (beyond the cap the key is ~0 either way).
    """
    cap = math.log(torch.finfo(state.dtype).max) - 8.0
    floor = (math.log(eps) - log_scale).clamp(max=cap).exp()
    denom = torch.maximum(state.norm(dim=-1), floor)
    return state / denom.unsqueeze(-1)


# Copied from mm_megatron.ops.gated_scan.gated_key_scan_torch
#     with gated_key_scan_torch->gated_key_scan
def gated_key_scan(
    k_tilde: torch.Tensor,
    log_gate: torch.Tensor,
    log_decay: torch.Tensor,
    reset: torch.Tensor,
    initial_state: ScanState | None = None,
    output_final_state: bool = False,
    eps: float = L2_EPS,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, ScanState | None]:
    """Eq. 8 with a carried state, by the chunked torch scan (the CPU path).

    k̄_t = g_t k̃_t + λ_t k̄_{t-1} (k̄_{-1} = exp(c₀) S₀ from ``initial_state``, dropped at a
    reset), k_t = k̄_t / max(‖k̄_t‖, eps). The carried state reaches token t only while no
    document starts in [0, t], with weight exp(c₀ − L_t), L_t = Σ_{r ≤ t} log_decay_r; it is
    merged with the in-segment sum of :func:`_chunked_state` under a common (detached)
    stabiliser. Autograd gives the gradients of all inputs, the state included.

    Args:
        k_tilde: ``[B, H, T, D]``; log_gate, log_decay: ``[B, H, T]``; reset: ``[B, T]`` bool.
        initial_state: ``(c [B, H], S [B, H, D])`` or None (empty state).
        output_final_state: also return the state after the last token.
        eps: the floor of the L2 norm; chunk_size: tokens per chunk (>= 2).
    Returns:
        keys ``[B, H, T, D]`` in ``k_tilde``'s dtype, and ``(c, S)`` in the working dtype
        (fp32, fp64 for fp64 inputs) or None.
    """
    B, H, T, D = k_tilde.shape
    if tuple(reset.shape) != (B, T):
        raise ValueError(f"reset must be [B, T] = {(B, T)}, got {tuple(reset.shape)}")
    reset = reset.bool()
    doc_pos = doc_pos_from_reset(reset)
    _check_inputs(k_tilde, log_gate, log_decay, doc_pos, chunk_size)
    work = torch.float64 if k_tilde.dtype == torch.float64 else torch.float32
    if initial_state is not None:
        c0, s0 = initial_state
        if tuple(c0.shape) != (B, H) or tuple(s0.shape) != (B, H, D):
            raise ValueError(
                f"initial_state must be (c [B, H], S [B, H, D]) = ({(B, H)}, {(B, H, D)}), "
                f"got ({tuple(c0.shape)}, {tuple(s0.shape)})"
            )
    if T == 0:
        final = initial_state
        if output_final_state and final is None:
            final = (
                k_tilde.new_full((B, H), -math.inf, dtype=work),
                k_tilde.new_zeros(B, H, D, dtype=work),
            )
        return k_tilde.clone(), final if output_final_state else None
    log_scale, state = _chunked_state(
        k_tilde.to(work),
        log_gate.to(work),
        log_decay.to(work),
        doc_pos,
        chunk_size,
        _inner_log_dtype(k_tilde.device),
    )
    log_scale = log_scale.to(work)  # the weights inside ``state`` were formed in fp64
    if initial_state is not None:
        # carry weight exp(c0 - L_t) while no document has started in [0, t]
        c0, s0 = initial_state[0].to(work), initial_state[1].to(work)
        carried = (~reset).long().cumprod(-1).bool().unsqueeze(1)  # [B, 1, T]
        l_glob = log_decay.to(_inner_log_dtype(log_decay.device)).cumsum(-1)
        log_carry = torch.where(carried, (c0.to(l_glob.dtype).unsqueeze(-1) - l_glob), -math.inf)
        log_carry = log_carry.to(work)
        with torch.no_grad():
            top = torch.maximum(log_scale, log_carry)
        w_in = (log_scale - top).exp().unsqueeze(-1)
        w_carry = (log_carry - top).exp().unsqueeze(-1)  # 0 where not carried
        state = state * w_in + s0.unsqueeze(2) * w_carry
        log_scale = top
    keys = _normalize(log_scale, state, eps).to(k_tilde.dtype)
    final = (log_scale[..., -1], state[..., -1, :]) if output_final_state else None
    return keys, final


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
            self.keys = torch.cat(
                [self.keys, self.keys.new_zeros(*self.keys.shape[:2], grow, self.keys.shape[3])], 2
            )
            self.values = torch.cat(
                [
                    self.values,
                    self.values.new_zeros(*self.values.shape[:2], grow, self.values.shape[3]),
                ],
                2,
            )
            self.pos = torch.cat([self.pos, self.pos.new_full((grow,), -1)])
        self.keys[:, :, self.size : need], self.values[:, :, self.size : need] = k, v
        self.pos[self.size : need] = pos
        self.size = need

    def map_batch(self, fn: Any) -> None:
        if self.keys is not None:
            self.keys, self.values = fn(self.keys), fn(self.values)


class MemoryState:
    """Decoding state of one memory of one layer: the state of the key recurrence (Eq. 8),
    the last token's pair awaiting its look-ahead value ṽ_{t+1} (Eq. 9), the stored pairs."""

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
            self.memories.append(
                {k: MemoryState(ring if k == "short" else 0) for k in self.config.memory_kinds}
            )
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
