"""Hugging Face model of Memory Mosaics v2 ("Memory Mosaics at scale", arXiv 2507.03285).

Self-contained: imports only ``torch``, ``transformers`` and the standard library, so a model
directory holding this file, ``configuration_memory_mosaics.py``, ``config.json`` and the
safetensors weights loads with ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)``.

Block (paper §3.3, Fig. 2), pre-norm RMSNorm, no position encoding, untied classifier:
    x ← x + W_o [STM(RMSNorm₁ x) ‖ LTM(RMSNorm₁ x)]
    x ← x + W₂(SiLU(W₁ RMSNorm₂ x) ⊙ W₃ RMSNorm₂ x)        (persistent memory)

Every forward call (full sequence, prefill or one decoding step) runs the same code path,
:meth:`MemoryMosaicsMemory.forward`, on the new tokens plus an optional
:class:`MemoryMosaicsCache`; without a cache it starts from an empty state.

The definitions marked ``# Copied from`` restate the library's (``mm_megatron``) so that this
file needs no more than torch; ``tools/check_copies.py`` checks that they still match.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .cache_memory_mosaics import L2_EPS, MemoryMosaicsCache, MemoryState, gated_key_scan
from .configuration_memory_mosaics import MemoryMosaicsConfig

Tensor = torch.Tensor


def _cache_field(output_class: type) -> str:
    """Name under which the running transformers passes the cache to ``forward`` and reads it
    back from the outputs: ``cache`` since transformers 5.24, ``past_key_values`` before."""
    names = {f.name for f in dataclasses.fields(output_class)}
    return "cache" if "cache" in names else "past_key_values"


CACHE_KWARG = _cache_field(CausalLMOutputWithPast)


# Copied from mm_megatron.memory_math.HEAD_SCALARS
HEAD_SCALARS = ("beta0_raw", "beta1_raw", "alpha_raw", "gamma", "value_scale_raw")


# Table 6 initialisation: σ of the matrices, the per-head scalars.
# Copied from mm_megatron.init_rules.TABLE6_SCALARS
TABLE6_SCALARS = {"beta0_raw": 1.5, "beta1_raw": 1.5, "alpha_raw": 1 / 3, "value_scale_raw": 0.0}


# Copied from mm_megatron.init_rules.table6_std
def table6_std(fan: int, layer_index: int) -> float:
    """Table 6: σ = 1/√(2·fan·(l+1)) for the matrices of block l (0-based)."""
    return 1.0 / math.sqrt(2 * fan * (layer_index + 1))


# Copied from mm_megatron.init_rules.table6_init_
def table6_init_(weight: torch.Tensor, std: float) -> torch.Tensor:
    """Table 6: N(0, σ) clipped to [-3σ, 3σ] (a truncated normal)."""
    return nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-3 * std, b=3 * std)


# Copied from mm_megatron.init_rules.init_head_scalars_
@torch.no_grad()
def init_head_scalars_(params: dict[str, torch.Tensor]) -> None:
    """Table 6 per-head scalars in place: :data:`TABLE6_SCALARS`, then γ ~ U(0, 1).

    Through ``nn.init``: transformers 5.x guards those functions while loading, so that
    weights read from a checkpoint are not initialised again (in-place tensor methods
    would overwrite them)."""
    for name, value in TABLE6_SCALARS.items():
        nn.init.constant_(params[name], value)
    nn.init.uniform_(params["gamma"], 0.0, 1.0)


# Copied from mm_megatron.ops.rms_norm.rms_norm
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32: x / sqrt(mean(x²) + eps) · weight."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


# Copied from mm_megatron.ops.naive.l2_normalize
def l2_normalize(x: torch.Tensor, eps: float = L2_EPS) -> torch.Tensor:
    """Norm(x) of Eq. 8 and Eq. 9: divide each head vector by its L2 norm (no parameters)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


# Copied from mm_megatron.memory_math.bandwidth_params
def bandwidth_params(
    beta0_raw: torch.Tensor, beta1_raw: torch.Tensor, alpha_raw: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Table 6 reparameterisation: β₀ = e^{min(θ,10)}, β₁ = e^{min(θ,10)}, α = min(|θ|, 1)."""
    beta0 = beta0_raw.float().clamp(max=10.0).exp()
    beta1 = beta1_raw.float().clamp(max=10.0).exp()
    alpha = alpha_raw.float().abs().clamp(max=1.0)
    return beta0, beta1, alpha


# Copied from mm_megatron.memory_math.value_scale
def value_scale(value_scale_raw: torch.Tensor) -> torch.Tensor:
    """α_ψ = e^{min(|θ|, 15)} (Table 6)."""
    return value_scale_raw.float().abs().clamp(max=15.0).exp()


# Copied from mm_megatron.ops.naive.adaptive_beta
def adaptive_beta(
    n: torch.Tensor, beta0: torch.Tensor, beta1: torch.Tensor, alpha: torch.Tensor
) -> torch.Tensor:
    """Adaptive bandwidth of Eq. 6, β(n) = β₁ · n^α + β₀, per (batch, head, query).

    ``n`` is ``[B, T]``; the per-head parameters are ``[H]`` (already reparameterised).
    Rows with n = 0 are empty and their β is irrelevant; n is clamped to 1 there so no
    0^α appears (its gradient in α would be NaN). Returns ``[B, H, T]``.
    """
    n = n.clamp_min(1).to(beta0.dtype).unsqueeze(1)  # [B, 1, T]

    def per_head(p: torch.Tensor) -> torch.Tensor:
        return p.view(1, -1, 1)

    return per_head(beta1) * n.pow(per_head(alpha)) + per_head(beta0)


def memory_read(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
    """Associative memory read, Eq. 4: y_p = Σ_j softmax_j(q_p · k_j) v_j over allowed pairs.

    Softmax scale 1 (β is inside q). Rows with no allowed pair output 0 (Eq. 10 convention).
    q ``[B, H, Tq, D]``; k, v ``[B, H, Tk, D]``; allowed ``[B, 1, Tq, Tk]`` bool.
    """
    if k.shape[2] == 0:
        return torch.zeros_like(q)
    empty = ~allowed.any(-1, keepdim=True)  # [B, 1, Tq, 1]
    mask = allowed | (empty & (torch.arange(k.shape[2], device=q.device) == 0))  # no NaN rows
    y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=1.0)
    return y.masked_fill(empty, 0.0)


# Copied from mm_megatron.reference.RMSNorm with RMSNorm->MemoryMosaicsRMSNorm
class MemoryMosaicsRMSNorm(nn.Module):
    """The pre-norm of a block: :func:`rms_norm` with a learnable gain (1 at initialisation)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class MemoryMosaicsMemory(nn.Module):
    """One contextual associative memory (short- or long-term), paper §3.2-3.3."""

    def __init__(self, config: MemoryMosaicsConfig, kind: str, layer_index: int) -> None:
        super().__init__()
        d, H = config.hidden_size, config.num_heads
        self.num_heads, self.eps = H, config.l2_norm_eps
        # lags read by a query at p (Eq. 10): STM p-stm_max_lag..p-1, LTM ..p-m
        self.min_lag = 1 if kind == "short" else config.ltm_offset
        self.max_lag = config.stm_max_lag if kind == "short" else None
        self.W_phi = nn.Linear(d, d, bias=False)  # k̃ = W_φ x (Eq. 8)
        self.W_psi = nn.Linear(d, d, bias=False)  # ṽ = W_ψ x (Eq. 9)
        self.W_g = nn.Linear(d, H, bias=False)  # g = exp(W_g x)
        self.W_lam = nn.Linear(d, H, bias=False)  # λ = exp(-|W_λ x|)
        for lin in (self.W_phi, self.W_psi, self.W_g, self.W_lam):
            lin.table6_std = table6_std(d, layer_index)
        # raw per-head scalars: β₀, β₁, α of Eq. 6 (bandwidth_params), γ of Eq. 9 and α_ψ
        # (value_scale)
        for name in HEAD_SCALARS:
            setattr(self, name, nn.Parameter(torch.empty(H)))
        self.reset_scalars()

    def reset_scalars(self) -> None:
        """Table 6 initial values of the per-head scalars (:func:`init_head_scalars_`)."""
        init_head_scalars_({name: getattr(self, name) for name in HEAD_SCALARS})

    def _values(self, v_cur: Tensor, v_next: Tensor) -> Tensor:
        """Eq. 9: v = α_ψ Norm(γ ṽ_t + (1-γ) ṽ_{t+1})."""
        g = self.gamma.to(v_cur.dtype).view(1, -1, 1, 1)
        scale = value_scale(self.value_scale_raw)
        return scale.to(v_cur.dtype).view(1, -1, 1, 1) * l2_normalize(
            g * v_cur + (1 - g) * v_next, self.eps
        )

    def forward(
        self, z: Tensor, qpos: Tensor, start: Tensor, end: Tensor | None, state: MemoryState | None
    ) -> Tensor:
        """Outputs ``[B, T, d]`` for new tokens at absolute positions ``qpos`` ``[T]``.

        ``start`` ``[B]``: position of each row's first real token (left padding); ``end``
        ``[B]`` or None: one past each row's last real token (right padding). Padding never
        enters a memory: no pair of a pad position is stored or read, and the look-ahead
        value ṽ_{t+1} of Eq. 9 is 0 where t+1 is a pad, as at a document's end.
        ``state``: the cache of this memory (updated in place), or None (empty past).
        """
        B, T, _ = z.shape
        H = self.num_heads

        def heads(t: Tensor) -> Tensor:
            return t.view(B, T, H, -1).transpose(1, 2)

        k_tilde, v_tilde = heads(self.W_phi(z)), heads(self.W_psi(z))
        log_gate, log_decay = self.W_g(z).transpose(1, 2), self.W_lam(z).abs().transpose(1, 2)
        reset = qpos.view(1, T) == start.view(B, 1)  # a document starts: k̄ restarts from 0
        carry = state.carry if state is not None else None
        keys, carry = gated_key_scan(
            k_tilde, log_gate, log_decay, reset, carry, state is not None, self.eps
        )
        keys = keys.to(z.dtype)
        # Pairs completed by these tokens: the pending one of the previous call, then t < T-1.
        keep_next = ~reset[:, 1:]
        if end is not None:
            keep_next = keep_next & (qpos[1:].view(1, T - 1) < end.view(B, 1))
        v_next = v_tilde[:, :, 1:] * keep_next.view(B, 1, T - 1, 1).to(z.dtype)
        new_k, new_v, new_pos = keys[:, :, :-1], self._values(v_tilde[:, :, :-1], v_next), qpos[:-1]
        if state is not None and state.last_key is not None:
            nxt = v_tilde[:, :, :1] * (~reset[:, :1]).view(B, 1, 1, 1).to(z.dtype)
            done_v = self._values(state.last_v, nxt)
            new_k = torch.cat([state.last_key, new_k], 2)
            new_v = torch.cat([done_v, new_v], 2)
            new_pos = torch.cat([qpos[:1] - 1, new_pos])
        k_all, v_all, pos_all = new_k, new_v, new_pos
        if state is not None and not state.pairs.ring:  # long-term: store, then read in place
            state.pairs.append(new_k, new_v, new_pos)
            k_all, v_all, pos_all = state.pairs.view()
        elif state is not None:  # short-term: read ring + new pairs (a chunk may overflow it)
            stored = state.pairs.view()
            if stored is not None:
                k_all = torch.cat([stored[0], new_k], 2)
                v_all = torch.cat([stored[1], new_v], 2)
                pos_all = torch.cat([stored[2], new_pos])
            state.pairs.append(new_k, new_v, new_pos)
        lag = qpos.view(T, 1) - pos_all.view(1, -1)
        allowed = (lag >= self.min_lag) & (pos_all.view(1, 1, -1) >= start.view(B, 1, 1))
        if end is not None:
            allowed = allowed & (pos_all.view(1, 1, -1) < end.view(B, 1, 1))
        if self.max_lag is not None:
            allowed = allowed & (lag <= self.max_lag)
        beta0, beta1, alpha = bandwidth_params(self.beta0_raw, self.beta1_raw, self.alpha_raw)
        beta = adaptive_beta(allowed.sum(-1), beta0, beta1, alpha)  # Eq. 6, n = visible pairs
        y = memory_read(
            keys * beta.unsqueeze(-1).to(keys.dtype), k_all, v_all, allowed.unsqueeze(1)
        )
        if state is not None:
            state.carry, state.last_key, state.last_v = carry, keys[:, :, -1:], v_tilde[:, :, -1:]
        return y.transpose(1, 2).reshape(B, T, -1)


class MemoryMosaicsBlock(nn.Module):
    def __init__(self, config: MemoryMosaicsConfig, layer_index: int) -> None:
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.norm1 = MemoryMosaicsRMSNorm(d, config.rms_norm_eps)
        self.memories = nn.ModuleDict(
            {k: MemoryMosaicsMemory(config, k, layer_index) for k in config.memory_kinds}
        )
        self.W_o = nn.Linear(len(config.memory_kinds) * d, d, bias=False)
        self.norm2 = MemoryMosaicsRMSNorm(d, config.rms_norm_eps)
        self.W1 = nn.Linear(d, f, bias=False)
        self.W3 = nn.Linear(d, f, bias=False)
        self.W2 = nn.Linear(f, d, bias=False)
        for lin in (self.W_o, self.W1, self.W3):
            lin.table6_std = table6_std(d, layer_index)  # W_o too uses d, not its fan-in 2d
        self.W2.table6_std = table6_std(f, layer_index)

    def forward(
        self,
        x: Tensor,
        qpos: Tensor,
        start: Tensor,
        end: Tensor | None,
        states: dict[str, MemoryState] | None,
    ) -> Tensor:
        z = self.norm1(x)
        ys = [
            mem(z, qpos, start, end, states[k] if states is not None else None)
            for k, mem in self.memories.items()
        ]
        x = x + self.W_o(torch.cat(ys, dim=-1))
        z = self.norm2(x)
        return x + self.W2(F.silu(self.W1(z)) * self.W3(z))


class MemoryMosaicsPreTrainedModel(PreTrainedModel):
    config_class = MemoryMosaicsConfig
    base_model_prefix = "model"
    _no_split_modules = ["MemoryMosaicsBlock"]
    supports_gradient_checkpointing = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Table 6: :func:`table6_init_` with σ = :func:`table6_std` (fan d, or d' for W₂, and
        the block's index) for the block matrices and 1/√(2d) for the embedding and the
        classifier; unit RMSNorm weights; the per-head scalars by :func:`init_head_scalars_`."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = getattr(module, "table6_std", 1.0 / math.sqrt(2 * self.config.hidden_size))
            table6_init_(module.weight, std)
        elif isinstance(module, MemoryMosaicsRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, MemoryMosaicsMemory):
            module.reset_scalars()


class MemoryMosaicsModel(MemoryMosaicsPreTrainedModel):
    """Embedding, N_b blocks and the final norm (hidden states out)."""

    def __init__(self, config: MemoryMosaicsConfig) -> None:
        super().__init__(config)
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(
            MemoryMosaicsBlock(config, i) for i in range(config.num_hidden_layers)
        )
        self.final_norm = MemoryMosaicsRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embedding

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embedding = value

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        past_key_values: MemoryMosaicsCache | None = None,
        inputs_embeds: Tensor | None = None,
        output_hidden_states: bool = False,
        cache: MemoryMosaicsCache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """Final hidden states of the new tokens; the cache (``cache`` or ``past_key_values``,
        whichever the running transformers uses) is updated in place.

        ``attention_mask`` may pad on the left (generation) or, without a cache, on the right
        (fine-tuning batches); the real tokens of a row are one document.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        cache = _given_cache(past_key_values, cache, kwargs)
        past = cache.seen_tokens if cache is not None else 0
        qpos = torch.arange(past, past + T, device=x.device)
        end = None
        if cache is not None and cache.start is not None:
            start = cache.start
        else:
            start, end = _padding_bounds(attention_mask, B, T, x.device)
            if end is not None and cache is not None:
                raise ValueError(
                    "right padding cannot be continued with a cache: pad prompts on "
                    "the left to generate (tokenizer.padding_side = 'left')"
                )
            if cache is not None:
                cache.start = start
        checkpointing = self.gradient_checkpointing and self.training and cache is None
        hidden: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            if output_hidden_states:
                hidden.append(x)
            if checkpointing:
                x = self._gradient_checkpointing_func(block.__call__, x, qpos, start, end, None)
            else:
                x = block(x, qpos, start, end, cache.layer(i) if cache is not None else None)
        if cache is not None:
            cache.seen_tokens += T
        x = self.final_norm(x)
        if output_hidden_states:
            hidden.append(x)
        states = tuple(hidden) if output_hidden_states else None
        return BaseModelOutputWithPast(
            last_hidden_state=x,
            hidden_states=states,
            **{_cache_field(BaseModelOutputWithPast): cache},
        )


def _padding_bounds(
    attention_mask: Tensor | None, B: int, T: int, device: Any
) -> tuple[Tensor, Tensor | None]:
    """Each row's first real token and (for right padding) one past its last; the real tokens
    of a row must be contiguous: padding on the left, on the right, or both."""
    if attention_mask is None or bool(attention_mask[:, -T:].all()):
        return torch.zeros(B, dtype=torch.long, device=device), None
    if attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask must be [batch, length] (0 = padding), got shape "
            f"{tuple(attention_mask.shape)}"
        )
    mask = attention_mask[:, -T:].to(device).bool()
    idx = torch.arange(T, device=device).view(1, T)
    start = torch.where(mask, idx, T).amin(-1)
    end = start + mask.sum(-1)
    if not torch.equal(mask, (idx >= start.view(B, 1)) & (idx < end.view(B, 1))):
        raise ValueError(
            "MemoryMosaics supports left or right padding only: the real tokens "
            "of a row (attention_mask 1) must be contiguous, one document"
        )
    return start, (end if bool((end < T).any()) else None)


def _register_lora_targets() -> None:
    """Declare the default LoRA target modules (every projection of the memories, the output
    projection and the persistent memory) to PEFT, when PEFT is installed."""
    try:
        from peft.utils import constants
    except ImportError:
        return
    mapping = getattr(constants, "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING", None)
    if isinstance(mapping, dict):
        mapping.setdefault(MemoryMosaicsConfig.model_type, LORA_TARGET_MODULES)


LORA_TARGET_MODULES = ["W_phi", "W_psi", "W_o", "W1", "W2", "W3"]


class MemoryMosaicsForCausalLM(MemoryMosaicsPreTrainedModel, GenerationMixin):
    """MM v2 language model with the untied classifier W_c (``lm_head``)."""

    def __init__(self, config: MemoryMosaicsConfig) -> None:
        super().__init__(config)
        self.model = MemoryMosaicsModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embedding

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embedding = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # no DynamicCache: generate() gets a MemoryMosaicsCache below

    def _prepare_cache_for_generation(
        self, generation_config: Any, model_kwargs: dict, *args: Any, **kwargs: Any
    ) -> None:
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if generation_config.use_cache is not False and model_kwargs.get(CACHE_KWARG) is None:
            model_kwargs[CACHE_KWARG] = MemoryMosaicsCache(self.config)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        return_dict: bool | None = None,
        output_hidden_states: bool | None = None,
        num_items_in_batch: int | Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits for the new tokens; with ``use_cache`` (or a cache given), the updated cache.

        The cache comes as ``cache`` (transformers ≥ 5.24) or ``past_key_values`` (before);
        it must be a :class:`MemoryMosaicsCache`, and is updated in place. Unless asked for, no
        cache is built in training mode, with labels, or for a right-padded batch. ``labels``
        gives the next-token cross-entropy (-100 ignored), averaged over the labelled tokens,
        or summed and divided by ``num_items_in_batch`` when the Trainer passes it (gradient
        accumulation).
        """
        given = _given_cache(past_key_values, cache, kwargs)
        if use_cache is None:  # by default, a cache only where decoding can continue from it
            use_cache = (
                self.config.use_cache
                and not self.training
                and labels is None
                and not _right_padded(attention_mask)
            )
        if given is None and use_cache:
            given = MemoryMosaicsCache(self.config)
        if output_hidden_states is None:
            output_hidden_states = bool(self.config.output_hidden_states)
        out = self.model(
            input_ids,
            attention_mask,
            given,
            inputs_embeds,
            output_hidden_states=output_hidden_states,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(out.last_hidden_state[:, keep])
        loss = None
        if labels is not None:
            loss = _next_token_loss(logits, labels, num_items_in_batch, attention_mask)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=out.hidden_states, **{CACHE_KWARG: given}
        )


def _right_padded(attention_mask: Tensor | None) -> bool:
    return (
        attention_mask is not None
        and attention_mask.dim() == 2
        and not bool(attention_mask[:, -1].all())
    )


def _given_cache(
    past_key_values: Cache | None, cache: Cache | None, kwargs: dict[str, Any]
) -> MemoryMosaicsCache | None:
    """The one cache passed to forward under any name, checked to be a MemoryMosaicsCache.

    A cache is never replaced by a fresh one: a foreign cache (e.g. a DynamicCache) or a cache
    under an unknown keyword is an error, since ignoring it would decode wrong tokens."""
    for name, value in kwargs.items():
        if isinstance(value, Cache):
            raise TypeError(f"MemoryMosaics got a cache as '{name}'; pass it as '{CACHE_KWARG}'")
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("two different caches were given (past_key_values and cache)")
    given = cache if cache is not None else past_key_values
    if given is not None and not isinstance(given, MemoryMosaicsCache):
        raise TypeError(
            f"MemoryMosaics needs a MemoryMosaicsCache (MemoryMosaicsCache(config)), "
            f"got {type(given).__name__}"
        )
    return given


def _next_token_loss(
    logits: Tensor,
    labels: Tensor,
    num_items_in_batch: int | Tensor | None,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Cross-entropy of token t+1 from position t, -100 ignored; a mean over the labelled
    tokens, or a sum divided by ``num_items_in_batch`` (the labelled tokens of all the batches
    accumulated into one optimizer step, as the Trainer counts them).

    No prediction is made from a pad (``attention_mask`` 0 at t): with left padding, the first
    real token of a row is not a target, as when the row is run alone, so that the loss never
    depends on the pad tokens."""
    target = labels[:, 1:]
    if attention_mask is not None and attention_mask.dim() == 2:
        from_pad = attention_mask[:, -logits.shape[1] :][:, :-1].to(target.device) == 0
        target = target.masked_fill(from_pad, -100)
    logits = logits[:, :-1].flatten(0, 1).float()
    target = target.flatten().to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, target, ignore_index=-100)
    total = F.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


_register_lora_targets()
