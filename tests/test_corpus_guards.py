"""Guards on the corpus and the training data: whitespace documents kept (Megatron-LM's bytes),
stale temporaries of killed runs removed, resumable preprocessing, dataset provenance checked
against the training tokenizer, and the blend plan printed before any work."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import hf_tokenizer_dir, write_jsonl
from paths import ROOT
from train_runner import base_overrides, run, small_dataset

from mm_megatron.data.indexed import meta_path, read_index, stale_temporaries
from mm_megatron.data.preprocess import PreprocessConfig, preprocess
from mm_megatron.data.tokenizers import load_tokenizer

DEMO = ROOT / "data" / "demo" / "stdlib.jsonl"
# Valid texts that are only whitespace: each tokenizes to at least one token.
WHITESPACE_DOCS = ["\u00a0", "\n\n", "   ", "\t\n \u3000"]


def _tok():
    return load_tokenizer(str(hf_tokenizer_dir() / "tokenizer.json"))


def _preprocess(inputs: list[Path], prefix: Path, **kw) -> object:
    cfg = PreprocessConfig(
        inputs=[str(p) for p in inputs],
        output_prefix=str(prefix),
        tokenizer=str(hf_tokenizer_dir() / "tokenizer.json"),
        workers=0,
        progress=False,
        **kw,
    )
    return preprocess(cfg, log=open(os.devnull, "w"))  # noqa: SIM115


def test_whitespace_documents_kept_empty_ones_counted(tmp_path):
    """Whitespace is text: kept by default (no --on-error skip needed); a document with no
    tokens at all is dropped and counted, never fatal."""
    tok = _tok()
    docs = ["hello", *WHITESPACE_DOCS, "", "world"]
    summary = _preprocess(
        [write_jsonl(tmp_path / "in.jsonl", docs)], tmp_path / "out", append_bos=False
    )
    index = read_index(tmp_path / "out")
    kept = [d for d in docs if tok.encode(d)]
    assert len(kept) == len(docs) - 1  # only "" has no tokens
    assert summary.documents == index.num_documents == len(kept)
    assert summary.skipped == {"empty": 1}
    assert [index.document(i).tolist() for i in range(len(kept))] == [
        tok.encode(d) + [tok.eos_id] for d in kept
    ]
    assert json.loads(Path(meta_path(str(tmp_path / "out"))).read_text())["skipped"] == {"empty": 1}


def _megatron_lm_reference(docs: list[str], tok, out: Path) -> None:
    """What Megatron-LM's tools/preprocess_data.py writes with --append-eod (no BOS, no
    sentence splitting): each document's ids plus EOD, through megatron-core's builder."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(out) + ".bin", dtype=np.uint16)
    for text in docs:
        ids = tok.encode(text)
        if ids:  # our reader drops documents without tokens (see docs/data.md)
            builder.add_document(torch.tensor(ids + [tok.eos_id]), [len(ids) + 1])
    builder.finalize(str(out) + ".idx")


def test_demo_corpus_bytes_equal_megatron_lm(tmp_path):
    """The demo corpus (a slice, plus whitespace-only documents) gives byte-identical .bin/.idx."""
    if not DEMO.exists():
        pytest.skip("demo corpus not built (bash scripts/prepare_demo_data.sh)")
    lines = DEMO.read_text(encoding="utf-8").splitlines()[:60]
    docs = [json.loads(line)["text"] for line in lines]
    docs[5:5] = WHITESPACE_DOCS
    tok = _tok()
    _preprocess([write_jsonl(tmp_path / "demo.jsonl", docs)], tmp_path / "ours", append_bos=False)
    _megatron_lm_reference(docs, tok, tmp_path / "ref")
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path):
    prefix = tmp_path / "out"
    host = socket.gethostname()
    stale = [f"{prefix}.bin.tmp-{host}-{_dead_pid()}", f"{prefix}.idx.tmp-{_dead_pid()}"]
    kept = [
        f"{prefix}.bin.tmp-{host}-{os.getppid()}",  # a live process
        f"{prefix}.bin.tmp-some-other-node-12",
    ]  # another host on a shared file system
    for path in stale + kept:
        Path(path).write_bytes(b"x" * 100)
    assert sorted(stale_temporaries(prefix)[0]) == sorted(stale)
    _preprocess([write_jsonl(tmp_path / "in.jsonl", ["a b c"])], prefix)
    assert not any(Path(p).exists() for p in stale)
    assert all(Path(p).exists() for p in kept)
    assert read_index(prefix).num_documents == 1


def test_killed_preprocessing_leaves_temporaries_the_next_run_removes(tmp_path):
    """SIGKILL during a real run, then a new run of the same command."""
    docs = [f"document {i} " * 400 for i in range(400)]
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    cmd = [
        sys.executable,
        "tools/preprocess_data.py",
        "--input",
        str(src),
        "--output-prefix",
        str(tmp_path / "out"),
        "--tokenizer",
        str(hf_tokenizer_dir() / "tokenizer.json"),
        "--workers",
        "0",
        "--chunk-bytes",
        "4096",
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp_bin = None
    for _ in range(600):
        found = list(tmp_path.glob("out.bin.tmp-*"))
        if found and found[0].stat().st_size > 0:
            tmp_bin = found[0]
            break
        if proc.poll() is not None:
            break
        __import__("time").sleep(0.05)
    proc.kill()
    proc.wait()
    assert tmp_bin is not None and tmp_bin.exists(), "the run finished before it could be killed"
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"removed {tmp_bin}" in res.stderr
    assert not list(tmp_path.glob("out.*.tmp-*"))


def test_resume_keeps_complete_parts_and_redoes_broken_ones(tmp_path):
    """A resubmitted multi-task job (--resume) redoes only missing or incomplete parts."""
    files = [
        write_jsonl(tmp_path / f"in{i}.jsonl", [f"text {i} {j}" for j in range(20)])
        for i in range(4)
    ]
    prefix = tmp_path / "ds"
    parts = [Path(f"{prefix}.part-{r:05d}-of-00002") for r in range(2)]

    def run_rank(rank: int) -> str:
        res = subprocess.run(
            [
                sys.executable,
                "tools/preprocess_data.py",
                "--input",
                *map(str, files),
                "--output-prefix",
                str(prefix),
                "--tokenizer",
                str(hf_tokenizer_dir() / "tokenizer.json"),
                "--workers",
                "0",
                "--no-progress",
                "--rank",
                str(rank),
                "--world-size",
                "2",
                "--resume",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr
        return res.stderr

    run_rank(0)
    first = (Path(f"{parts[0]}.bin").read_bytes(), os.path.getmtime(f"{parts[0]}.idx"))
    assert "kept (--resume)" in run_rank(0)  # complete: not rewritten
    assert os.path.getmtime(f"{parts[0]}.idx") == first[1]
    assert "kept" not in run_rank(1)  # missing: written
    with open(f"{parts[1]}.bin", "r+b") as f:  # an incomplete part (truncated data)
        f.truncate(10)
    assert "kept" not in run_rank(1)
    assert read_index(parts[1]).num_documents == 40
    assert Path(f"{parts[0]}.bin").read_bytes() == first[0]


def test_launch_script_resumes_by_default():
    text = (ROOT / "launch" / "preprocess.sh").read_text()
    assert '[ "$MM_PREP_RESUME" != 1 ] || extra+=(--resume)' in text
    assert 'MM_PREP_RESUME="${MM_PREP_RESUME:-1}"' in text


def _copy_dataset(prefix: str, dest: Path, **meta_changes) -> str:
    for ext in (".bin", ".idx"):
        (dest.parent / (dest.name + ext)).write_bytes(Path(prefix + ext).read_bytes())
    meta = json.loads(Path(meta_path(prefix)).read_text())
    meta.update(meta_changes)
    for key in [k for k, v in meta_changes.items() if v is None and k == "tokenizer_sha256"]:
        meta.pop(key)
    Path(meta_path(str(dest))).write_text(json.dumps(meta))
    return str(dest)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"tokenizer_sha256": "0" * 64}, "not the training tokenizer"),
        ({"eos_id": 3}, "end-of-document id 3, but the training tokenizer's end-of-text id is"),
        ({"eos_id": None}, "without an end-of-document token"),
    ],
)
def test_training_refuses_data_from_another_tokenizer(tmp_path, change, message):
    prefix, _ = small_dataset()
    other = _copy_dataset(prefix, tmp_path / "other", **change)
    res = run(base_overrides(tmp_path) + [f"data.train_blend=[{other}]"], timeout=120)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert message in res.stderr and other in res.stderr
    assert "blend plan" not in res.stdout  # refused before any work


def test_blend_plan_and_epochs_warning(tmp_path):
    """Printed before training: tokens held and drawn per dataset, epochs, and a warning above
    data.epochs_warning; a dataset without metadata is a warning, not an error."""
    prefix, _ = small_dataset()
    bare = tmp_path / "bare"
    for ext in (".bin", ".idx"):
        (tmp_path / f"bare{ext}").write_bytes(Path(prefix + ext).read_bytes())
    res = run(
        base_overrides(tmp_path)
        + [f"data.train_blend=[3,{prefix},1,{bare}]", "train.iters=2", "data.epochs_warning=0.001"],
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    held = int(read_index(prefix).num_tokens * 0.9)  # data.split=90,10,0
    drawn = 2 * 4 * 64 * 0.75  # iters x global batch x seq length x weight
    assert f"blend plan for {2 * 4 * 64:,} training tokens" in res.stdout
    assert f"  0.750  {held:16,}  {int(drawn):16,}  {drawn / held:7.2f}  {prefix}" in res.stdout
    assert f"WARNING: {prefix} will be read {drawn / held:.2f} times" in res.stdout
    assert f"WARNING: data.train_blend: {bare}.meta.json is missing" in res.stdout


def test_epochs_warning_validated(tmp_path):
    res = run(base_overrides(tmp_path) + ["data.epochs_warning=0"], timeout=120)
    assert res.returncode == 2 and "epochs_warning: must be > 0" in res.stderr
