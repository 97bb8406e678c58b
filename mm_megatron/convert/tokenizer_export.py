"""The tokenizer of a Hugging Face export, loadable with ``AutoTokenizer`` and nothing else.

Training reads one of three tokenizer formats (:mod:`mm_megatron.data.tokenizers`): a
``tokenizer.json``, a tiktoken BPE file in the Llama-3 format, or a SentencePiece model. An
export always ships a ``tokenizer.json`` (the ``tokenizers`` package, no tiktoken, no
sentencepiece, no remote code), converted here so that it gives the training tokenizer's ids:

* tiktoken ranks become a byte-level BPE: vocabulary = ranks, merges = every split of a token
  into two tokens, ordered by the rank of the merged token (tiktoken merges the adjacent pair
  whose concatenation has the lowest rank), whole pre-tokens in the vocabulary taken as they
  are (``ignore_merges``, as tiktoken), Llama 3's pre-tokenizer regex and special tokens;
* a SentencePiece model becomes a Unigram or BPE model with the model's own normalizer
  settings (precompiled character map, extra-whitespace removal, dummy prefix, ``▁``);
* a ``tokenizer.json`` is kept, with only its post-processor replaced.

The post-processor adds the BOS the model was trained with (a ``TemplateProcessing``, as Llama
3 does), or nothing when the training data had no BOS. ``tokenizer_config.json`` names the
class (``PreTrainedTokenizerFast``, so ``config.json`` is never consulted), the special tokens,
a pad token (a dedicated one, else EOS) and ``model_input_names``.

Special-token strings inside a text are plain text for the training tokenizers; a Hugging Face
tokenizer reads them as the special tokens. Texts without them get identical ids.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from mm_megatron.data.bpe_trainer import _bytes_to_unicode
from mm_megatron.data.tokenizers import (
    LLAMA3_PATTERN,
    TokenizerError,
    llama3_special_tokens,
    read_tiktoken_ranks,
)

BOS_NAMES = ("<|begin_of_text|>", "<s>", "<|startoftext|>", "<|bos|>", "<bos>", "[BOS]")
EOS_NAMES = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<|eos|>", "<eos>", "[EOS]")
PAD_NAMES = ("<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "[PAD]")
CONFIG_NAMES = ("tokenizer_config.json", "special_tokens_map.json")
MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]
# Keys of a source tokenizer_config.json that would need remote code or another class.
_DROPPED_CONFIG_KEYS = (
    "auto_map",
    "tokenizer_file",
    "vocab_file",
    "merges_file",
    "legacy",
    "sp_model_kwargs",
    "add_prefix_space",
)
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+=* \d+\r?\n?$")


@dataclass
class TokenizerSource:
    """The file that defines the tokenizer, its format, and the source's tokenizer config."""

    kind: str  # "hf", "tiktoken" or "sentencepiece"
    path: Path
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportedTokenizer:
    """A converted tokenizer and its special tokens (``None``: the tokenizer has none)."""

    source: TokenizerSource
    tokenizer: Any  # tokenizers.Tokenizer, post-processor set
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    add_bos: bool
    pad_note: str  # how the pad token was chosen, for the model card

    @property
    def vocab_size(self) -> int:
        """Ids in use, special tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)


def find_source(files: list[Path]) -> TokenizerSource | None:
    """The tokenizer among ``files`` (``tokenizer.json`` first, then a tiktoken or SentencePiece
    ``.model``/``.tiktoken``); ``None`` when there is none."""
    config: dict[str, Any] = {}
    for path in files:
        if path.name == "tokenizer_config.json":
            try:
                config = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise TokenizerError(f"{path}: not a readable JSON file ({err})") from None
            if not isinstance(config, dict):
                raise TokenizerError(f"{path}: expected a JSON object")
    candidates = [p for p in files if p.suffix == ".json" and p.name not in CONFIG_NAMES]
    if candidates:
        return TokenizerSource("hf", candidates[0], config)
    for path in files:
        if path.suffix in (".model", ".tiktoken"):
            with open(path, "rb") as f:
                ranks = path.suffix == ".tiktoken" or bool(_TIKTOKEN_LINE.match(f.readline(4096)))
            return TokenizerSource("tiktoken" if ranks else "sentencepiece", path)
    return None


def convert_tokenizer(
    source: TokenizerSource,
    *,
    bos_id: int | None = None,
    eos_id: int | None = None,
    add_bos: bool | None = None,
) -> ExportedTokenizer:
    """Convert ``source`` to a ``tokenizers.Tokenizer`` with its special tokens.

    ``bos_id``/``eos_id`` override the tokenizer's own (by name, or the SentencePiece model's
    ids). ``add_bos``: whether texts get the BOS (default: when there is one). Without BOS,
    ``bos_token`` and ``bos_id`` are ``None`` unless ``bos_id`` was given.
    """
    converters = {"hf": _from_json, "tiktoken": _from_tiktoken, "sentencepiece": _from_spm}
    tok, names = converters[source.kind](source)
    vocab = tok.get_vocab(with_added_tokens=True)

    def resolve(explicit: int | None, role: str) -> tuple[str | None, int | None]:
        if explicit is not None:
            token = tok.id_to_token(explicit)
            if token is None:
                raise TokenizerError(
                    f"{source.path}: {role} id {explicit} is not in the "
                    f"vocabulary ({len(vocab)} tokens)"
                )
            return token, explicit
        token = names.get(role)
        if token is None:
            return None, None
        if token not in vocab:
            raise TokenizerError(f"{source.path}: {role} token {token!r} is not in the vocabulary")
        return token, vocab[token]

    bos_token, bos = resolve(bos_id, "bos")
    eos_token, eos = resolve(eos_id, "eos")
    unk_token = names.get("unk")
    add = bos is not None if add_bos is None else add_bos
    if add and bos is None:
        raise TokenizerError(
            f"{source.path}: the model was trained with a BOS token, but the "
            "tokenizer has none (pass bos_token_id)"
        )
    if not add and bos_id is None:
        bos_token, bos = None, None
    pad_token, pad = resolve(None, "pad")
    if pad is not None:
        note = f"dedicated pad token {pad_token!r} (id {pad})"
    elif eos is not None:
        pad_token, pad = eos_token, eos
        note = f"no dedicated pad token: pad reuses EOS {eos_token!r} (id {eos})"
    else:
        note = "no pad token (the tokenizer has neither a pad nor an EOS token)"
    tok.post_processor = _post_processor(tok, bos_token if add else None, bos)
    return ExportedTokenizer(
        source, tok, bos_token, eos_token, pad_token, unk_token, bos, eos, pad, add, note
    )


def write_tokenizer_files(
    out: Path, exported: ExportedTokenizer, model_max_length: int | None = None
) -> list[str]:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into
    ``out`` (and copy a tiktoken or SentencePiece source file, for reference); returns the
    names written."""
    exported.tokenizer.save(str(out / "tokenizer.json"))
    config = {k: v for k, v in exported.source.config.items() if k not in _DROPPED_CONFIG_KEYS}
    special = {
        f"{role}_token": token
        for role, token in (
            ("bos", exported.bos_token),
            ("eos", exported.eos_token),
            ("pad", exported.pad_token),
            ("unk", exported.unk_token),
        )
        if token is not None
    }
    for role in ("bos", "eos", "pad", "unk"):
        config.pop(f"{role}_token", None)
    config.update(special)
    config.update(
        tokenizer_class="PreTrainedTokenizerFast",
        add_bos_token=exported.add_bos,
        add_eos_token=False,
        model_input_names=list(MODEL_INPUT_NAMES),
        clean_up_tokenization_spaces=False,
    )
    config.setdefault("model_max_length", model_max_length or 1 << 30)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    names = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    if exported.source.kind != "hf" and exported.source.path.name not in names:
        shutil.copyfile(exported.source.path, out / exported.source.path.name)
        names.append(exported.source.path.name)
    return names


def _first(names: tuple[str, ...], vocab: dict[str, int]) -> str | None:
    return next((n for n in names if n in vocab), None)


def _content(value: object) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _from_json(source: TokenizerSource) -> tuple[Any, dict[str, str | None]]:
    """A ``tokenizer.json`` as it is; special tokens named by its config, else by name."""
    try:
        tok = Tokenizer.from_file(str(source.path))
    except Exception as err:  # noqa: BLE001 - the tokenizers error says what is wrong
        raise TokenizerError(f"{source.path}: not a readable tokenizer.json ({err})") from None
    vocab = tok.get_vocab(with_added_tokens=True)
    cfg = source.config
    names = {
        "bos": _content(cfg.get("bos_token")) or _first(BOS_NAMES, vocab),
        "eos": _content(cfg.get("eos_token")) or _first(EOS_NAMES, vocab),
        "pad": _content(cfg.get("pad_token")) or _first(PAD_NAMES, vocab),
        "unk": _content(cfg.get("unk_token")),
    }
    model = json.loads(tok.to_str()).get("model", {})
    if names["unk"] is None and model.get("unk_token") in vocab:
        names["unk"] = model["unk_token"]
    return tok, names


def bytes_to_unicode() -> list[str]:
    """GPT-2's byte → printable character table of byte-level BPE, indexed by byte value."""
    return _bytes_to_unicode()


def tiktoken_to_tokenizer(
    ranks: dict[bytes, int], special_tokens: list[str], where: str = "tiktoken ranks"
) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` that encodes as tiktoken with ``ranks``, Llama
    3's pre-tokenizer regex and ``special_tokens`` (ids after the ranks)."""
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)):
        raise TokenizerError(f"{where}: ranks are not 0..{n - 1} without gaps")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(
            f"{where}: {len(missing)} single bytes have no rank (e.g. "
            f"{missing[0]:#04x}); a byte-level BPE needs all 256"
        )
    table = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(table[b] for b in token)

    ranked = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                ranked.append((rank, ranks[left], ranks[right]))
    ranked.sort()
    by_rank = {rank: text(token) for token, rank in ranks.items()}
    merges = [(by_rank[left], by_rank[right]) for _, left, right in ranked]
    vocab = {by_rank[r]: r for r in range(n)}
    tok = Tokenizer(
        models.BPE(
            vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False
        )
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(special_tokens))
    got = [tok.token_to_id(t) for t in special_tokens]
    if got != list(range(n, n + len(special_tokens))):
        raise TokenizerError(f"{where}: special tokens collide with BPE tokens")
    return tok


def _from_tiktoken(source: TokenizerSource) -> tuple[Any, dict[str, str | None]]:
    """A Llama-3 tiktoken file: its ranks, then Llama 3's 256 special tokens."""
    specials = llama3_special_tokens()
    tok = tiktoken_to_tokenizer(read_tiktoken_ranks(source.path), specials, str(source.path))
    vocab = {t: 0 for t in specials}
    names = {
        "bos": _first(BOS_NAMES, vocab),
        "eos": _first(EOS_NAMES, vocab),
        "pad": _first(PAD_NAMES, vocab),
        "unk": None,
    }
    return tok, names


def sentencepiece_to_tokenizer(path: str | Path) -> tuple[Any, Any]:
    """A ``tokenizers.Tokenizer`` that encodes as ``SentencePieceProcessor.encode`` on the
    model file ``path`` (Unigram or BPE), and the model's protobuf."""
    # sentencepiece's protobuf module needs the protobuf package, which only SentencePiece
    # tokenizers require: imported here so that the other formats do without it.
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except Exception as err:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise TokenizerError(f"{path}: not a SentencePiece model ({err})") from None
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if not proto.pieces:
        raise TokenizerError(f"{path}: a SentencePiece model without pieces")
    if spec.treat_whitespace_as_suffix:
        raise TokenizerError(f"{path}: treat_whitespace_as_suffix is not supported")
    pieces = [(p.piece, p.score) for p in proto.pieces]
    if spec.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        model = models.Unigram(pieces, unk_id=spec.unk_id, byte_fallback=spec.byte_fallback)
    elif spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
        normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == 1}
        ranked = sorted(
            (-score, i, token[:k], token[k:])
            for token, (score, i) in normal.items()
            for k in range(1, len(token))
            if token[:k] in normal and token[k:] in normal
        )
        model = models.BPE(
            vocab={p: i for i, (p, _) in enumerate(pieces)},
            merges=[(left, right) for _, _, left, right in ranked],
            unk_token=spec.unk_piece,
            fuse_unk=True,
            byte_fallback=spec.byte_fallback,
        )
    else:
        kind = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(spec.model_type)
        raise TokenizerError(
            f"{path}: SentencePiece model type {kind} is not supported (only UNIGRAM and BPE)"
        )
    tok = Tokenizer(model)
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:  # spaces only; newlines and tabs stay
        steps += [
            normalizers.Replace(Regex(r"\A +| +\z"), ""),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    # Control and unknown pieces are special; user-defined pieces are emitted whole.
    added = [
        AddedToken(p.piece, special=p.type in (2, 3), normalized=False)
        for p in proto.pieces
        if p.type in (2, 3, 4)
    ]
    tok.add_tokens(added)
    steps = [decoders.Replace("▁", " ")]
    if spec.byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok, proto


def _from_spm(source: TokenizerSource) -> tuple[Any, dict[str, str | None]]:
    tok, proto = sentencepiece_to_tokenizer(source.path)
    spec = proto.trainer_spec

    def piece(index: int) -> str | None:
        return proto.pieces[index].piece if 0 <= index < len(proto.pieces) else None

    names = {
        "bos": piece(spec.bos_id),
        "eos": piece(spec.eos_id),
        "pad": piece(spec.pad_id),
        "unk": piece(spec.unk_id),
    }
    return tok, names


def _post_processor(tok: Any, bos_token: str | None, bos_id: int | None) -> Any:
    """BOS before each sequence (none when ``bos_token`` is None), keeping a byte-level offsets
    step of the source's post-processor."""
    if bos_token is None:
        template = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    else:
        template = processors.TemplateProcessing(
            single=f"{bos_token}:0 $A:0",
            pair=f"{bos_token}:0 $A:0 {bos_token}:1 $B:1",
            special_tokens=[(bos_token, bos_id)],
        )
    current = json.loads(tok.to_str()).get("post_processor") or {}
    steps = current.get("processors", [current]) if current.get("type") == "Sequence" else [current]
    kept = [s for s in steps if s.get("type") == "ByteLevel"]
    if not kept:
        return template
    data = json.loads(Tokenizer(_empty_model()).to_str())
    data["post_processor"] = {
        "type": "Sequence",
        "processors": [*kept, json.loads(template.__getstate__())],
    }
    return Tokenizer.from_str(json.dumps(data)).post_processor


def _empty_model() -> Any:
    return models.BPE(vocab={}, merges=[])
