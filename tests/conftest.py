"""Shared pytest setup: one thread per process, Triton's interpreter without a GPU, and the
session's local SLURM cluster. The project itself is installed (editable) by
scripts/setup_env.sh; pytest puts tests/ on the import path for the helper modules."""

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _cpu_only() -> bool:
    import torch

    return not torch.cuda.is_available()


# Without a GPU the Triton kernels run under Triton's interpreter. Triton decides when it is
# first imported whether its own library functions (tl.max, ...) are interpreted, and torch's
# compiler imports it early, so the interpreter has to be on for the whole session.
if _cpu_only():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def cluster() -> Iterator[object]:
    """One 2-node local SLURM cluster per session, shared by every module that asks for it
    (tests/slurm_cluster.py), or a skip with the reason."""
    from slurm_cluster import local_cluster_session

    yield from local_cluster_session()
