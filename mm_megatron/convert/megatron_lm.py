"""The training code's Megatron model as a logits function: the reference of the converter's
parity checks and the ``--megatron-checkpoint`` source of ``tools/generate.py``."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from mm_megatron.config import ModelConfig
from mm_megatron.convert.megatron_io import build_full_model
from mm_megatron.convert.megatron_state import VOCAB_KEYS
from mm_megatron.convert.outputs import ConversionError
from mm_megatron.memory_math import default_doc_pos
from mm_megatron.model import document_causal_mask

Tensor = torch.Tensor


class MegatronLM:
    """A TP=1 Megatron model (fp32 on CPU) that computes logits and decodes, without a cache.

    The reference of the converter's parity checks and the ``--megatron-checkpoint`` source of
    ``tools/generate.py`` (``generate`` accepts the keyword arguments it passes).
    """

    def __init__(
        self,
        state_dict: dict[str, Tensor],
        cfg: ModelConfig,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
    ) -> None:
        rows = state_dict[VOCAB_KEYS[0]].shape[0]
        self.cfg = cfg
        self.model = build_full_model(cfg, rows, torch.float32)
        missing, unexpected = self.model.load_state_dict(
            {k: v.float() for k, v in state_dict.items()}, strict=False
        )
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ConversionError(
                f"weights do not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}"
            )
        self.config = SimpleNamespace(bos_token_id=bos_token_id, eos_token_id=eos_token_id)

    @torch.no_grad()
    def logits(self, tokens: Tensor) -> Tensor:
        """Logits ``[B, T, vocab_size]`` (padding removed) of token ids ``[B, T]`` (fp32)."""
        tokens = tokens.cpu()
        if self.cfg.arch == "mm":
            out = self.model(tokens)
        else:
            pos = default_doc_pos(tokens.shape[0], tokens.shape[1], tokens.device)
            out = self.model(tokens, pos, document_causal_mask(pos))
        return out[..., : self.cfg.vocab_size].float()

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        **_: Any,
    ) -> Tensor:
        """Greedy or temperature/top-p decoding of one prompt, recomputing the whole sequence
        at every step; stops after EOS. ``attention_mask`` must be all ones."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padding is not supported: one unpadded prompt per call")
        seq = input_ids.cpu()
        for _step in range(max_new_tokens):
            last = self.logits(seq)[:, -1]
            if do_sample:
                probs = (last / temperature).softmax(-1)
                ordered, order = probs.sort(-1, descending=True)
                drop = ordered.cumsum(-1) - ordered > top_p
                ordered = ordered.masked_fill(drop, 0.0)
                nxt = order.gather(-1, torch.multinomial(ordered, 1))
            else:
                nxt = last.argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            eos = self.config.eos_token_id
            if eos is not None and bool((nxt == eos).all()):
                break
        return seq
