"""Training in every parallel layout follows the single-process run step for step.

Tolerance: fp32 on CPU; layouts differ only in reduction order, so losses and gradient
norms agree to 1e-4 relative over the steps run (measured differences are ~1e-6). Activation
recomputation (full or selective) and the overlapped parameter all-gather of the
distributed optimizer must not change anything; bf16 mixed precision agrees to 2e-2.
"""

from __future__ import annotations

import pytest
from train_runner import base_overrides, losses, run

LAYOUTS = {
    "tp2": (2, ["parallel.tensor_model_parallel_size=2"]),
    "tp2_sp": (2, ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]),
    "pp2": (2, ["parallel.pipeline_model_parallel_size=2"]),
    "dp2": (2, []),
    "dp2_distopt": (2, ["parallel.use_distributed_optimizer=true"]),
    "dp2_distopt_overlap": (
        2,
        [
            "parallel.use_distributed_optimizer=true",
            "parallel.overlap_grad_reduce=true",
            "runtime.overlap_param_gather=true",
        ],
    ),
    "pp2_vpp2": (
        2,
        [
            "parallel.pipeline_model_parallel_size=2",
            "model.num_layers=4",
            "parallel.virtual_pipeline_model_parallel_size=2",
            "parallel.batch_p2p_comm=false",
        ],
    ),
    "recompute_full": (1, ["train.recompute=full"]),
    "recompute_selective": (1, ["train.recompute=selective"]),
    "bf16": (1, ["train.precision=bf16"]),
}
TOLERANCE = {"bf16": 2e-2}  # bf16 parameters and activations; all else fp32
CASES = [("mm", name) for name in LAYOUTS] + [
    ("transformer", name) for name in ("tp2_sp", "pp2", "dp2")
]


def _run_losses(tmp_path, arch, nproc, extra):
    result = run(base_overrides(tmp_path, arch) + ["checkpoint.dir=null"] + extra, arch, nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    got = losses(result.stdout)
    assert sorted(got) == [1, 2, 3, 4], result.stdout[-2000:]
    return got


_SINGLE: dict[tuple[str, bool], dict] = {}


def _single(tmp_path_factory, arch, four_layers):
    key = (arch, four_layers)
    if key not in _SINGLE:
        extra = ["model.num_layers=4"] if four_layers else []
        _SINGLE[key] = _run_losses(tmp_path_factory.mktemp("single"), arch, 1, extra)
    return _SINGLE[key]


@pytest.mark.parametrize("arch, layout", CASES, ids=[f"{a}-{n}" for a, n in CASES])
def test_layout_matches_single_process(tmp_path, tmp_path_factory, arch, layout):
    nproc, extra = LAYOUTS[layout]
    want = _single(tmp_path_factory, arch, "model.num_layers=4" in extra)
    got = _run_losses(tmp_path, arch, nproc, extra)
    rel = TOLERANCE.get(layout, 1e-4)
    for step, (loss, gnorm) in want.items():
        assert got[step][0] == pytest.approx(loss, rel=rel), (step, got[step], loss)
        assert got[step][1] == pytest.approx(gnorm, rel=rel), (step, got[step], gnorm)
    assert want[4][0] < want[1][0]  # and it learns
