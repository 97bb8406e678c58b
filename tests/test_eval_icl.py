"""Many-shot ICL: label variants, demonstration selection, prompt formats, the synthetic data
generator, the jsonl reader's errors, and loglikelihood classification against full forwards."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from hf_fixtures import hf_model, perturbed_reference
from mm_testing import tiny_config

from mm_megatron.eval.icl import (
    TEMPLATES,
    Prediction,
    accuracy,
    classify,
    context_text,
    format_example,
    label_names,
    select_demonstrations,
)
from mm_megatron.eval.icl_data import Example, read_examples, synthetic_examples
from mm_megatron.eval.prefill import prefill


def test_label_variants():
    labels = ["card_arrival", "refund", "top_up"]
    assert label_names(labels, "real", 0) == {k: k for k in labels}
    anon = label_names(labels, "anonymous", 0)
    assert sorted(anon.values()) == ["class_00", "class_01", "class_02"]
    assert anon == label_names(labels, "anonymous", 0)
    assert any(label_names(labels, "anonymous", s) != anon for s in range(1, 6))


def test_demonstrations_one_per_class_per_shot():
    data = synthetic_examples(classes=5, per_class=10, seed=1)
    labels = sorted({e.label for e in data})
    ordered = select_demonstrations(data, labels, 3, "per-class", TEMPLATES["space-ordered"], 0)
    shuffled = select_demonstrations(data, labels, 3, "per-class", TEMPLATES["space-shuffled"], 0)
    assert len(ordered) == 15 and Counter(e.label for e in ordered) == {k: 3 for k in labels}
    for s in range(3):  # each shot holds every class once; only the order differs
        assert {e.label for e in ordered[5 * s : 5 * s + 5]} == set(labels)
        assert set(ordered[5 * s : 5 * s + 5]) == set(shuffled[5 * s : 5 * s + 5])
    assert [e.label for e in ordered[:5]] == [e.label for e in ordered[5:10]]  # fixed order
    assert ordered != shuffled
    assert len(select_demonstrations(data, labels, 7, "total", TEMPLATES["space-ordered"], 0)) == 7
    with pytest.raises(ValueError, match="training examples, fewer than 11 shots"):
        select_demonstrations(data, labels, 11, "per-class", TEMPLATES["space-ordered"], 0)


def test_prompt_formats():
    t = TEMPLATES["newline-ordered"]
    assert format_example("hi there", "greet", t) == "input: hi there\ncategory: greet"
    assert format_example("x", None, TEMPLATES["space-shuffled"]) == "input: x category:"
    demos = [Example("a b", "L1"), Example("c", "L2")]
    text = context_text(demos, {"L1": "class_00", "L2": "class_01"}, t)
    assert text.endswith("input: c\ncategory: class_01\n\n") and "L1" not in text


def test_synthetic_data_is_deterministic_and_learnable():
    a = synthetic_examples(4, 20, seed=3)
    assert a == synthetic_examples(4, 20, seed=3) and a != synthetic_examples(4, 20, seed=4)
    assert Counter(e.label for e in a) == {lab: 20 for lab in {e.label for e in a}}
    # a nearest-keyword rule recovers the label from the text alone
    own: dict[str, Counter] = {}
    for e in a[:60]:
        own.setdefault(e.label, Counter()).update(e.text.split())
    shared = set.intersection(*(set(c) for c in own.values()))
    hits = [
        max(own, key=lambda lab: sum(own[lab][w] for w in e.text.split() if w not in shared))
        == e.label
        for e in a[60:]
    ]
    assert sum(hits) / len(hits) > 0.9


def test_read_examples_errors_name_file_and_line(tmp_path):
    good = tmp_path / "d.jsonl"
    good.write_text('{"text": "a  b", "label": 3}\n\n{"text": "c", "label": "x"}\n')
    assert read_examples(good) == [Example("a b", "3"), Example("c", "x")]
    for body, msg in [
        ('{"text": "a", "label": "x"}\n{"label": "y"}\n', r"d2.jsonl:2: no non"),
        ("nope\n", r"d2.jsonl:1: not JSON"),
        ('{"text": "a", "label": true}\n', r"d2.jsonl:1: field 'label'"),
    ]:
        (tmp_path / "d2.jsonl").write_text(body)
        with pytest.raises(ValueError, match=msg):
            read_examples(tmp_path / "d2.jsonl")


def test_accuracy_on_hand_made_predictions():
    preds = [
        Prediction("a", {"a": -1.0, "b": -2.0}, {"a": -1.0, "b": -0.5}),
        Prediction("b", {"a": -1.0, "b": -3.0}, {"a": -1.0, "b": -0.1}),
    ]
    assert accuracy(preds) == 0.5 and accuracy(preds, norm=True) == 0.5


def test_classify_scores_equal_full_forward():
    cfg = tiny_config(seq_length=128)
    model = hf_model(cfg, perturbed_reference(cfg, seed=2).state_dict())
    g = torch.Generator().manual_seed(4)
    ctx, query = torch.randint(2, 64, (50,), generator=g).tolist(), [7, 8, 9]
    cands = {"x": [3], "y": [4, 5, 6], "z": [10, 11]}
    pred = classify(model, prefill(model, ctx, 16), query, cands, "y", chunk_size=2, batch_size=2)
    for lab, ids in cands.items():
        seq = torch.tensor([ctx + query + ids])
        with torch.no_grad():
            logp = model(seq, use_cache=False).logits[0].log_softmax(-1)
        start = len(ctx) + len(query)
        want = sum(logp[start - 1 + i, t].item() for i, t in enumerate(ids))
        assert pred.scores[lab] == pytest.approx(want, abs=1e-3)
        assert pred.norm_scores[lab] == pytest.approx(want / len(ids), abs=1e-3)
    json.dumps(pred.scores)
