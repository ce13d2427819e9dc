"""Shared fixtures: small jobs built from the catalogue and inline clusters."""

from __future__ import annotations

import pytest

from loom.planner.specs.cluster import parse_cluster
from loom.planner.specs.job import Features, Job
from loom.planner.specs.model import load_model
from loom.profiles.published import VALIDATION, load_validation


def make_cluster(nodes: int = 8, gpu: str = "H100", nvlink_GBps: float = 450, nic_Gbps: float = 400):
    return parse_cluster(
        {"nodes": nodes, "gpus_per_node": 8, "gpu": gpu, "nvlink_GBps": nvlink_GBps, "nics_per_node": 8, "nic_Gbps": nic_Gbps},
        "test-cluster",
    )


def make_job(model: str = "llama-3-8b", nodes: int = 8, gbs: int = 512, seq: int = 8192, **kwargs) -> Job:
    return Job(model=load_model(model), cluster=make_cluster(nodes), global_batch_size=gbs, seq_length=seq, **kwargs)


@pytest.fixture(scope="session")
def validation() -> dict:
    """shared/validation/published_runs.yaml, which CI lays beside the clone."""
    if not VALIDATION.is_file():
        pytest.skip(f"{VALIDATION} is not beside this checkout")
    return load_validation()


__all__ = ["make_cluster", "make_job", "Features"]
