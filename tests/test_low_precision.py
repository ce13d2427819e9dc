"""NVFP4 training (precision nvfp4: Transformer Engine's NVFP4BlockScaling
through Megatron's --fp4-format e2m1 --fp4-recipe nvfp4) and precision
mxfp8 (fp8 with MXFP8 block scaling), issue #16: GEMMs at the fp4 peak,
the casts and the saved and cached quantised copies, what megatron-core
builds from the flags, and what cannot run them refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from loom.cli.app import app
from loom.planner.cost.efficiency import NVFP4_BYTES, gemm_time_s
from loom.planner.cost.memory import StateBytes
from loom.planner.specs.job import Features, load_job
from loom.profiles.catalogue import find_gpu

B200 = find_gpu("B200")
runner = CliRunner()


def _job(tmp_path, gpu: str = "B200", **fields) -> str:
    cluster = {"nodes": 1, "gpus_per_node": 8, "gpu": gpu, "nvlink_GBps": 900, "nics_per_node": 8, "nic_Gbps": 400}
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cluster))
    job = {"model": "llama-3-8b", "cluster": "cluster.yaml", "global_batch_size": 32, "seq_length": 4096, **fields}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    return str(tmp_path / "job.yaml")


def test_nvfp4_plans_warn_that_their_gemm_efficiency_is_assumed(tmp_path):
    result = runner.invoke(app, ["evaluate", _job(tmp_path, precision="nvfp4"), "--tp", "1"])
    assert result.exit_code == 0 and "assumption" in result.output


def test_nvfp4_gemms_run_at_the_fp4_peak():
    # a large GEMM is compute-bound: its time follows the peak (fp8's efficiency: gpus.yaml has no NVFP4 figure)
    fp8, fp4 = gemm_time_s(8192, 8192, 8192, B200, "fp8"), gemm_time_s(8192, 8192, 8192, B200, "nvfp4")
    assert fp8 / fp4 == pytest.approx(B200.peak_flops("nvfp4") / B200.peak_flops("fp8"))
    assert not find_gpu("H100").supports("nvfp4") and B200.supports("nvfp4")


def test_nvfp4_keeps_both_directions_of_each_weight():
    state = StateBytes.of("megatron", "nvfp4", Features(), B200)
    assert state.fp8_copies == pytest.approx(2 * NVFP4_BYTES) and state.gemm_weight == 2


def test_nvfp4_plans_and_its_flags_build_megatron_cores_config(tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["evaluate", _job(tmp_path, precision="nvfp4"), "--tp", "2", "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    fp8 = runner.invoke(app, ["evaluate", _job(tmp_path, precision="fp8"), "--tp", "2", "--json"])
    step = lambda r: json.loads(r.stdout)["plans"][0]["predicted"]["step_time_s"]  # noqa: E731
    assert step(result) < step(fp8)  # the GEMMs run at twice fp8's peak; the rest does not
    script = (out / "train.sh").read_text()
    assert "--fp4-format e2m1" in script and "--fp4-recipe nvfp4" in script and "--fp8-format" not in script
    import torch
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, fp4="e2m1", fp4_recipe="nvfp4", bf16=True,
                               params_dtype=torch.bfloat16)
    assert (config.fp4, config.fp4_recipe, config.fp8) == ("e2m1", "nvfp4", None)


@pytest.mark.parametrize("fields, gpu, expected", [
    ({"precision": "nvfp4"}, "H100", "a precision H100-SXM5-80GB supports"),
    ({"precision": "nvfp4", "framework": "torchtitan"}, "B200", "bf16 or fp8 with torchtitan"),
    ({"precision": "nvfp4", "framework": "deepspeed"}, "B200", "bf16, fp16, tf32 or fp32 with deepspeed"),
    ({"precision": "nvfp4"}, "MI355X", "a precision MI355X-288GB supports"),  # NVFP4 is NVIDIA Blackwell's
    ({"precision": "nvfp4", "stack": "megatron-bridge"}, "B200", "features.tp_comm_overlap"),
    ({"precision": "mxfp8", "features": {"fp8_recipe": "delayed"}}, "B200", "mxfp8 (or unset) with precision mxfp8"),
    ({"precision": "mxfp8"}, "H100", "field 'precision': expected a precision H100-SXM5-80GB runs (MXFP8 needs Blackwell"),
    ({"precision": "mxfp8", "framework": "deepspeed"}, "B200", "field 'precision': expected bf16, fp16, tf32 or fp32 with DeepSpeed"),
])
def test_what_cannot_run_low_precision_is_bad_input(tmp_path, fields, gpu, expected):
    result = runner.invoke(app, ["evaluate", _job(tmp_path, gpu=gpu, **fields)])
    assert result.exit_code == 2 and expected in result.output, result.output


def test_precision_mxfp8_is_fp8_with_mxfp8_scaling(tmp_path):
    job = load_job(Path(_job(tmp_path, precision="mxfp8")))
    assert (job.precision, job.features.fp8_recipe) == ("fp8", "mxfp8")
    out = tmp_path / "out"
    assert runner.invoke(app, ["evaluate", _job(tmp_path, precision="mxfp8"), "--tp", "1", "--out", str(out)]).exit_code == 0
    assert "--fp8-recipe mxfp8" in (out / "train.sh").read_text()
