"""The marked copies (``# Copied from``) in the shipped Hugging Face files match their sources,
and the check that says so can fail (tools/check_copies.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from paths import ROOT, load_tool

check_copies = load_tool("check_copies")
CopyError = check_copies.CopyError
apply_renames = check_copies.apply_renames
check_file = check_copies.check_file
default_files = check_copies.default_files
find_copies = check_copies.find_copies
parse_renames = check_copies.parse_renames

HF = ROOT / "mm_megatron" / "hf"
SHIPPED = [
    HF / n
    for n in (
        "modeling_memory_mosaics.py",
        "cache_memory_mosaics.py",
        "configuration_memory_mosaics.py",
    )
]


def test_shipped_copies_match_their_sources() -> None:
    files = default_files()
    assert set(SHIPPED) <= set(files)
    problems = [p for f in files for p in check_file(f)]
    assert not problems, "\n\n".join(problems) + "\n\nrun: python tools/check_copies.py --fix"


def test_the_key_scan_is_a_marked_copy_of_the_library_scan() -> None:
    copies = {c.source: c for f in SHIPPED for c in find_copies(f)}
    scan = copies["mm_megatron.ops.gated_scan.gated_key_scan_torch"]
    assert scan.renames == (("gated_key_scan_torch", "gated_key_scan"),)
    for name in ("_chunked_state", "_normalize", "doc_pos_from_reset", "_check_inputs"):
        assert f"mm_megatron.ops.gated_scan.{name}" in copies
    for source in (
        "mm_megatron.init_rules.TABLE6_SCALARS",
        "mm_megatron.init_rules.table6_std",
        "mm_megatron.init_rules.init_head_scalars_",
        "mm_megatron.config.max_ltm_offset",
    ):
        assert source in copies


def _altered_copy(tmp_path: Path, old: str, new: str) -> Path:
    path = tmp_path / "modeling_memory_mosaics.py"
    shutil.copyfile(HF / path.name, path)
    text = path.read_text()
    assert text.count(old) == 1
    path.write_text(text.replace(old, new))
    return path


def test_an_altered_copy_is_detected_and_fixed(tmp_path: Path) -> None:
    path = _altered_copy(
        tmp_path, "beta1_raw.float().clamp(max=10.0)", "beta1_raw.float().clamp(max=11.0)"
    )
    problems = check_file(path)
    assert len(problems) == 1
    assert "differs from mm_megatron.memory_math.bandwidth_params" in problems[0]
    assert "max=11.0" in problems[0]
    assert check_file(path, fix=True)
    assert check_file(path) == []
    assert path.read_text() == (HF / path.name).read_text()


def test_comments_and_formatting_do_not_count_but_docstrings_do(tmp_path: Path) -> None:
    old = "    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)\n"
    path = _altered_copy(
        tmp_path,
        old,
        "    return x / x.norm(  # the L2 norm\n"
        "        dim=-1, keepdim=True\n    ).clamp_min(eps)\n",
    )
    assert check_file(path) == []
    path = _altered_copy(
        tmp_path, "divide each head vector by its L2 norm", "divide each head vector by its norm"
    )
    assert "differs from mm_megatron.ops.naive.l2_normalize" in check_file(path)[0]


def test_a_marker_pointing_to_a_missing_source_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "copy.py"
    path.write_text(
        "# Copied from mm_megatron.memory_math.no_such_function\ndef f():\n    return 1\n"
    )
    (problem,) = check_file(path)
    assert "defines no 'no_such_function'" in problem
    path.write_text("# Copied from mm_megatron.no_such_module.f\ndef f():\n    return 1\n")
    (problem,) = check_file(path)
    assert "no module" in problem


def test_a_marker_above_no_definition_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "copy.py"
    path.write_text("# Copied from mm_megatron.ops.naive.L2_EPS\n\nL2_EPS = 1e-6\n")
    (problem,) = check_file(path)
    assert "not directly above a definition" in problem
    path.write_text("# Copied from mm_megatron.ops.naive.L2_EPS with L2_EPS\nL2_EPS = 1e-6\n")
    (problem,) = check_file(path)
    assert "malformed rename" in problem


def test_renames_replace_whole_names_only() -> None:
    renames = parse_renames("RMSNorm->MemoryMosaicsRMSNorm, torch.Tensor->Tensor")
    text = "class RMSNorm(RMSNormBase):\n    x: torch.Tensor = my.torch.Tensor\n"
    assert apply_renames(text, renames) == (
        "class MemoryMosaicsRMSNorm(RMSNormBase):\n    x: Tensor = my.torch.Tensor\n"
    )
    with pytest.raises(CopyError):
        parse_renames("a->")


def test_renames_may_continue_below_the_marker(tmp_path: Path) -> None:
    path = tmp_path / "copy.py"
    path.write_text(
        "import torch\n\n\n# Copied from mm_megatron.ops.naive.L2_EPS\n"
        "#     with L2_EPS->EPS\nEPS = 1e-6\n"
    )
    (copy,) = find_copies(path)
    assert copy.renames == (("L2_EPS", "EPS"),) and copy.first == 6
    assert check_file(path) == []


def test_command_line_exit_status(tmp_path: Path) -> None:
    tool = [sys.executable, str(ROOT / "tools" / "check_copies.py")]
    ok = subprocess.run([*tool, *map(str, SHIPPED)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    path = _altered_copy(
        tmp_path,
        'nn.init.uniform_(params["gamma"], 0.0, 1.0)',
        'nn.init.uniform_(params["gamma"], 0.0, 2.0)',
    )
    bad = subprocess.run([*tool, str(path)], capture_output=True, text=True)
    assert bad.returncode == 1 and "init_head_scalars_" in bad.stderr
    fixed = subprocess.run([*tool, "--fix", str(path)], capture_output=True, text=True)
    assert fixed.returncode == 0 and check_file(path) == []
