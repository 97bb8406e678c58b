"""The exported MM v2 model through the paths users take: ``pipeline("text-generation")``,
lm-evaluation-harness (loglikelihood, greedy generation and a local task end to end), the
transformers version check at load, and the export's own parity gate catching a cache that
forgets. Each check compares with the reference model on the same token ids."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hf_fixtures import perturbed_reference, tiny_tokenizer
from mm_testing import tiny_config

from mm_megatron.convert.hf_export import export_hf
from mm_megatron.convert.parity import ParityError, check_parity
from mm_megatron.hf import modeling_memory_mosaics as modeling
from mm_megatron.hf.configuration_memory_mosaics import (
    ALLOW_UNTESTED_ENV,
    check_transformers_version,
)

pytestmark = pytest.mark.hf
EOS = 1  # the tiny tokenizer's <|end_of_text|>


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("user_paths")
    cfg = tiny_config(seq_length=128)
    ref = perturbed_reference(cfg, seed=7)
    out = tmp / "model"
    export_hf(ref.state_dict(), cfg, out, [tiny_tokenizer(tmp / "tok")])
    return cfg, ref, out


def _reference_greedy(ref, ids: list[int], n: int) -> list[int]:
    """Up to ``n`` greedy tokens after ``ids`` by full reference forwards, stopping at EOS."""
    seq, new = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(ref(torch.tensor([seq]))[0, -1].argmax())
            seq.append(nxt)
            new.append(nxt)
            if nxt == EOS:
                break
    return new


def _reference_loglik(ref, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = ref(ids[:, :-1]).double().log_softmax(-1)[0]
    cont = torch.tensor(continuation)
    return logp[len(context) - 1 :].gather(-1, cont.view(-1, 1)).sum().item()


def test_text_generation_pipeline(exported):
    from transformers import pipeline

    _, ref, out = exported
    pipe = pipeline("text-generation", model=str(out), trust_remote_code=True, device="cpu")
    for prompt in ("the cat", "hello world, the"):
        got = pipe(prompt, max_new_tokens=30, do_sample=False, return_tensors=True)
        ids = pipe.tokenizer(prompt)["input_ids"]
        generated = got[0]["generated_token_ids"]
        assert generated[: len(ids)] == ids
        assert generated[len(ids) :] == _reference_greedy(ref, ids, 30)


def test_lm_eval_loglikelihood_and_generation(exported):
    """lm-eval's HFLM batches and pads requests itself: its numbers equal the reference's on
    the token ids lm-eval encoded."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    _, ref, out = exported
    lm = HFLM(
        pretrained=str(out),
        trust_remote_code=True,
        dtype="float32",
        batch_size=3,
        device="cpu",
        max_length=128,
    )
    pairs = [
        ("the cat sat on", " the mat"),
        ("hello", " world, the end"),
        ("the end", " the cat"),
        ("the mat", " hello"),
    ]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    results = lm.loglikelihood(requests)
    for (context, cont), (loglik, _) in zip(pairs, results, strict=True):
        whole = lm.tok_encode(context + cont)
        ctx = lm.tok_encode(context)
        want = _reference_loglik(ref, ctx, whole[len(ctx) :])
        assert loglik == pytest.approx(want, abs=1e-4)
    gen = [
        Instance(
            "generate_until",
            {},
            (c, {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}),
            i,
        )
        for i, c in enumerate(["the cat", "hello world"])
    ]
    for (context, _), text in zip((r.arguments for r in gen), lm.generate_until(gen), strict=True):
        ids = lm.tok_encode(context)
        want = lm.tok_decode(_reference_greedy(ref, ids, 12), skip_special_tokens=True)
        assert text == want.split("\n\n")[0]


def test_lm_eval_local_task_end_to_end(exported, tmp_path):
    """simple_evaluate on a task defined on disk (no download): the documented command's path."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    _, _, out = exported
    data = tmp_path / "mc.jsonl"
    rows = [
        {"context": "the cat sat on", "choices": [" the mat", " hello"], "label": 0},
        {"context": "hello", "choices": [" world", " the mat"], "label": 0},
    ]
    data.write_text("".join(f"{__import__('json').dumps(r)}\n" for r in rows))
    (tmp_path / "mm_local_mc.yaml").write_text(
        "task: mm_local_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "target_delimiter: ''\nmetric_list:\n  - metric: acc\n"
    )
    res = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={out},trust_remote_code=True,dtype=float32",
        tasks=["mm_local_mc"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        batch_size=2,
        device="cpu",
        log_samples=True,
    )
    acc = res["results"]["mm_local_mc"]["acc,none"]
    samples = res["samples"]["mm_local_mc"]
    assert len(samples) == 2 and 0.0 <= acc <= 1.0
    for s in samples:  # the accuracy follows from the loglikelihoods lm-eval computed
        scores = [r[0][0] for r in s["resps"]]
        assert s["acc"] == float(max(range(len(scores)), key=scores.__getitem__) == s["target"])


def test_version_check_at_load(exported, monkeypatch):
    """Outside the supported range, loading fails with a clear error (checked by the shipped
    configuration file itself, in a process that never imported mm_megatron)."""
    check_transformers_version("4.56.0")
    check_transformers_version("5.24.9")
    with pytest.raises(ImportError, match="needs transformers >=4.56.0"):
        check_transformers_version("4.55.4")
    with pytest.raises(ImportError, match=ALLOW_UNTESTED_ENV):
        check_transformers_version("5.25.0")
    monkeypatch.setenv(ALLOW_UNTESTED_ENV, "1")
    check_transformers_version("6.1.0")
    _, _, out = exported
    code = (
        "import transformers; transformers.__version__ = '4.55.0'\n"
        "from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != ALLOW_UNTESTED_ENV}
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=out.parent,
        timeout=300,
    )
    assert res.returncode != 0
    assert "Memory Mosaics needs transformers >=4.56.0,<5.25; transformers 4.55.0" in res.stderr


def test_parity_gate_catches_a_cache_that_forgets(exported, monkeypatch):
    """The failure a forward-only gate missed: generate() running every step on an empty cache."""
    cfg, ref, out = exported
    prompt = torch.randint(2, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))
    report = check_parity(out, ref, prompt)
    assert report.decode is not None and report.decode.same_tokens
    assert report.decode.cached_max_abs_diff < 1e-4

    def forget(self, idx):  # a fresh, empty state at every call
        return {k: modeling.MemoryState(0) for k in self.config.memory_kinds}

    monkeypatch.setattr(modeling.MemoryMosaicsCache, "layer", forget)
    with pytest.raises(ParityError, match="generate"):
        check_parity(out, ref, prompt)


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_base_model_takes_the_cache_under_either_name(exported, name):
    """AutoModel (no lm_head): prefill + one step on a cache equals one full forward; a cache
    under an unknown keyword is refused rather than ignored."""
    from transformers import AutoModel

    cfg, _, out = exported
    model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    shipped = sys.modules[type(model).__module__]  # the export's own copy of the code
    ids = torch.randint(2, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids).last_hidden_state
        cache = shipped.MemoryMosaicsCache(model.config)
        model(ids[:, :19], **{name: cache})
        assert cache.get_seq_length() == 19
        step = model(ids[:, 19:], **{name: cache}).last_hidden_state
        torch.testing.assert_close(step, full[:, 19:], rtol=1e-5, atol=1e-5)
        with pytest.raises(TypeError, match="got a cache as 'kv'"):
            model(ids, kv=shipped.MemoryMosaicsCache(model.config))
