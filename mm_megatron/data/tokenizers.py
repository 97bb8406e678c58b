"""One small tokenizer interface for preprocessing, training and evaluation.

Three on-disk formats are supported, all loaded offline from local files:

* Hugging Face ``tokenizer.json`` (the ``tokenizers`` library),
* tiktoken BPE files in the Llama-3 format (``tokenizer.model`` / ``*.tiktoken``: one
  ``<base64 token> <rank>`` per line, followed by Llama-3's 256 special tokens),
* SentencePiece ``.model`` files.

``load_tokenizer(spec)`` picks the format from the file (or a directory holding one), or from
an explicit ``hf:``, ``tiktoken:`` or ``sentencepiece:`` prefix.
"""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path
from typing import Protocol, runtime_checkable

# The pre-tokenization pattern of Llama 3 (also used by our own byte-level BPE trainer).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
NUM_LLAMA3_SPECIAL_TOKENS = 256


def llama3_special_tokens() -> list[str]:
    """The 256 special tokens that follow the BPE ranks in a Llama-3 (3.1) tiktoken model."""
    named = [
        BOS_TOKEN,
        EOS_TOKEN,
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ]
    extra = NUM_LLAMA3_SPECIAL_TOKENS - len(named)
    return named + [f"<|reserved_special_token_{i + 2}|>" for i in range(extra)]


# Names tried, in order, when a tokenizer does not say which tokens begin and end a text.
_BOS_CANDIDATES = (BOS_TOKEN, "<s>", "<|bos|>", "<bos>", "[BOS]")
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<|endoftext|>", "<|eos|>", "<eos>", "[EOS]")


@runtime_checkable
class Tokenizer(Protocol):
    """What preprocessing, training and evaluation need from a tokenizer."""

    name: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None  # end of text; Megatron's EOD

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without special tokens; special-token strings are plain text."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (special tokens are rendered as their strings)."""
        ...

    def files(self) -> list[Path]:
        """The files that define this tokenizer (a checkpoint copies them)."""
        ...


class TokenizerError(ValueError):
    """A tokenizer spec that cannot be loaded."""


def _pick(
    vocab_lookup: dict[str, int],
    explicit: str | None,
    candidates: tuple[str, ...],
    what: str,
    where: str,
) -> int | None:
    if explicit is not None:
        if explicit not in vocab_lookup:
            raise TokenizerError(f"{where}: {what} token {explicit!r} is not in the vocabulary")
        return vocab_lookup[explicit]
    for token in candidates:
        if token in vocab_lookup:
            return vocab_lookup[token]
    return None


class HFTokenizer:
    """A Hugging Face ``tokenizer.json``."""

    def __init__(
        self, path: str | os.PathLike, bos_token: str | None = None, eos_token: str | None = None
    ) -> None:
        import tokenizers

        self.path = Path(path)
        self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        # Special-token strings inside a document are text, never control tokens.
        self._tok.encode_special_tokens = True
        config = self.path.parent / "tokenizer_config.json"
        self._extra_files = [
            p for p in (config, self.path.parent / "special_tokens_map.json") if p.is_file()
        ]
        if config.is_file() and (bos_token is None or eos_token is None):
            cfg = json.loads(config.read_text(encoding="utf-8"))
            bos_token = bos_token or _token_content(cfg.get("bos_token"))
            eos_token = eos_token or _token_content(cfg.get("eos_token"))
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(
            self._tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1
        )
        self.bos_id = _pick(vocab, bos_token, _BOS_CANDIDATES, "begin-of-text", str(self.path))
        self.eos_id = _pick(vocab, eos_token, _EOS_CANDIDATES, "end-of-text", str(self.path))
        self.name = f"hf:{self.path}"

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of several texts (same as ``encode`` on each)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def files(self) -> list[Path]:
        """``tokenizer.json`` and, when present, its ``tokenizer_config.json``."""
        return [self.path, *self._extra_files]


def _token_content(value: object) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a tiktoken BPE file (``<base64 token> <rank>`` per line)."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as exc:
                raise TokenizerError(
                    f"{path}:{lineno}: not a tiktoken BPE line ({line[:60]!r})"
                ) from exc
    if not ranks:
        raise TokenizerError(f"{path}: empty tiktoken BPE file")
    return ranks


def write_tiktoken_ranks(ranks: dict[bytes, int], path: str | os.PathLike) -> None:
    """Write a tiktoken BPE file in rank order (the Llama-3 ``tokenizer.model`` layout)."""
    with open(path, "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")


class TiktokenTokenizer:
    """A tiktoken BPE file in the Llama-3 format, with Llama-3's special tokens."""

    def __init__(
        self, path: str | os.PathLike, bos_token: str | None = None, eos_token: str | None = None
    ) -> None:
        import tiktoken

        self.path = Path(path)
        ranks = read_tiktoken_ranks(self.path)
        n_base = max(ranks.values()) + 1
        specials = {tok: n_base + i for i, tok in enumerate(llama3_special_tokens())}
        self._enc = tiktoken.Encoding(
            name=self.path.stem,
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=specials,
        )
        self.vocab_size = n_base + len(specials)
        self.bos_id = _pick(specials, bos_token, _BOS_CANDIDATES, "begin-of-text", str(path))
        self.eos_id = _pick(specials, eos_token, _EOS_CANDIDATES, "end-of-text", str(path))
        self.name = f"tiktoken:{self.path}"

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings are encoded as ordinary text."""
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of several texts, in this thread."""
        return [self._enc.encode_ordinary(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (invalid UTF-8 across token boundaries is replaced)."""
        return self._enc.decode(list(ids), errors="replace")

    def files(self) -> list[Path]:
        """The BPE file."""
        return [self.path]


class SentencePieceTokenizer:
    """A SentencePiece ``.model`` file."""

    def __init__(
        self, path: str | os.PathLike, bos_token: str | None = None, eos_token: str | None = None
    ) -> None:
        import sentencepiece

        self.path = Path(path)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as exc:
            raise TokenizerError(f"{path}: not a SentencePiece model ({exc})") from exc
        self.vocab_size = self._sp.get_piece_size()

        def _id(explicit: str | None, default: int, what: str) -> int | None:
            if explicit is None:
                return default if default >= 0 else None
            pid = self._sp.piece_to_id(explicit)
            if pid == self._sp.unk_id() and explicit != self._sp.id_to_piece(pid):
                raise TokenizerError(f"{path}: {what} token {explicit!r} is not in the vocabulary")
            return pid

        self.bos_id = _id(bos_token, self._sp.bos_id(), "begin-of-text")
        self.eos_id = _id(eos_token, self._sp.eos_id(), "end-of-text")
        self.name = f"sentencepiece:{self.path}"

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of several texts, in this thread."""
        return self._sp.encode(texts, out_type=int, num_threads=1)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``."""
        return self._sp.decode([int(i) for i in ids])

    def files(self) -> list[Path]:
        """The model file."""
        return [self.path]


_KINDS = {"hf": HFTokenizer, "tiktoken": TiktokenTokenizer, "sentencepiece": SentencePieceTokenizer}
_KIND_ALIASES = {
    "hf": "hf",
    "huggingface": "hf",
    "tiktoken": "tiktoken",
    "sentencepiece": "sentencepiece",
    "spm": "sentencepiece",
    "sp": "sentencepiece",
}
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+=* \d+\r?\n?$")


def _looks_like_tiktoken(path: Path) -> bool:
    with open(path, "rb") as f:
        first = f.readline(4096)
    return bool(_TIKTOKEN_LINE.match(first))


def _detect(path: Path) -> tuple[str, Path]:
    """Return (kind, file) for a tokenizer file or a directory holding one."""
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model", "tokenizer.tiktoken"):
            if (path / name).is_file():
                return _detect(path / name)
        found = sorted(p for p in path.iterdir() if p.suffix in (".tiktoken", ".model"))
        if len(found) == 1:
            return _detect(found[0])
        raise TokenizerError(
            f"{path}: no tokenizer.json, tokenizer.model or *.tiktoken here"
            + (f" (several candidates: {[p.name for p in found]})" if found else "")
        )
    if not path.is_file():
        raise TokenizerError(f"tokenizer {str(path)!r} does not exist")
    if path.suffix == ".json":
        return "hf", path
    if path.suffix == ".tiktoken":
        return "tiktoken", path
    if path.suffix == ".model":
        return ("tiktoken" if _looks_like_tiktoken(path) else "sentencepiece"), path
    raise TokenizerError(
        f"{path}: unknown tokenizer format; expected tokenizer.json, a tiktoken "
        "'.model'/'.tiktoken' file, a SentencePiece '.model', or a prefix "
        "hf:, tiktoken:, sentencepiece:"
    )


def load_tokenizer(
    spec: str | os.PathLike, bos_token: str | None = None, eos_token: str | None = None
) -> Tokenizer:
    """Load a tokenizer from ``spec``.

    ``spec`` is a path to ``tokenizer.json``, a tiktoken ``.model``/``.tiktoken`` file, a
    SentencePiece ``.model``, or a directory holding one of them; ``hf:PATH``,
    ``tiktoken:PATH`` and ``sentencepiece:PATH`` force the format. ``bos_token`` and
    ``eos_token`` name the begin- and end-of-text tokens when the defaults do not fit.
    """
    spec = os.fspath(spec)
    if not spec:
        raise TokenizerError("empty tokenizer spec")
    kind = None
    prefix, sep, rest = spec.partition(":")
    if sep and prefix.lower() in _KIND_ALIASES:
        kind, spec = _KIND_ALIASES[prefix.lower()], rest
    path = Path(spec).expanduser()
    if kind is None:
        kind, path = _detect(path)
    elif path.is_dir():
        detected, file = _detect(path)
        if detected != kind:
            raise TokenizerError(f"{path}: holds a {detected} tokenizer, not {kind}")
        path = file
    elif not path.is_file():
        raise TokenizerError(f"tokenizer {str(path)!r} does not exist")
    return _KINDS[kind](path, bos_token=bos_token, eos_token=eos_token)


def encode_batch(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Encode several texts with the tokenizer's batch path when it has one."""
    fn = getattr(tokenizer, "encode_batch", None)
    if fn is not None:
        return fn(texts)
    return [tokenizer.encode(t) for t in texts]
