"""Train a byte-level BPE tokenizer (Llama-3 style pre-tokenization) with ``tokenizers``.

The result is a Hugging Face ``tokenizer.json`` whose BPE ids come first and whose special
tokens (``<|begin_of_text|>``, ``<|end_of_text|>``, ...) follow them, as in Llama 3. It can
also be exported as a tiktoken BPE file in the Llama-3 format (``export_tiktoken``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from .readers import ChunkReader, decode_record, expand_inputs
from .tokenizers import BOS_TOKEN, EOS_TOKEN, LLAMA3_PATTERN, llama3_special_tokens


def iter_texts(
    inputs: list[str], json_key: str = "text", text_unit: str = "file", max_bytes: int | None = None
) -> Iterator[str]:
    """Texts of the documents in ``inputs`` (bad records are skipped)."""
    seen = 0
    for item in ChunkReader(expand_inputs(inputs), json_key, text_unit):
        if not hasattr(item, "records"):
            continue
        for _file, _line, payload in item.records:
            text, _kind, _msg = decode_record(item.kind, payload, json_key)
            if text is None:
                continue
            yield text
            seen += len(text)
            if max_bytes is not None and seen >= max_bytes:
                return


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: list[str] | None = None,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> object:
    """Train a byte-level BPE whose total vocabulary (BPE + special tokens) is ``vocab_size``.

    ``special_tokens`` defaults to begin/end-of-text; pass ``llama3_special_tokens()`` for
    the full Llama-3 set. Returns a ``tokenizers.Tokenizer``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = list(special_tokens) if special_tokens else [BOS_TOKEN, EOS_TOKEN]
    bpe_size = vocab_size - len(specials)
    if bpe_size <= 256:
        raise ValueError(
            f"vocab_size {vocab_size} leaves no room for merges beyond 256 bytes "
            f"and {len(specials)} special tokens"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size,
        min_frequency=min_frequency,
        show_progress=show_progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Specials after the BPE ids, as in Llama 3 (a small corpus may yield fewer merges).
    tok.add_special_tokens(specials)
    return tok


def save_tokenizer(tok: object, out_dir: str | os.PathLike) -> Path:
    """Write ``tokenizer.json`` and a ``tokenizer_config.json`` naming BOS/EOS; return the json."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tokenizer.json"
    tmp = out / "tokenizer.json.tmp"
    tok.save(str(tmp))
    config = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def export_tiktoken(tok: object, path: str | os.PathLike) -> Path:
    """Write the BPE part of a byte-level ``tokenizer.json`` as a Llama-3 tiktoken file.

    Token ranks are the BPE ids; the loader appends Llama-3's 256 special tokens after them.
    """
    from tokenizers import pre_tokenizers

    from .tokenizers import write_tiktoken_ranks

    byte_of = {ch: b for b, ch in enumerate(_bytes_to_unicode())}
    assert len(pre_tokenizers.ByteLevel.alphabet()) == 256
    specials = {t.content for t in tok.get_added_tokens_decoder().values()}
    ranks: dict[bytes, int] = {}
    for token, tid in tok.get_vocab(with_added_tokens=False).items():
        if token in specials:
            continue
        ranks[bytes(byte_of[ch] for ch in token)] = tid
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("BPE ids are not contiguous from 0; cannot export as tiktoken")
    write_tiktoken_ranks(ranks, path)
    return Path(path)


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, indexed by byte value."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs, strict=True))
    return [chr(table[b]) for b in range(256)]


__all__ = ["export_tiktoken", "iter_texts", "llama3_special_tokens", "save_tokenizer", "train_bpe"]
