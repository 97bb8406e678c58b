"""Preprocessing: round trips, formats, determinism across workers, bad input, atomic output."""

import gzip
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import zstandard
from data_fixtures import corpus_docs, corpus_jsonl, tokenizer_spec, write_jsonl
from paths import ROOT

from mm_megatron.data.indexed import IndexedWriter, dataset_exists, read_index
from mm_megatron.data.preprocess import (
    PreprocessConfig,
    PreprocessError,
    preprocess,
    shard_files,
)
from mm_megatron.data.readers import InputFile, expand_inputs
from mm_megatron.data.tokenizers import load_tokenizer


def run(inputs, prefix, kind="hf", **kw):
    kw.setdefault("workers", 0)
    cfg = PreprocessConfig(
        inputs=[str(i) for i in inputs],
        output_prefix=str(prefix),
        tokenizer=tokenizer_spec(kind),
        progress=False,
        **kw,
    )
    return preprocess(cfg)


def megatron_docs(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))], ds


def files_of(prefix):
    d, base = os.path.split(str(prefix))
    return sorted(n for n in os.listdir(d) if n.startswith(base))


def same_bytes(a, b):
    return all(
        open(f"{a}{e}", "rb").read() == open(f"{b}{e}", "rb").read() for e in (".bin", ".idx")
    )


@pytest.mark.parametrize("kind", ["hf", "tiktoken", "sentencepiece"])
def test_round_trip(tmp_path, kind):
    summary = run([corpus_jsonl()], tmp_path / "ds", kind)
    tok = load_tokenizer(tokenizer_spec(kind))
    docs, ds = megatron_docs(tmp_path / "ds")
    assert summary.documents == len(docs) == len(corpus_docs())
    assert summary.tokens == sum(map(len, docs))
    assert ds.index.dtype == np.uint16  # vocabularies < 65500
    for text, ids in zip(corpus_docs(), docs, strict=True):
        assert ids == [tok.bos_id, *tok.encode(text), tok.eos_id]
        if kind != "sentencepiece":
            assert tok.decode(ids[1:-1]) == text
    assert list(ds.document_indices) == list(range(len(docs) + 1))


def test_framing_flags(tmp_path):
    tok = load_tokenizer(tokenizer_spec("hf"))
    text = corpus_docs()[0]
    for bos, eos, expect in (
        (False, True, [*tok.encode(text), tok.eos_id]),
        (True, False, [tok.bos_id, *tok.encode(text)]),
        (False, False, tok.encode(text)),
    ):
        prefix = tmp_path / f"f{bos}{eos}"
        run([corpus_jsonl()], prefix, append_bos=bos, append_eos=eos)
        assert megatron_docs(prefix)[0][0] == expect


def test_same_bytes_for_any_worker_count(tmp_path):
    run([corpus_jsonl()], tmp_path / "w0", workers=0)
    for w in (1, 3):
        run([corpus_jsonl()], tmp_path / f"w{w}", workers=w, chunk_bytes=4096, max_in_flight=2)
        assert same_bytes(tmp_path / "w0", tmp_path / f"w{w}")


def _write_formats(d, docs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    half = len(docs) // 2
    lines = "".join(json.dumps({"text": t}) + "\n" for t in docs[:half]).encode()
    (d / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    rest = docs[half:]
    third = len(rest) // 3
    zlines = "".join(json.dumps({"text": t}) + "\n" for t in rest[:third]).encode()
    (d / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(zlines))
    pq.write_table(
        pa.table({"text": rest[third : 2 * third], "n": list(range(third))}),
        d / "c.parquet",
        row_group_size=3,
    )
    sub = d / "d"
    sub.mkdir()
    for i, t in enumerate(rest[2 * third :]):
        (sub / f"{i:03d}.txt").write_text(t, encoding="utf-8")


def test_input_formats_equal_jsonl(tmp_path):
    docs = list(corpus_docs())
    src = tmp_path / "src"
    src.mkdir()
    _write_formats(src, docs)
    files = expand_inputs(
        [str(src / "a.jsonl.gz"), str(src / "*.zst"), str(src / "c.parquet"), str(src / "d")]
    )
    assert [f.format for f in files[:3]] == ["jsonl", "jsonl", "parquet"]
    assert [f.compression for f in files[:3]] == ["gzip", "zstd", None]
    run([f.path for f in files], tmp_path / "mixed", workers=2, chunk_bytes=2048)
    run([corpus_jsonl()], tmp_path / "plain")
    assert same_bytes(tmp_path / "mixed", tmp_path / "plain")


def test_text_units(tmp_path):
    tok = load_tokenizer(tokenizer_spec("hf"))
    (tmp_path / "t.txt").write_text("first line\nsecond line\n\n\nthird para\nmore\n")
    for unit, expect in (
        ("file", ["first line\nsecond line\n\n\nthird para\nmore\n"]),
        ("line", ["first line", "second line", "third para", "more"]),
        ("paragraph", ["first line\nsecond line", "third para\nmore"]),
    ):
        run([tmp_path / "t.txt"], tmp_path / unit, text_unit=unit)
        got = [tok.decode(ids[1:-1]) for ids in megatron_docs(tmp_path / unit)[0]]
        assert got == expect


BAD_CASES = {
    "invalid_json": (b'{"text": "ok"}\n{"text": "bro\n{"text": "ok2"}\n', 2),
    "missing_key": (b'{"text": "ok"}\n{"body": "x"}\n{"text": "ok2"}\n', 2),
    "not_utf8": (b'{"text": "ok"}\n{"text": "caf\xe9"}\n{"text": "ok2"}\n', 2),
}


@pytest.mark.parametrize("kind", sorted(BAD_CASES))
def test_bad_records_fail_or_skip(tmp_path, kind):
    data, line = BAD_CASES[kind]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(data)
    with pytest.raises(PreprocessError, match=rf"bad\.jsonl:{line}: {kind}"):
        run([path], tmp_path / "out", workers=0)
    assert files_of(tmp_path / "out") == []  # nothing, not even temporary files
    summary = run([path], tmp_path / "out", on_error="skip")
    assert summary.skipped == {kind: 1}
    assert summary.documents == len(megatron_docs(tmp_path / "out")[0]) == data.count(b"\n") - 1


def _truncated(tmp_path, name):
    lines = b"".join(
        b'{"text": "document %d %s"}\n' % (i, hashlib.sha256(b"%d" % i).hexdigest().encode())
        for i in range(5000)
    )
    blob = (
        gzip.compress(lines) if name.endswith(".gz") else zstandard.ZstdCompressor().compress(lines)
    )
    path = tmp_path / name
    path.write_bytes(blob[: len(blob) // 2])
    return path


@pytest.mark.parametrize("name", ["cut.jsonl.gz", "cut.jsonl.zst"])
def test_truncated_compressed_file(tmp_path, name):
    path = _truncated(tmp_path, name)
    with pytest.raises(PreprocessError, match=rf"{name}:\d+: (bad_file|invalid_json)"):
        run([path], tmp_path / "out", workers=2)
    assert files_of(tmp_path / "out") == []
    summary = run([path, corpus_jsonl()], tmp_path / "out", on_error="skip", workers=2)
    assert summary.skipped.get("bad_file") == 1
    assert summary.documents > len(corpus_docs())  # the part before the cut, and the rest


def test_bad_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"body": ["a", "b"]}), good)
    with pytest.raises(PreprocessError, match=r"good\.parquet: missing_key: no column 'text'"):
        run([good], tmp_path / "out")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(good.read_bytes()[:-20])
    with pytest.raises(PreprocessError, match=r"broken\.parquet:1: bad_file"):
        run([broken], tmp_path / "out")
    pq.write_table(pa.table({"text": ["fine", None, ""]}), good)
    summary = run([good], tmp_path / "out", on_error="skip")
    assert summary.documents == 1 and summary.skipped == {"empty": 1, "missing_key": 1}


def test_failed_run_keeps_previous_output(tmp_path):
    run([corpus_jsonl()], tmp_path / "ds")
    before = read_index(tmp_path / "ds").num_documents
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "bro\n')  # invalid JSON on line 2
    with pytest.raises(PreprocessError):
        run([corpus_jsonl(), bad], tmp_path / "ds")
    assert read_index(tmp_path / "ds").num_documents == before
    assert files_of(tmp_path / "ds") == ["ds.bin", "ds.idx", "ds.meta.json"]


def test_crash_between_renames_leaves_no_complete_pair(tmp_path, monkeypatch):
    run([corpus_jsonl()], tmp_path / "ds")  # an older, complete pair
    real = os.replace

    def crash_on_idx(src, dst):
        if str(dst).endswith(".idx"):
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_idx)
    writer = IndexedWriter(tmp_path / "ds", np.uint16)
    writer.add_document([1, 2, 3])
    with pytest.raises(KeyboardInterrupt):
        writer.finalize({})
    assert not dataset_exists(tmp_path / "ds")  # new .bin, but no .idx: not loadable


def test_shard_files_contiguous_and_balanced():
    files = [
        InputFile(f"f{i}", "jsonl", None, s)
        for i, s in enumerate([10, 10, 10, 10, 100, 10, 10, 10, 10, 10])
    ]
    shards = [shard_files(files, r, 3) for r in range(3)]
    assert [f for s in shards for f in s] == files
    assert all(shards)
    assert shard_files(files, 0, 1) == files
    assert sorted(len(shard_files(files[:2], r, 4)) for r in range(4)) == [0, 0, 1, 1]


def test_cli_multi_rank_then_merge(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    docs = corpus_docs()
    for i in range(6):
        write_jsonl(src / f"part{i}.jsonl", docs[i::6])
    tool = [
        sys.executable,
        str(ROOT / "tools" / "preprocess_data.py"),
        "--input",
        str(src),
        "--tokenizer",
        tokenizer_spec("tiktoken"),
        "--no-progress",
    ]
    single = subprocess.run(
        [*tool, "--output-prefix", str(tmp_path / "all"), "--workers", "2"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "documents  " in single.stdout and "tokens/s" in single.stdout
    for rank in range(3):
        env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_NTASKS="3")
        subprocess.run(
            [*tool, "--output-prefix", str(tmp_path / "sharded"), "--workers", "0"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    assert dataset_exists(tmp_path / "sharded.part-00002-of-00003")
    merge = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "merge_datasets.py"),
            "--parts-of",
            str(tmp_path / "sharded"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"{len(docs)} documents" in merge.stdout
    assert same_bytes(tmp_path / "all", tmp_path / "sharded")
    meta = json.loads((tmp_path / "sharded.meta.json").read_text())
    assert meta["documents"] == len(docs) and len(meta["inputs"]) == 6


def test_cli_reports_bad_input(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\nnot json\n')
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "preprocess_data.py"),
        "--input",
        str(bad),
        "--output-prefix",
        str(tmp_path / "o"),
        "--tokenizer",
        tokenizer_spec("hf"),
        "--workers",
        "0",
        "--no-progress",
    ]
    failed = subprocess.run(cmd, capture_output=True, text=True)
    assert failed.returncode == 1
    assert f"{bad}:2: invalid_json" in failed.stderr and "--on-error skip" in failed.stderr
    ok = subprocess.run([*cmd, "--on-error", "skip"], capture_output=True, text=True, check=True)
    assert "skipped    1  (invalid_json: 1)" in ok.stdout
    assert f"skipped {bad}:2: invalid_json" in ok.stderr
