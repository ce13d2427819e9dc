"""fp32 and tf32 training: fp32 weights, gradients and activations, Adam
without a master copy (but DeepSpeed ZeRO-1/2's clone), GEMMs at the TF32
or FP32 peak, attention unfused (no flash kernel takes fp32), and launch
files that run it; with the public reports of such runs."""

from __future__ import annotations

import json

import pytest
from conftest import make_job
from torchtitan.config import ConfigManager
from typer.testing import CliRunner

from loom.cli.app import app
from loom.planner.cost.activations import decoder_layer
from loom.planner.cost.shape import Shape
from loom.planner.cost.efficiency import gemm_time_s
from loom.planner.cost.memory import GiB, StateBytes
from loom.planner.plan import evaluate
from loom.planner.specs.cluster import parse_cluster
from loom.planner.specs.job import Features, Job
from loom.planner.specs.layout import Layout
from loom.planner.specs.model import ModelSpec, load_model
from loom.profiles.catalogue import find_gpu

H100 = find_gpu("H100")
FP32 = Features(flash_attention=False)


def one_gpu(gpu: str = "H100") -> object:
    return parse_cluster({"nodes": 1, "gpus_per_node": 1, "gpu": gpu, "nvlink_GBps": 450, "nics_per_node": 1, "nic_Gbps": 400}, "one")


@pytest.mark.parametrize("framework, zero_stage, optimizer", [("megatron", 0, 8), ("torchtitan", 0, 8), ("deepspeed", 0, 8),
                                                              ("deepspeed", 1, 12), ("deepspeed", 2, 12), ("deepspeed", 3, 8)])
def test_fp32_state_has_no_master_copy_but_deepspeeds_zero_1_and_2(framework, zero_stage, optimizer):
    state = StateBytes.of(framework, "tf32", FP32, H100, zero_stage=zero_stage)
    assert (state.weight, state.gemm_weight, state.grad, state.gemm_gather, state.fp8_copies) == (4, 4, 4, 4, 0)
    assert state.optimizer == optimizer


def test_qwen25_half_b_in_fp32_holds_what_nemo_rl_measured():
    """NVIDIA-NeMo/RL#2865: Qwen2.5-0.5B loaded in fp32 under plain AdamW on
    one GPU: parameters 1.840 GiB, optimizer state 3.681 GiB (config.json:
    hidden 896, 24 layers, 14 heads / 2 KV heads, FFN 4864, vocab 151936,
    tied embeddings, Q/K/V biases)."""
    model = ModelSpec(name="qwen2.5-0.5b", num_layers=24, hidden_size=896, num_attention_heads=14, num_query_groups=2,
                      ffn_hidden_size=4864, vocab_size=151936, max_position_embeddings=32768, gated_mlp=True, tied_embeddings=True,
                      learned_position_embeddings=False, linear_bias=False, qkv_bias=True, normalization="RMSNorm", dropout=0.0)
    job = Job(model=model, cluster=one_gpu(), global_batch_size=4, seq_length=512, precision="fp32", framework="deepspeed", features=FP32)
    memory = evaluate(job, Layout(tp=1, pp=1, dp=1, cp=1, micro_batch_size=1, global_batch_size=4)).memory[0].breakdown_bytes
    assert memory["weights"] / GiB == pytest.approx(1.840, rel=0.01)
    assert memory["optimizer_states"] / GiB == pytest.approx(3.681, rel=0.01)


def test_llama2_7b_in_fp32_on_one_a100_does_not_fit():
    """meta-llama/llama-cookbook#413: full fine-tuning of Llama-2 7B in fp32
    on one A100-80GB ran out of memory (batch 4 of 4096 tokens, no
    checkpointing): 16 bytes a parameter are 100 GiB before activations, so
    not even one sequence with every layer recomputed fits."""
    job = Job(model=load_model("llama-2-7b"), cluster=one_gpu("A100-80GB"), global_batch_size=4, seq_length=4096, precision="fp32",
              framework="deepspeed", features=FP32)
    for mbs, recompute in [(4, "none"), (1, "full")]:
        plan = evaluate(job, Layout(tp=1, pp=1, dp=1, cp=1, micro_batch_size=mbs, global_batch_size=4, recompute=recompute))
        assert not plan.fits
    state = sum(plan.memory[0].breakdown_bytes[part] for part in ("weights", "gradients", "optimizer_states"))
    assert state / GiB > 95


def test_gemms_run_at_the_tf32_and_fp32_peaks():
    bf16, tf32, fp32 = (gemm_time_s(8192, 8192, 8192, H100, precision) for precision in ("bf16", "tf32", "fp32"))
    assert tf32 / bf16 == pytest.approx(989 / 494.7, rel=0.01)
    assert fp32 / tf32 == pytest.approx((494.7 * 0.73) / (66.9 * 0.9), rel=0.01)


def test_fp32_activations_are_twice_bf16s_and_time_follows_the_peak():
    layout = Layout(tp=2, pp=1, dp=4, cp=1, micro_batch_size=1, global_batch_size=8, sequence_parallel=True)
    model = load_model("llama-3-8b")
    for recompute in ("none", "full"):
        bf16, tf32 = (decoder_layer(Shape.of(model, layout, 2048, precision, FP32), recompute) for precision in ("bf16", "tf32"))
        assert tf32 == pytest.approx(2 * bf16)
    bf16 = evaluate(make_job(nodes=1, gbs=8, seq=2048, features=FP32), layout)
    tf32 = evaluate(make_job(nodes=1, gbs=8, seq=2048, precision="tf32", features=FP32), layout)
    assert 1.6 < tf32.step.breakdown_s["compute_forward"] / bf16.step.breakdown_s["compute_forward"] < 2.1


def _job_file(tmp_path, **fields) -> str:
    (tmp_path / "cluster.yaml").write_text(json.dumps({"nodes": 1, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450,
                                                       "nics_per_node": 8, "nic_Gbps": 400}))
    (tmp_path / "job.yaml").write_text(json.dumps({"model": "llama-3-8b", "cluster": "cluster.yaml", "global_batch_size": 16,
                                                   "seq_length": 2048, **fields}))
    return str(tmp_path / "job.yaml")


@pytest.mark.parametrize("fields, field", [
    ({"precision": "fp32"}, "precision"),  # Megatron: Transformer Engine runs fp32 GEMMs as TF32
    ({"precision": "tf32", "features": {"flash_attention": True}}, "features.flash_attention"),
    ({"precision": "tf32", "features": {"optimizer_states": "bf16"}}, "features.optimizer_states"),
])
def test_what_fp32_training_cannot_be_is_bad_input(tmp_path, fields, field):
    result = CliRunner().invoke(app, ["evaluate", _job_file(tmp_path, **fields)])
    assert result.exit_code == 2 and field in result.output, result.output


@pytest.mark.parametrize("framework, precision", [("torchtitan", "tf32"), ("torchtitan", "fp32"), ("deepspeed", "tf32")])
def test_launch_files_train_in_fp32(tmp_path, framework, precision):
    out = tmp_path / "out"
    zero = ["--zero-stage", "3"] if framework == "deepspeed" else []
    result = CliRunner().invoke(app, ["evaluate", _job_file(tmp_path, framework=framework, precision=precision), "--tp", "1",
                                      "--recompute", "full", *zero, "--out", str(out)])
    assert result.exit_code == 0, result.output
    if framework == "torchtitan":
        config = ConfigManager().parse_args(["--job.config_file", str(out / "job.toml")])
        assert config.training.mixed_precision_param == "float32"
        assert ("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1" in (out / "train.sh").read_text()) == (precision == "tf32")
    else:
        config = json.loads((out / "ds_config.json").read_text())
        assert "bf16" not in config and "fp16" not in config
        assert "allow_tf32" in (out / "launch.sh").read_text()


def test_mfu_never_exceeds_the_gemm_ceiling_in_fp32():
    """Attention included: fp32 runs its unfused attention's GEMMs at the
    FP32 peak too, so MFU stays below the catalogue's FP32 GEMM efficiency."""
    layout = Layout(tp=1, pp=1, dp=8, cp=1, micro_batch_size=1, global_batch_size=8, recompute="full")
    plan = evaluate(make_job(nodes=1, gbs=8, seq=4096, precision="fp32", framework="deepspeed", features=FP32), layout)
    assert plan.mfu < H100.gemm_efficiency["fp32"]


def test_torchtitans_moe_cannot_train_in_fp32(tmp_path):
    result = CliRunner().invoke(app, ["evaluate", _job_file(tmp_path, model="qwen3-30b-a3b", framework="torchtitan", precision="tf32"),
                                      "--ep", "8"])
    assert result.exit_code == 2 and "grouped expert GEMMs" in result.output.replace("\n", "")
