"""Text material for the RULER-style tasks: key words, pseudo-words, and haystacks.

RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language
Models?") hides needles in a haystack of either repeated filler sentences ("noise") or real
essays. Here the essay haystack is any user corpus: a jsonl file (one document per line, text
in a field) or one of our indexed datasets (``mm_megatron/data/indexed.py``), decoded with the
model's tokenizer. Everything is deterministic given the seed.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path

# Common concrete English words: needle keys are pairs of them ("silver-lantern").
KEY_WORDS = tuple(
    dict.fromkeys(
        """
apple anchor arrow autumn badge bakery balloon banner barrel basket beacon berry blanket
bottle bracelet breeze bridge bucket butter cabin cactus camera candle canyon carpet castle
cedar chalk cherry chimney circle citrus cliff clock cloud clover cobalt comet copper coral
cotton crater crystal cactus dagger daisy desert diamond dolphin dragon drum eagle ember
engine falcon feather fern fiddle flame forest fossil fountain garden garnet ginger glacier
globe granite grape harbor hammer harvest hazel helmet honey horizon island ivory jacket
jasmine jungle kettle kitten ladder lagoon lantern lemon library lily linen lizard magnet
maple marble meadow melon mirror monsoon mosaic mountain needle nectar oasis ocean olive
orchid otter paddle palace panther pebble pepper piano pillow pine planet plum pocket
pumpkin quartz quill rabbit radish raven ribbon river rocket saddle salmon sapphire scarf
shadow shell silver sketch sparrow spice spruce squirrel statue stone summer sunset
thistle thunder tiger timber topaz torch tower trumpet tulip tunnel valley velvet violet
walnut whistle willow window winter wolf yarn zebra
""".split()
    )
)

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def pseudo_words(count: int, rng: random.Random, syllables: tuple[int, int] = (2, 3)) -> list[str]:
    """``count`` distinct pronounceable non-words ("bakotu"), as RULER's random-word tasks use
    a vocabulary the model cannot have memorised."""
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < count:
        n = rng.randint(*syllables)
        word = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(n))
        if word not in seen:
            seen.add(word)
            out.append(word)
    return out


def key_phrases(count: int, rng: random.Random) -> list[str]:
    """``count`` distinct needle keys, each two key words joined by a hyphen."""
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < count:
        a, b = rng.sample(KEY_WORDS, 2)
        if f"{a}-{b}" not in seen:
            seen.add(f"{a}-{b}")
            out.append(f"{a}-{b}")
    return out


def number_value(rng: random.Random) -> str:
    """A seven-digit number (RULER's default needle value)."""
    return str(rng.randint(1_000_000, 9_999_999))


def uuid_value(rng: random.Random) -> str:
    """A UUID-shaped hexadecimal string drawn from ``rng`` (deterministic)."""
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# The filler of the "noise" haystack: a few plain sentences repeated (written for this project).
NOISE_SENTENCES = (
    "The river runs slowly toward the sea.",
    "The hills stay quiet under the sky.",
    "A soft wind moves across the grass.",
    "Here the morning begins once more.",
    "Then the evening comes and goes again.",
)


class Haystack:
    """An endless, indexable stream of filler units (sentences). ``unit(i)`` is fixed for a
    given source, so that a prompt with n units is a prefix of the prompt with n + 1."""

    name = "noise"

    def unit(self, i: int) -> str:
        """The i-th filler sentence."""
        return NOISE_SENTENCES[i % len(NOISE_SENTENCES)]

    def offset(self, rng: random.Random) -> int:
        """Where a sample starts reading (0 for the periodic noise)."""
        return 0


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class CorpusHaystack(Haystack):
    """Sentences of a user corpus, read lazily document by document and cycled when the
    corpus is exhausted. Each sample starts at a seeded offset in the first ``window``
    sentences, so samples do not all share the same text."""

    def __init__(
        self, name: str, documents: Callable[[], Iterator[str]], window: int = 10_000
    ) -> None:
        self.name = name
        self._documents = documents
        self._iter: Iterator[str] | None = None
        self._units: list[str] = []
        self._exhausted = False
        self.window = window

    def _extend(self, need: int) -> None:
        if self._iter is None:
            self._iter = self._documents()
        while len(self._units) < need and not self._exhausted:
            try:
                doc = next(self._iter)
            except StopIteration:
                self._exhausted = True
                break
            text = " ".join(doc.split())
            self._units.extend(s for s in _SENTENCE_END.split(text) if s)
        if not self._units:
            raise ValueError(f"{self.name}: the corpus has no text")

    def unit(self, i: int) -> str:
        """The i-th sentence of the corpus (cycling)."""
        self._extend(i + 1)
        return self._units[i % len(self._units)]

    def offset(self, rng: random.Random) -> int:
        """A seeded start within the first ``window`` sentences read."""
        self._extend(self.window)
        return rng.randrange(min(self.window, len(self._units)))


def jsonl_documents(path: Path, field: str) -> Callable[[], Iterator[str]]:
    """Documents of a jsonl file (``field`` of each line); errors name the file and line."""

    def read() -> Iterator[str]:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not JSON ({err.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get(field), str):
                    raise ValueError(f"{path}:{lineno}: no string field {field!r}")
                yield row[field]

    return read


def indexed_documents(
    prefix: str, decode: Callable[[list[int]], str]
) -> Callable[[], Iterator[str]]:
    """Documents of an indexed dataset (``.bin``/``.idx``), decoded with ``decode``."""
    from mm_megatron.data.indexed import read_index

    index = read_index(prefix)

    def read() -> Iterator[str]:
        for i in range(index.num_documents):
            yield decode(index.document(i).tolist())

    return read


def open_haystack(
    spec: str | None, field: str = "text", decode: Callable[[list[int]], str] | None = None
) -> Haystack:
    """``None`` or ``noise``: the noise haystack; a ``.jsonl`` file; or an indexed dataset
    prefix (``PREFIX.bin`` + ``PREFIX.idx``)."""
    from mm_megatron.data.indexed import dataset_exists

    if spec is None or spec == "noise":
        return Haystack()
    path = Path(spec)
    if path.is_file():
        return CorpusHaystack(str(path), jsonl_documents(path, field))
    if dataset_exists(spec):
        if decode is None:
            raise ValueError(f"{spec}: an indexed dataset needs the tokenizer to decode it")
        return CorpusHaystack(spec, indexed_documents(spec, decode))
    raise ValueError(
        f"{spec}: neither a jsonl file nor an indexed dataset prefix (PREFIX.bin and PREFIX.idx)"
    )
