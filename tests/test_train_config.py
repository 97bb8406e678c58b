"""Training-config errors are reported before any work starts, naming the file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
from paths import ROOT
from train_runner import base_overrides, run

from mm_megatron.config_loading import ConfigError
from pretrain.config import load_train_config

TINY = str(ROOT / "pretrain" / "configs" / "tiny_mm.yaml")


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["train.micro_batchsize=2"], 1, r"train\.micro_batchsize: unknown key"),
        (["parallel.tensor_model_parallel_size=3"], 3, "num_heads 4 is not divisible"),
        (["parallel.tensor_model_parallel_size=2"], 3, "world size 3 is not divisible"),
        (["train.global_batch_size=6"], 1, r"global_batch_size: 6 is not divisible by micro_batch"),
        (
            [
                "parallel.pipeline_model_parallel_size=2",
                "parallel.virtual_pipeline_model_parallel_size=2",
            ],
            2,
            "batch_p2p_comm: interleaved pipelining with pipeline_model_parallel_size 2",
        ),
        (["optimizer.warmup_iters=500"], 1, "warmup_iters: 500 must be smaller than the run"),
        (["train.tokens=1000"], 1, "give exactly one of train.iters and train.tokens"),
        (["runtime.exit_interval=0"], 1, r"runtime\.exit_interval: must be >= 1"),
        (["data.split=90,10"], 1, r"data\.split: expected three"),
        (["optimizer.lr=-1"], 1, r"optimizer\.lr: must be > 0"),
        (["optimizer.weight_decay=-0.1"], 1, r"optimizer\.weight_decay: must be >= 0"),
        (["optimizer.eps=-1e-8"], 1, r"optimizer\.eps: must be >= 0"),
        (["optimizer.clip_grad=-1"], 1, r"optimizer\.clip_grad: must be >= 0"),
        (["train.seed=-1"], 1, r"train\.seed: must be in \[0, 2\*\*32\)"),
        (["train.seed=4294967296"], 1, r"train\.seed: must be in \[0, 2\*\*32\)"),
        (["logging.peak_tflops=0"], 1, r"logging\.peak_tflops: must be > 0 or null"),
        (["data.valid_blend=null", "data.split=0,1,0"], 1, r"data\.split: the train share"),
        (
            [
                "parallel.pipeline_model_parallel_size=4",
                "parallel.virtual_pipeline_model_parallel_size=2",
                "parallel.overlap_p2p_comm=true",
            ],
            4,
            r"parallel\.overlap_p2p_comm: megatron-core's interleaved pipeline schedule cannot",
        ),
    ],
)
def test_inconsistent_configs_are_rejected(overrides, world, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(TINY, overrides).data_parallel_size(world)


def test_every_shipped_training_config_validates():
    for path in sorted((ROOT / "pretrain" / "configs").glob("*.yaml")):
        cfg = load_train_config(str(path), ["data.train_blend=[x]", "data.tokenizer=t"])
        model_parallel = (
            cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size
        )
        assert cfg.data_parallel_size(model_parallel) == 1, path
        if not path.stem.startswith("tiny"):  # 16 nodes of 8 GPUs
            assert cfg.data_parallel_size(128) == 128 // model_parallel, path


def test_paper_recipe_length():
    cfg = load_train_config(
        str(ROOT / "pretrain" / "configs" / "mm_8b.yaml"),
        ["data.train_blend=[x]", "data.tokenizer=t"],
    )
    assert cfg.tokens_per_iter == 1024 * 4096 and cfg.train_iters == 238418
    assert cfg.optimizer.final_lr == pytest.approx(1e-5)


def test_cli_reports_config_errors_with_status_2(tmp_path):
    result = run(base_overrides(tmp_path) + ["model.num_heads=5"])
    assert result.returncode == 2
    assert "config error:" in result.stderr and "model.num_heads" in result.stderr
    assert "tiny_mm.yaml" in result.stderr


def test_missing_dataset_prefix_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "corpus_text_document"
    result = run(base_overrides(tmp_path) + [f"data.train_blend=[1.0,{missing}]"])
    assert result.returncode == 2, result.stderr[-2000:]
    assert "data.train_blend" in result.stderr and str(missing) in result.stderr
    assert not (Path(tmp_path) / "ckpt").exists()  # nothing written
