"""Chunked prefill through the cache computes what one full forward computes, on a tiny MM v2
model and on the Llama baseline; continuation scores and greedy decoding on the cache match
full forwards and ``model.generate``."""

from __future__ import annotations

import pytest
import torch
from hf_fixtures import hf_model, perturbed_reference
from mm_testing import tiny_config

from mm_megatron.eval.prefill import forward_chunks, greedy_decode, prefill, score_continuations


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


@pytest.fixture(scope="module", params=["mm", "llama"])
def model(request):
    if request.param == "mm":
        cfg = tiny_config(seq_length=128)
        return hf_model(cfg, perturbed_reference(cfg, seed=5).state_dict())
    return _llama()


IDS = torch.randint(2, 64, (90,), generator=torch.Generator().manual_seed(11))


@pytest.mark.parametrize("chunk", [1, 7, 32, 90, 500])
def test_chunked_prefill_equals_full_forward(model, chunk):
    with torch.no_grad():
        full = model(IDS[None], use_cache=False).logits[0].float()
    _, got = forward_chunks(model, IDS, chunk, keep_logits=True)
    assert got.shape == full.shape
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-4)
    cache, last = forward_chunks(model, IDS, chunk)
    torch.testing.assert_close(last[0], full[-1], rtol=1e-5, atol=1e-4)
    assert cache.get_seq_length() == len(IDS)


def test_continuation_scores_equal_full_forward_logprobs(model):
    with torch.no_grad():
        logp = model(IDS[None], use_cache=False).logits[0].float().log_softmax(-1)
    state = prefill(model, IDS[:60], chunk_size=16)
    conts = [IDS[60:75].tolist(), IDS[60:61].tolist(), IDS[60:63].tolist(), [5, 9, 3]]
    scores = score_continuations(model, state, conts, batch_size=3)
    for cont, s in zip(conts[:3], scores, strict=False):
        want = sum(logp[59 + i, t].item() for i, t in enumerate(cont))
        assert s.logprob == pytest.approx(want, abs=1e-3) and s.num_tokens == len(cont)
    again = score_continuations(model, state, conts, batch_size=1)  # the state is unchanged
    assert [s.logprob for s in again] == pytest.approx([s.logprob for s in scores], abs=1e-4)
    with pytest.raises(ValueError, match="empty continuation"):
        score_continuations(model, state, [[]])


def test_greedy_decode_on_the_cache_equals_generate(model):
    prompt = IDS[:40]
    state = prefill(model, prompt, chunk_size=9)
    got = greedy_decode(model, state, 30)
    with torch.no_grad():
        want = model.generate(
            prompt[None],
            attention_mask=torch.ones(1, 40, dtype=torch.long),
            max_new_tokens=30,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, 40:].tolist()
    assert got == want and len(got) == 30
    stop = greedy_decode(model, prefill(model, prompt, 9), 30, stop_ids=[got[4]])
    assert stop == got[: got.index(got[4]) + 1]
