"""One optimiser schedule for every framework's launch files
(planner/output/optimizer.py), read back by each framework's own parser."""

from __future__ import annotations

import json

import pytest
from conftest import make_job
from deepspeed.runtime import config as ds_config_module
from deepspeed.runtime.config import DeepSpeedConfig
from torchtitan.config import ConfigManager

from loom.planner.output import optimizer
from loom.planner.output.launch import launch_files
from loom.planner.output.megatron import megatron_args
from loom.planner.specs.layout import Layout
from loom.planner.specs.model import load_model
from loom.planner.specs.stages import default_placement, default_stages
from test_emit_deepspeed import DataParallelMpu
from test_emit_megatron import parse_flags


@pytest.mark.parametrize("name, lr", [("gpt3-175b", 0.6e-4), ("llama-3-8b", 1.2e-4), ("llama-3-70b", 0.6e-4), ("llama-3-405b", 0.6e-4),
                                      ("qwen3-30b-a3b", 1.6e-4), ("deepseek-v3", 1.0e-4), ("mixtral-8x7b", 1.0e-4)])
def test_the_peak_learning_rate_is_gpt3s_for_the_activated_size(name, lr):
    """GPT-3's Table 2.1, the row nearest the parameters a token activates on
    a log scale: GPT-3 175B (174.6B counted) its own 6e-5, 405B the same,
    not torchtitan's 8e-4 default."""
    assert optimizer.peak_lr(load_model(name)) == lr


def test_a_one_step_run_warms_up_for_no_steps():
    """megatron-core's scheduler needs fewer warm-up steps than decay steps."""
    import torch
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    for steps in (1, 2, 1000):
        schedule = optimizer.schedule_of(load_model("llama-3-8b"), steps)
        sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=schedule.peak_lr)
        OptimizerParamScheduler(sgd, init_lr=0.0, max_lr=schedule.peak_lr, min_lr=schedule.min_lr, lr_warmup_steps=schedule.warmup_steps,
                                lr_decay_steps=steps, lr_decay_style="cosine", start_wd=0.1, end_wd=0.1, wd_incr_steps=steps,
                                wd_incr_style="constant")
        assert schedule.warmup_steps == min(max(1, round(steps / 100)), steps - 1)


def _files(framework: str, layout: Layout, steps: int = 5000) -> dict[str, str]:
    job = make_job("llama-3-70b", nodes=4, gbs=64, seq=4096, framework=framework, train_iters=steps)
    return launch_files(job, layout, default_stages(job.model, layout, framework), default_placement(job.cluster, layout.world_size))


def test_every_framework_gets_the_same_schedule(tmp_path, monkeypatch):
    schedule = optimizer.schedule_of(load_model("llama-3-70b"), 5000)
    assert (schedule.peak_lr, schedule.min_lr, schedule.warmup_steps) == (6e-5, 6e-6, 50)

    job = make_job("llama-3-70b", nodes=4, gbs=64, seq=4096, train_iters=5000)
    layout = Layout(tp=8, pp=4, dp=1, cp=1, micro_batch_size=1, global_batch_size=64)
    flags = parse_flags(megatron_args(job, layout, default_stages(job.model, layout, "megatron")))
    assert (float(flags["lr"]), float(flags["min-lr"]), int(flags["lr-warmup-iters"]), flags["lr-decay-style"]) == (6e-5, 6e-6, 50, "cosine")

    monkeypatch.setattr(ds_config_module.dist, "get_rank", lambda: 0)
    layout = Layout(tp=1, pp=1, dp=32, cp=1, micro_batch_size=1, global_batch_size=64, zero_stage=3, fsdp=32, distributed_optimizer=False)
    ds = DeepSpeedConfig(json.loads(_files("deepspeed", layout)["ds_config.json"]), mpu=DataParallelMpu(32))
    assert ds.optimizer_params["lr"] == 6e-5 and ds.scheduler_name == "WarmupCosineLR"
    assert (ds.scheduler_params["warmup_num_steps"], ds.scheduler_params["total_num_steps"], ds.scheduler_params["cos_min_ratio"]) == (50, 5000, 0.1)

    layout = Layout(tp=8, pp=1, dp=4, cp=1, micro_batch_size=1, global_batch_size=64, sequence_parallel=True, fsdp=4)
    (tmp_path / "job.toml").write_text(_files("torchtitan", layout)["job.toml"])
    titan = ConfigManager().parse_args(["--job.config_file", str(tmp_path / "job.toml")])
    assert (titan.optimizer.lr, titan.lr_scheduler.warmup_steps, titan.lr_scheduler.decay_type, titan.lr_scheduler.min_lr_factor) \
        == (6e-5, 50, "cosine", 0.1)
    assert (titan.optimizer.weight_decay, titan.training.max_norm) == (0.1, 1.0)
