"""Generation with the exported MM v2 model: the cache gives the same tokens as recomputing
everything, and as argmax over repeated full reference forwards; tools/generate.py runs on an
exported directory."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hf_fixtures import hf_model, perturbed_reference, tiny_tokenizer
from mm_testing import tiny_config
from paths import ROOT

from mm_megatron.convert.hf_export import export_hf

pytestmark = pytest.mark.hf

NEW_TOKENS = 45  # crosses h = 8 and m = 3 many times over


@pytest.fixture(scope="module")
def models():
    cfg = tiny_config(seq_length=128)
    ref = perturbed_reference(cfg, seed=7)
    return cfg, ref, hf_model(cfg, ref.state_dict())


def _reference_greedy(ref, prompt: torch.Tensor, n: int) -> torch.Tensor:
    seq = prompt
    with torch.no_grad():
        for _ in range(n):
            nxt = ref(seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    return seq


@pytest.mark.parametrize("prompt_len", [2, 5, 12])
def test_greedy_cache_equals_no_cache_equals_reference(models, prompt_len):
    """Prompts shorter than m, between m and h, and longer than h; 45 new tokens; also with
    a chunked prefill."""
    cfg, ref, hf = models
    prompt = torch.randint(2, 64, (1, prompt_len), generator=torch.Generator().manual_seed(8))
    lengths = []
    handle = hf.register_forward_pre_hook(
        lambda mod, args, kw: lengths.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    with torch.no_grad():
        cached = hf.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
        steps_cached, lengths[:] = list(lengths), []
        full = hf.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=False)
    handle.remove()
    with torch.no_grad():  # prefill in chunks of 3 tokens on a growing cache
        chunked = hf.generate(
            prompt, max_new_tokens=NEW_TOKENS, do_sample=False, prefill_chunk_size=3
        )
    assert torch.equal(chunked, full)
    assert steps_cached == [prompt_len] + [1] * (NEW_TOKENS - 1)  # one token per step
    assert lengths[-1] == prompt_len + NEW_TOKENS - 1  # recomputed everything
    assert cached.shape == (1, prompt_len + NEW_TOKENS)
    assert torch.equal(cached, full)
    assert torch.equal(cached, _reference_greedy(ref, prompt, NEW_TOKENS))


def test_sampling_batch_and_beams_with_cache(models):
    """Seeded sampling, a left-padded batch and beam search agree with and without cache."""
    _, _, hf = models
    g = torch.Generator().manual_seed(9)
    a, b = torch.randint(2, 64, (1, 10), generator=g), torch.randint(2, 64, (1, 4), generator=g)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 6, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :6] = 0
    with torch.no_grad():
        runs = {}
        for cache in (True, False):
            torch.manual_seed(0)
            sampled = hf.generate(
                a,
                max_new_tokens=30,
                do_sample=True,
                temperature=0.9,
                top_p=0.9,
                num_return_sequences=3,
                use_cache=cache,
            )
            padded = hf.generate(
                batch,
                attention_mask=mask,
                max_new_tokens=30,
                do_sample=False,
                pad_token_id=1,
                use_cache=cache,
            )
            beams = hf.generate(a, max_new_tokens=20, num_beams=3, do_sample=False, use_cache=cache)
            runs[cache] = (sampled, padded, beams)
        single_b = hf.generate(b, max_new_tokens=30, do_sample=False)
    for got, want in zip(runs[True], runs[False], strict=True):
        assert torch.equal(got, want)
    assert torch.equal(runs[True][1][1, 6:], single_b[0])


def _load_tool():
    spec = importlib.util.spec_from_file_location("generate_tool", ROOT / "tools" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generate_tool(models, tmp_path, capsys):
    cfg, ref, _ = models
    out = tmp_path / "model"
    export_hf(ref.state_dict(), cfg, out, [tiny_tokenizer(tmp_path / "tok")])
    tool = _load_tool()
    base = ["--model", str(out), "--prompt", "the cat", "--max-new-tokens", "41", "--device", "cpu"]
    results = {}
    for extra in ([], ["--no-cache"], ["--greedy"]):
        prompt, new, text, _ = tool.generate(tool.parse_args(base + extra))
        results[tuple(extra)] = new
        assert prompt[0] == 0 and len(new) <= 41  # BOS prepended; may stop at EOS
    assert results[()] == results[("--no-cache",)] == results[("--greedy",)]
    seq = _reference_greedy(ref, torch.tensor([prompt]), len(results[()]))
    assert seq[0, len(prompt) :].tolist() == results[()]
    assert tool.main(base + ["--temperature", "0.8", "--top-p", "0.9", "--seed", "3"]) == 0
    assert capsys.readouterr().out.startswith("the cat")
    with pytest.raises(SystemExit, match="not a checkpoint directory"):
        tool.main(["--megatron-checkpoint", str(tmp_path), "--prompt", "x"])
