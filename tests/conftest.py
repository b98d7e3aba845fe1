"""Shared fixtures: tiny checkpoints of every family, built once per session with transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny_models import family_configs, make_tiny_model

FAMILIES = list(family_configs())

# pytest -n 2 runs two workers on two cores: one torch thread each keeps them from contending (5x faster).
torch.set_num_threads(1)


def pytest_configure(config):
    """Load offload's kernels once in the process that starts the xdist workers (on a fresh clone: compile them,
    ~90 s), so each worker loads them from numba's cache rather than both compiling them at once."""
    if not hasattr(config, "workerinput"):
        from offload.experts.kernels.warmup import warm
        warm()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tiny_dir(family, dtype=float32, sharded=False) -> path of a saved tiny checkpoint (cached)."""
    made: dict[tuple, Path] = {}

    def get(family: str, dtype: torch.dtype = torch.float32, sharded: bool = False) -> Path:
        key = (family, dtype, sharded)
        if key not in made:
            out = tmp_path_factory.mktemp(f"{family}-{str(dtype)[6:]}{'-sharded' if sharded else ''}")
            made[key] = make_tiny_model(family, out, dtype=dtype, shard_bytes="40KB" if sharded else None)
        return made[key]

    return get
