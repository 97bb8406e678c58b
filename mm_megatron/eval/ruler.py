"""RULER-style long-context tasks: deterministic, tokenizer-aware prompt generators.

The task design follows RULER (Hsieh et al. 2024, arXiv 2404.06654, github.com/NVIDIA/RULER):
its needle-in-a-haystack family (single, multi-key, multi-value, multi-query), variable
tracking (``vt``), common- and frequent-words extraction (``cwe``, ``fwe``) and multi-document
question answering (``qa_1`` SQuAD, ``qa_2`` HotpotQA), with its task parameters (four
needles, four hops, 10 common words at frequency 30, Zipf exponent 2, ...) and its metrics
(``string_match_all`` / ``string_match_part``, :mod:`mm_megatron.eval.scoring`). The prompt
wording is this project's own. The MM v2 paper reports the QA tasks (Tables 3, 4, 10) and
single-needle NIAH (Table 13).

Every prompt is built to a token budget: context length minus the task's generation length.
The filler (haystack sentences, list entries, distractor documents) is the largest number of
units whose prompt, tokenised with the model's tokenizer (BOS included), fits the budget,
found by exponential then binary search on token counts. Everything random comes from a
``random.Random`` seeded by (seed, task, length, sample index).
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mm_megatron.eval.ruler_qa import QAData
from mm_megatron.eval.ruler_text import (
    Haystack,
    key_phrases,
    number_value,
    pseudo_words,
    uuid_value,
)

Counter = Callable[[str], int]


class PromptTooLong(ValueError):
    """The smallest prompt of a task does not fit the budget."""


@dataclass
class Sample:
    """One prompt, the answers that count, and how to score it."""

    task: str
    length: int
    index: int
    prompt: str
    answers: list[str]
    metric: str  # "all" (string_match_all) | "part" (string_match_part)
    max_new_tokens: int
    tokens: int  # prompt tokens, BOS included
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskSpec:
    """A task: its family, RULER's name for it, the metric and generation length."""

    family: str
    ruler_name: str
    metric: str
    max_new_tokens: int
    params: dict[str, Any]
    description: str


def _niah(ruler: str, desc: str, **params: Any) -> TaskSpec:
    base = dict(haystack="corpus", key="words", value="number", keys=1, values=1, queries=1)
    return TaskSpec("niah", ruler, "all", 128, {**base, **params}, desc)


TASKS: dict[str, TaskSpec] = {
    "niah_single_1": _niah(
        "niah_single_1", "one needle (word key, 7-digit number) in noise", haystack="noise"
    ),
    "niah_single_2": _niah("niah_single_2", "one needle (word key, number) in the corpus"),
    "niah_single_3": _niah(
        "niah_single_3", "one needle (word key, UUID) in the corpus", value="uuid"
    ),
    "niah_multikey_1": _niah(
        "niah_multikey_1", "4 needles of different keys in the corpus, one asked", keys=4
    ),
    "niah_multikey_2": _niah(
        "niah_multikey_2", "a haystack made only of needles, one asked", haystack="needles"
    ),
    "niah_multikey_3": _niah(
        "niah_multikey_3",
        "a haystack of needles with UUID keys and values, one asked",
        haystack="needles",
        key="uuid",
        value="uuid",
    ),
    "niah_multivalue": _niah(
        "niah_multivalue", "4 values for the same key; all must be recalled", values=4
    ),
    "niah_multiquery": _niah("niah_multiquery", "4 needles, all 4 keys asked", keys=4, queries=4),
    "vt": TaskSpec(
        "vt",
        "vt",
        "all",
        30,
        dict(chains=1, hops=4),
        "variable tracking: a chain of 4 hops in noise; name every variable",
    ),
    "cwe": TaskSpec(
        "cwe",
        "cwe",
        "all",
        120,
        dict(common=10, freqs=((30, 3), (10, 2), (4, 1))),
        "common words: the 10 most frequent words of a long numbered list",
    ),
    "fwe": TaskSpec(
        "fwe",
        "fwe",
        "all",
        50,
        dict(alpha=2.0, top=3, vocab=1000),
        "frequent words: the 3 most frequent words of Zipf-distributed text",
    ),
    "qa_squad": TaskSpec(
        "qa",
        "qa_1",
        "part",
        32,
        dict(kind="squad"),
        "SQuAD question over its paragraph and distractor paragraphs",
    ),
    "qa_hotpotqa": TaskSpec(
        "qa",
        "qa_2",
        "part",
        32,
        dict(kind="hotpotqa"),
        "HotpotQA question over its paragraphs and distractors",
    ),
}


def sample_rng(seed: int, task: str, length: int, index: int) -> random.Random:
    """The seeded generator of one sample (stable across runs and Python versions)."""
    return random.Random(f"{seed}:{task}:{length}:{index}")


def fit_units(
    render: Callable[[int], str],
    count: Counter,
    budget: int,
    minimum: int = 0,
    maximum: int = 10**7,
) -> tuple[int, str, int]:
    """The largest ``n`` in [minimum, maximum] whose ``render(n)`` has at most ``budget``
    tokens, with its text and token count. Token counts grow with ``n``."""
    text = render(minimum)
    tokens = count(text)
    if tokens > budget:
        raise PromptTooLong(f"the shortest prompt has {tokens} tokens, over the budget {budget}")
    lo, best = minimum, (minimum, text, tokens)
    hi = min(max(2 * minimum, minimum + 16), maximum)
    while lo < maximum:  # exponential search for a size that does not fit
        text = render(hi)
        tokens = count(text)
        if tokens > budget:
            break
        lo, best = hi, (hi, text, tokens)
        if hi == maximum:
            return best
        hi = min(2 * hi, maximum)
    while hi - lo > 1:  # render(lo) fits, render(hi) does not
        mid = (lo + hi) // 2
        text = render(mid)
        tokens = count(text)
        if tokens <= budget:
            lo, best = mid, (mid, text, tokens)
        else:
            hi = mid
    return best


def insert_at_depths(units: list[str], items: list[str], depths: list[float]) -> list[str]:
    """``units`` with each item inserted at fraction ``depth`` of the way through."""
    out = list(units)
    for depth, item in sorted(zip(depths, items, strict=True), key=lambda t: -t[0]):
        out.insert(round(depth * len(units)), item)
    return out


class NeedleHaystack(Haystack):
    """RULER's "needle" haystack (multikey_2/3): every filler line is a needle of another key."""

    name = "needles"

    def __init__(
        self,
        rng: random.Random,
        key: str,
        value: str,
        exclude: set[str],
        needle: Callable[[str, str], str],
    ) -> None:
        self.rng, self.key, self.value = rng, key, value
        self.exclude, self.needle = set(exclude), needle
        self.units: list[str] = []

    def unit(self, i: int) -> str:
        while len(self.units) <= i:
            k = _key(self.rng, self.key)
            if k not in self.exclude:
                self.exclude.add(k)
                self.units.append(self.needle(k, _value(self.rng, self.value)))
        return self.units[i]


def _key(rng: random.Random, kind: str) -> str:
    return uuid_value(rng) if kind == "uuid" else key_phrases(1, rng)[0]


def _value(rng: random.Random, kind: str) -> str:
    return uuid_value(rng) if kind == "uuid" else number_value(rng)


def _join_keys(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]


def _niah_sample(
    spec: TaskSpec, rng: random.Random, budget: int, count: Counter, haystack: Haystack
) -> tuple[str, list[str], int, dict]:
    p = spec.params
    noun = "code" if p["value"] == "uuid" else "number"

    def needle(key: str, value: str) -> str:
        return f"The special {noun} for {key} is {value}."

    keys: list[str] = []
    while len(keys) < p["keys"]:
        k = _key(rng, p["key"])
        if k not in keys:
            keys.append(k)
    values = {k: [_value(rng, p["value"]) for _ in range(p["values"])] for k in keys}
    needles = [needle(k, v) for k in keys for v in values[k]]
    depths = [rng.random() for _ in needles]
    asked = keys[: p["queries"]]
    answers = [v for k in asked for v in values[k]]
    hay: Haystack = haystack
    if p["haystack"] == "noise":
        hay = Haystack()
    elif p["haystack"] == "needles":
        hay = NeedleHaystack(rng, p["key"], p["value"], set(keys), needle)
    start = hay.offset(rng)
    plural = len(answers) > 1
    intro = (
        f"A long text follows. Some special {noun}s are hidden inside it. Remember them: "
        f"after the text you will be asked about them.\n\n"
    )
    if plural:
        question = (
            f"\n\nQuestion: What are all the special {noun}s for {_join_keys(asked)} "
            f"in the text above?\nAnswer: The special {noun}s for {_join_keys(asked)} "
            "are"
        )
    else:
        question = (
            f"\n\nQuestion: What is the special {noun} for {asked[0]} in the text "
            f"above?\nAnswer: The special {noun} for {asked[0]} is"
        )

    def render(n: int) -> str:
        units = [hay.unit(start + i) for i in range(n)]
        return intro + " ".join(insert_at_depths(units, needles, depths)) + question

    n, text, tokens = fit_units(render, count, budget)
    return (
        text,
        answers,
        tokens,
        {"haystack_units": n, "haystack": hay.name, "depths": [round(d, 4) for d in depths]},
    )


def _var_name(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


def _vt_parts(rng: random.Random, chains: int, hops: int) -> tuple[list[str], list[str], str]:
    """Assignment statements, the first chain's variable names, and its value."""
    names: list[str] = []
    while len(names) < chains * (hops + 1):
        v = _var_name(rng)
        if v not in names:
            names.append(v)
    statements, values = [], [str(rng.randint(10000, 99999)) for _ in range(chains)]
    for c in range(chains):
        chain = names[c * (hops + 1) : (c + 1) * (hops + 1)]
        statements.append(f"VAR {chain[0]} = {values[c]}.")
        statements += [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:], strict=False)]
    return statements, names[: hops + 1], values[0]


VT_INTRO = "Keep track of the variable assignments hidden in the text below.\n\n"


def _vt_question(value: str) -> str:
    return (
        f"\n\nQuestion: Which variables hold the value {value}, directly or through other "
        f"variables?\nAnswer: The variables that hold the value {value} are:"
    )


def _vt_render(statements: list[str], depths: list[float], n: int) -> str:
    hay = Haystack()
    units = [hay.unit(i) for i in range(n)]
    # statements keep their order: sorted depths
    return " ".join(insert_at_depths(units, statements, sorted(depths)))


def _vt_sample(
    spec: TaskSpec, rng: random.Random, budget: int, count: Counter
) -> tuple[str, list[str], int, dict]:
    p = spec.params
    demo_statements, demo_names, demo_value = _vt_parts(rng, p["chains"], p["hops"])
    demo = (
        VT_INTRO
        + _vt_render(demo_statements, [i / 10 for i in range(len(demo_statements))], 6)
        + _vt_question(demo_value)
        + " "
        + " ".join(demo_names)
        + "\n\n"
    )
    statements, names, value = _vt_parts(rng, p["chains"], p["hops"])
    depths = [rng.random() for _ in statements]

    def render(n: int) -> str:
        return demo + VT_INTRO + _vt_render(statements, depths, n) + _vt_question(value)

    n, text, tokens = fit_units(render, count, budget)
    return text, names, tokens, {"haystack_units": n}


CWE_INTRO = (
    "Below is a numbered list of words. Some words occur many times in it, others "
    "only a few times.\n\n"
)


def _cwe_question(k: int) -> str:
    return (
        f"\n\nQuestion: Which {k} words occur most often in the numbered list above?\n"
        f"Answer: The {k} words that occur most often are:"
    )


def _cwe_list(
    common: list[str], rare: list[str], freq: int, rare_freq: int, rng: random.Random
) -> str:
    words = common * freq + rare * rare_freq
    rng.shuffle(words)
    return " ".join(f"{i}. {w}" for i, w in enumerate(words, 1))


def _cwe_sample(
    spec: TaskSpec, rng: random.Random, budget: int, count: Counter
) -> tuple[str, list[str], int, dict]:
    k = spec.params["common"]
    words = pseudo_words(50_000, rng)
    demo_words = pseudo_words(k + 10, random.Random(rng.random()))
    demo = (
        CWE_INTRO
        + _cwe_list(demo_words[:k], demo_words[k:], 3, 1, random.Random(0))
        + _cwe_question(k)
        + " "
        + " ".join(demo_words[:k])
        + "\n\n"
    )
    common, rare = words[:k], words[k:]
    shuffle_seed = rng.random()
    for freq, rare_freq in spec.params["freqs"]:

        def render(n: int, freq: int = freq, rare_freq: int = rare_freq) -> str:
            body = _cwe_list(common, rare[:n], freq, rare_freq, random.Random(shuffle_seed))
            return demo + CWE_INTRO + body + _cwe_question(k)

        try:
            n, text, tokens = fit_units(render, count, budget, maximum=len(rare))
        except PromptTooLong:
            continue
        return text, common, tokens, {"rare_words": n, "freq": freq, "rare_freq": rare_freq}
    raise PromptTooLong(f"cwe: even the smallest list does not fit {budget} tokens")


FWE_INTRO = "Below is a coded text made of invented words. Count how often each word occurs.\n\n"


def _fwe_question(top: int) -> str:
    return (
        f"\n\nQuestion: Which {top} coded words occur most often in the text above?\n"
        f"Answer: The {top} words that occur most often are:"
    )


def zipf_counts(total: int, vocab: int, alpha: float) -> list[int]:
    """Word counts by rank, proportional to rank^-alpha, summing to about ``total``."""
    weights = [r**-alpha for r in range(1, vocab + 1)]
    norm = sum(weights)
    return [int(total * w / norm) for w in weights]


def _fwe_text(words: list[str], total: int, alpha: float, rng: random.Random) -> str:
    counts = zipf_counts(total, len(words), alpha)
    seq = [w for w, c in zip(words, counts, strict=True) for _ in range(c)]
    rng.shuffle(seq)
    return " ".join(seq)


def _fwe_sample(
    spec: TaskSpec, rng: random.Random, budget: int, count: Counter
) -> tuple[str, list[str], int, dict]:
    p = spec.params
    words = pseudo_words(p["vocab"], rng, syllables=(1, 2))
    demo_words = pseudo_words(20, random.Random(rng.random()), syllables=(1, 2))
    demo = (
        FWE_INTRO
        + _fwe_text(demo_words, 60, p["alpha"], random.Random(0))
        + _fwe_question(p["top"])
        + " "
        + " ".join(demo_words[: p["top"]])
        + "\n\n"
    )
    shuffle_seed = rng.random()
    # the top words must have distinct counts: about 40 words at least
    minimum = 40

    def render(n: int) -> str:
        body = _fwe_text(words, n, p["alpha"], random.Random(shuffle_seed))
        return demo + FWE_INTRO + body + _fwe_question(p["top"])

    n, text, tokens = fit_units(render, count, budget, minimum=minimum)
    return text, words[: p["top"]], tokens, {"words": n}


QA_INTRO = (
    "Read the documents below, then answer the question after them with a short "
    "answer and nothing else.\n\n"
)


def _qa_sample(
    spec: TaskSpec, rng: random.Random, budget: int, count: Counter, qa: QAData, index: int
) -> tuple[str, list[str], int, dict]:
    order = list(range(len(qa.questions)))
    random.Random(f"order:{qa.path}").shuffle(order)
    q = qa.questions[order[index % len(order)]]
    gold = set(q.gold)
    pool = [i for i in range(len(qa.docs)) if i not in gold]
    rng.shuffle(pool)
    depths = [rng.random() for _ in q.gold]
    question = f"\n\nQuestion: {q.question}\nAnswer:"

    def render(n: int) -> str:
        docs = insert_at_depths(
            [qa.docs[i] for i in pool[:n]], [qa.docs[i] for i in q.gold], depths
        )
        body = "\n\n".join(f"Document {j}:\n{d}" for j, d in enumerate(docs, 1))
        return QA_INTRO + body + question

    n, text, tokens = fit_units(render, count, budget, maximum=len(pool))
    return text, list(q.answers), tokens, {"distractors": n, "question": q.question}


def make_sample(
    task: str,
    length: int,
    index: int,
    seed: int,
    count: Counter,
    haystack: Haystack | None = None,
    qa: QAData | None = None,
    max_new_tokens: int | None = None,
) -> Sample:
    """Sample ``index`` of ``task`` at context ``length`` (prompt + generation tokens).

    ``count(text)`` is the number of tokens the model reads for ``text`` (BOS included).
    Raises :class:`PromptTooLong` when the task cannot fit the length.
    """
    spec = TASKS[task]
    gen = max_new_tokens or spec.max_new_tokens
    budget = length - gen
    rng = sample_rng(seed, task, length, index)
    if spec.family == "niah":
        text, answers, tokens, meta = _niah_sample(spec, rng, budget, count, haystack or Haystack())
    elif spec.family == "vt":
        text, answers, tokens, meta = _vt_sample(spec, rng, budget, count)
    elif spec.family == "cwe":
        text, answers, tokens, meta = _cwe_sample(spec, rng, budget, count)
    elif spec.family == "fwe":
        text, answers, tokens, meta = _fwe_sample(spec, rng, budget, count)
    else:
        if qa is None or qa.kind != spec.params["kind"]:
            raise ValueError(f"{task}: needs a {spec.params['kind']} QA file")
        text, answers, tokens, meta = _qa_sample(spec, rng, budget, count, qa, index)
    return Sample(task, length, index, text, answers, spec.metric, gen, tokens, meta)
