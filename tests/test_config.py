"""Configuration loading and validation: every bad value names its field."""

from __future__ import annotations

import pytest
from paths import ROOT

from mm_megatron.config import ModelConfig, ParallelConfig, load_model_config, validate_layout
from mm_megatron.config_loading import ConfigError, apply_overrides, from_mapping

CONFIGS = ROOT / "pretrain" / "configs"


def _model(**overrides):
    data = dict(
        arch="mm",
        num_layers=2,
        hidden_size=32,
        num_heads=4,
        ffn_hidden_size=48,
        vocab_size=64,
        seq_length=32,
        short_window=8,
        ltm_offset_min=3,
        ltm_offset_max=6,
        ltm_offset_inference=3,
    )
    data.update(overrides)
    return from_mapping(ModelConfig, data, "model")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads(path):
    cfg = load_model_config(str(path))
    assert cfg.hidden_size % cfg.num_heads == 0


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"shrot_window": 4}, "model.shrot_window: unknown key"),
        ({"short_window": 1}, "model.short_window"),
        ({"ltm_offset_min": 0}, "model.ltm_offset_min"),
        ({"ltm_offset_min": 7, "ltm_offset_max": 6}, "model.ltm_offset_min"),
        ({"ltm_offset_max": 9}, "model.ltm_offset_max"),
        ({"ltm_offset_inference": 9}, "model.ltm_offset_inference"),
        ({"num_heads": 5}, "model.num_heads"),
        ({"num_layers": "two"}, "model.num_layers: expected an integer"),
        ({"arch": "rnn"}, "model.arch: 'rnn' is not one of"),
        ({"memory_backend": "cuda"}, "model.memory_backend"),
        ({"long_term_memory": "yes"}, "model.long_term_memory: expected true or false"),
        ({"scan_chunk_size": 1}, "model.scan_chunk_size: the key scan's chunks need >= 2"),
        ({"arch": "transformer", "rotary_base": 1}, "model.rotary_base: must be >= 2"),
        ({"arch": "transformer", "init_method_std": 0.0}, "model.init_method_std: must be > 0"),
    ],
)
def test_bad_model_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.").replace("(", r"\(")):
        _model(**overrides)


def test_missing_required_key():
    with pytest.raises(ConfigError, match=r"model\.vocab_size: required key is missing"):
        from_mapping(
            ModelConfig,
            {"arch": "mm", "num_layers": 1, "hidden_size": 8, "num_heads": 2, "ffn_hidden_size": 8},
            "model",
        )


@pytest.mark.parametrize(
    "parallel, message",
    [
        (ParallelConfig(tensor_model_parallel_size=3), "num_heads 4 is not divisible by tensor"),
        (
            ParallelConfig(pipeline_model_parallel_size=4, virtual_pipeline_model_parallel_size=2),
            "num_layers 2 is not divisible by the 8 pipeline stages",
        ),
    ],
)
def test_layout_errors_name_the_field(parallel, message):
    with pytest.raises(ConfigError, match=message):
        validate_layout(_model(), parallel)


def test_parallel_section_validation():
    with pytest.raises(ConfigError, match="sequence_parallel: needs tensor_model_parallel_size"):
        from_mapping(ParallelConfig, {"sequence_parallel": True}, "parallel")
    with pytest.raises(ConfigError, match="parallel.virtual_pipeline_model_parallel_size"):
        from_mapping(ParallelConfig, {"virtual_pipeline_model_parallel_size": 2}, "parallel")


def test_overrides_and_file_errors(tmp_path):
    data = apply_overrides({"model": {"num_layers": 2}}, ["model.num_layers=4", "model.x.y=1"])
    assert data["model"]["num_layers"] == 4 and data["model"]["x"] == {"y": 1}
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides({}, ["model.num_layers"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_model_config(str(bad))
    with pytest.raises(ConfigError, match="missing.yaml: cannot read config"):
        load_model_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match=r"mm_8b.yaml: model\.num_heads"):
        load_model_config(str(CONFIGS / "mm_8b.yaml"), ["model.num_heads=33"])


def test_vocab_padding_does_not_depend_on_tp():
    cfg = _model(vocab_size=128256, make_vocab_size_divisible_by=128)
    assert {cfg.padded_vocab_size(tp) for tp in (1, 2, 4, 8)} == {128256}
    with pytest.raises(ConfigError, match="make_vocab_size_divisible_by"):
        validate_layout(
            _model(vocab_size=100, make_vocab_size_divisible_by=6),
            ParallelConfig(tensor_model_parallel_size=4),
        )


def test_cpu_mode_keeps_device_contexts(tmp_path):
    """CPU mode redirects device="cuda" but must not break `with torch.device("meta")`."""
    import subprocess
    import sys

    code = (
        "from mm_megatron.cpu_compat import enable_cpu_mode; import torch; enable_cpu_mode()\n"
        "with torch.device('meta'):\n    assert torch.zeros(2).is_meta\n"
        "assert torch.zeros(2, device='cuda').device.type == 'cpu'\n"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(CONFIGS.parents[1])},
    )
