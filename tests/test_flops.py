"""Model FLOPs per token against the TFLOP/s NVIDIA's tables print beside
tokens/s: their ratio is the FLOPs per token each release counted."""

from __future__ import annotations

import pytest

from loom.planner.cost.compute import megatron_flops_per_token, model_flops_per_token
from loom.profiles.published import nvidia_runs

RUNS = [run for run in nvidia_runs() if run.job is not None]


def _published_flops_per_token(row: dict) -> float:
    return row["tflops_per_gpu"] * 1e12 / row["tokens_per_s_per_gpu"]


@pytest.mark.parametrize("run", [run for run in RUNS if run.row["release"] == "24.07"], ids=lambda run: run.row["id"])
def test_nemo_24_07_counted_every_attention_score(run):
    """NeMo 24.07 counted the masked half of causal attention too (PaLM's convention, loom's MFU)."""
    row = run.row
    assert model_flops_per_token(run.job.model, row["seq"]) == pytest.approx(_published_flops_per_token(row), rel=0.005)
    assert megatron_flops_per_token(run.job.model, row["seq"]) < _published_flops_per_token(row) * 0.99


# gpt-oss's gated QuickGELU MLP is counted as ungated there: Megatron's formula
# takes the gated factor from --swiglu only (training.py ffn_expansion_factor).
@pytest.mark.parametrize("run", [run for run in RUNS if run.row["release"] != "24.07" and "gpt-oss" not in run.row["id"]],
                         ids=lambda run: run.row["id"])
def test_megatron_bridge_counts_the_unmasked_half_and_the_mtp_modules(run):
    """From 25.09 the tables print Megatron-LM's count: causal attention's
    unmasked half, DeepSeek-V3's multi-token prediction module as one more
    layer and output head."""
    row = run.row
    assert megatron_flops_per_token(run.job.model, row["seq"]) == pytest.approx(_published_flops_per_token(row), rel=0.006)
    assert model_flops_per_token(run.job.model, row["seq"]) > _published_flops_per_token(row) * 1.03
