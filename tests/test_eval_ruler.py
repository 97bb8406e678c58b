"""RULER-style generators and scorers on hand-made cases whose answers are known: prompts fit
the token budget, are deterministic, hold the needles they ask about, and the scorers follow
RULER's string_match_all / string_match_part."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from eval_fixtures import byte_tokenizer

from mm_megatron.eval.ruler import TASKS, PromptTooLong, fit_units, insert_at_depths, make_sample
from mm_megatron.eval.ruler_qa import read_qa_file
from mm_megatron.eval.ruler_text import open_haystack
from mm_megatron.eval.scoring import clean_prediction, match_all, match_part, mean_percent


@pytest.fixture(scope="module")
def count(tmp_path_factory):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(byte_tokenizer(tmp_path_factory.mktemp("t"))))
    return lambda text: len(tok.encode(text, add_special_tokens=False)) + 1


def test_fit_units_finds_the_largest_fitting_size():
    assert fit_units(lambda n: "a" * n, len, 37)[0] == 37
    assert fit_units(lambda n: "ab" * n, len, 37)[:2] == (18, "ab" * 18)
    assert fit_units(lambda n: "a" * (5 + n), len, 5)[0] == 0
    assert fit_units(lambda n: "a" * n, len, 1000, maximum=10)[0] == 10
    with pytest.raises(PromptTooLong):
        fit_units(lambda n: "a" * (10 + n), len, 5)


def test_insert_at_depths():
    assert insert_at_depths(["a", "b", "c", "d"], ["X", "Y"], [0.0, 0.5]) == [
        "X",
        "a",
        "b",
        "Y",
        "c",
        "d",
    ]
    assert insert_at_depths(["a", "b"], ["Z"], [1.0]) == ["a", "b", "Z"]


SYNTHETIC = [t for t, s in TASKS.items() if s.family != "qa"]


@pytest.mark.parametrize("task", SYNTHETIC)
def test_prompts_fit_the_budget_and_are_deterministic(task, count):
    length = 3072
    a = make_sample(task, length, 0, 1, count)
    assert a.tokens == count(a.prompt) <= length - a.max_new_tokens
    assert a.tokens > 0.75 * (length - a.max_new_tokens)  # filled, not just short
    assert make_sample(task, length, 0, 1, count).prompt == a.prompt
    assert make_sample(task, length, 1, 1, count).prompt != a.prompt
    assert make_sample(task, length, 0, 2, count).prompt != a.prompt
    assert a.answers and all(ans in a.prompt for ans in a.answers)


def _question_part(prompt: str) -> str:
    return prompt.rsplit("\n\nQuestion:", 1)[1]


@pytest.mark.parametrize(
    "task,keys,values,queries",
    [
        ("niah_single_1", 1, 1, 1),
        ("niah_multikey_1", 4, 1, 1),
        ("niah_multivalue", 1, 4, 1),
        ("niah_multiquery", 4, 1, 4),
        ("niah_multikey_2", None, 1, 1),
        ("niah_multikey_3", None, 1, 1),
    ],
)
def test_niah_needles_answer_the_question(task, keys, values, queries, count):
    s = make_sample(task, 2048, 3, 0, count)
    needles = re.findall(r"The special (?:number|code) for (\S+) is (\S+)\.", s.prompt)
    by_key: dict[str, list[str]] = {}
    for k, v in needles:
        by_key.setdefault(k, []).append(v)
    question = _question_part(s.prompt)
    asked = [k for k in by_key if k in question]
    assert len(asked) == queries
    assert sorted(s.answers) == sorted(v for k in asked for v in by_key[k])
    assert len(s.answers) == values * queries
    if keys is not None:
        assert len(by_key) == keys
    else:  # a haystack made of needles: many keys, all distinct
        assert len(by_key) > 10 and all(len(v) == 1 for v in by_key.values())
    if TASKS[task].params["haystack"] == "noise":
        assert "The river runs slowly toward the sea." in s.prompt


def test_variable_tracking_chain(count):
    s = make_sample("vt", 2048, 0, 0, count)
    body = s.prompt.rsplit("Keep track of the variable", 1)[1]  # after the worked example
    value = re.search(r"hold the value (\d+)", _question_part(s.prompt)).group(1)
    holders, changed = set(), True
    assigns = re.findall(r"VAR (\w+) = (VAR (\w+)|\d+)\.", body)
    while changed:
        changed = False
        for var, rhs, src in assigns:
            if var not in holders and (rhs == value or src in holders):
                holders.add(var)
                changed = True
    assert sorted(holders) == sorted(s.answers) and len(holders) == 5


def test_common_and_frequent_words_are_the_most_frequent(count):
    s = make_sample("cwe", 4096, 0, 0, count)
    listing = s.prompt.rsplit("Below is a numbered list", 1)[1].split("\n\nQuestion:")[0]
    counts = Counter(re.findall(r"\d+\. (\w+)", listing))
    top = sorted(counts, key=lambda w: -counts[w])[:10]
    assert sorted(top) == sorted(s.answers)
    assert min(counts[w] for w in top) > max(c for w, c in counts.items() if w not in top)
    f = make_sample("fwe", 2048, 0, 0, count)
    text = f.prompt.rsplit("Below is a coded text", 1)[1].split("\n\n")[1]
    counts = Counter(text.split())
    ranked = [w for w, _ in counts.most_common(4)]
    assert ranked[:3] == f.answers and counts[ranked[2]] > counts[ranked[3]]


def _squad(tmp_path):
    facts = [
        (
            "The Normans were Christians who lived in Normandy.",
            "What religion were the Normans?",
            "Christians",
        ),
        ("Paris lies on the Seine.", "What river flows through Paris?", "Seine"),
        ("The Moon orbits the Earth.", "What does the Moon orbit?", "the Earth"),
    ]
    data = {
        "data": [
            {"paragraphs": [{"context": c, "qas": [{"question": q, "answers": [{"text": a}]}]}]}
            for c, q, a in facts
        ]
    }
    data["data"][0]["paragraphs"][0]["qas"].append(
        {"question": "Unanswerable?", "answers": [], "is_impossible": True}
    )
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(data))
    return path


def test_qa_squad_and_hotpotqa(tmp_path, count):
    qa = read_qa_file(_squad(tmp_path))
    assert qa.task == "qa_squad" and len(qa.questions) == 3 and len(qa.docs) == 3
    for i in range(3):
        s = make_sample("qa_squad", 1024, i, 0, count, qa=qa)
        q = next(q for q in qa.questions if q.question in s.prompt)
        assert qa.docs[q.gold[0]] in s.prompt and s.answers == list(q.answers)
        assert s.prompt.count("Document ") == 1 + s.meta["distractors"] == 3  # all fit
        assert s.metric == "part"
    hotpot = [
        {
            "question": f"Q{i}?",
            "answer": f"A{i}",
            "context": [[f"T{i}", [f"S{i}a. ", f"S{i}b."]], [f"U{i}", [f"x{i}."]]],
        }
        for i in range(4)
    ]
    path = tmp_path / "hotpot.jsonl"
    path.write_text("".join(json.dumps(h) + "\n" for h in hotpot))
    hq = read_qa_file(path)
    assert hq.task == "qa_hotpotqa" and len(hq.docs) == 8
    s = make_sample("qa_hotpotqa", 1024, 0, 0, count, qa=hq)
    i = int(re.search(r"Question: Q(\d)\?", s.prompt).group(1))
    assert f"T{i}\nS{i}a. S{i}b." in s.prompt and s.answers == [f"A{i}"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "q", "answer": "a", "context": "oops"}]))
    with pytest.raises(ValueError, match=r"bad.json: item 0"):
        read_qa_file(bad)


def test_corpus_haystacks_jsonl_and_indexed(tmp_path, count):
    from transformers import PreTrainedTokenizerFast

    from mm_megatron.data.indexed import IndexedWriter

    docs = [f"Corpus sentence number {i} is here. It has a second part {i}!" for i in range(50)]
    jl = tmp_path / "c.jsonl"
    jl.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    hay = open_haystack(str(jl), field="body")
    s = make_sample("niah_single_2", 1024, 0, 0, count, hay)
    assert "Corpus sentence number" in s.prompt and s.meta["haystack"] == str(jl)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(byte_tokenizer(tmp_path / "t")))
    with IndexedWriter(tmp_path / "idx", "uint16") as w:
        for d in docs:
            w.add_document(tok.encode(d, add_special_tokens=False))
        w.finalize()
    hay = open_haystack(str(tmp_path / "idx"), decode=tok.decode)
    s = make_sample("niah_single_2", 1024, 0, 0, count, hay)
    assert "It has a second part" in s.prompt
    (tmp_path / "bad.jsonl").write_text('{"text": "ok."}\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no string field 'text'"):
        make_sample("niah_single_2", 1024, 0, 0, count, open_haystack(str(tmp_path / "bad.jsonl")))
    with pytest.raises(ValueError, match="neither a jsonl file nor an indexed"):
        open_haystack(str(tmp_path / "missing"))


def test_scorers_on_known_cases():
    assert clean_prediction(" 123\n456\x07 ") == "123 456"
    assert match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert match_all("ABCDE FGHIJ", ["abcde", "fghij"]) == 1.0  # case-insensitive
    assert match_all("nothing", ["1"]) == 0.0
    assert match_part("They were Christians.", ["Christian", "Catholic"]) == 1.0
    assert match_part("Muslims", ["Christian", "Catholic"]) == 0.0
    assert mean_percent([1.0, 0.5, 0.0]) == pytest.approx(50.0)
    with pytest.raises(ValueError):
        match_all("x", [])


def test_a_length_too_short_for_the_task_is_refused(count):
    with pytest.raises(PromptTooLong):
        make_sample("vt", 160, 0, 0, count)
