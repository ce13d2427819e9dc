"""Dev check: Megatron-LM's own ``parse_args`` and ``validate_args`` on the
arguments loom's ``train.sh`` passes, for the stacks, fp8 recipes and
recomputation loom emits.

    python benchmarks/megatron_lm_args.py --megatron-lm DIR

``DIR`` holds Megatron-LM's ``megatron/training``, ``megatron/legacy``,
``megatron/rl`` and ``megatron/post_training`` at the tag matching the
installed megatron-core (core_v0.16.1), e.g. extracted from a clone with
``git archive core_v0.16.1 megatron/training megatron/legacy megatron/rl
megatron/post_training | tar x``. Its imports need ``six``, ``regex`` and
``pyyaml``. Not a test: CI has no Megatron-LM checkout. The check runs no
kernels, so it answers the GPU's compute capability itself and mocks the
one triton kernel module Megatron-LM imports at start-up.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import MagicMock

import torch

from loom.planner.output.megatron import megatron_args
from loom.planner.specs.cluster import parse_cluster
from loom.planner.search.layouts import search
from loom.planner.specs.job import Features, Job, stack_features
from loom.planner.specs.layout import Layout
from loom.planner.specs.model import load_model
from loom.planner.specs.stages import uniform_stages


def _cluster(nodes: int, gpu: str = "H100"):
    return parse_cluster({"nodes": nodes, "gpus_per_node": 8, "gpu": gpu, "nvlink_GBps": 900, "nics_per_node": 8, "nic_Gbps": 400}, "dev")


TE_VERSION = "2.11.0"
FAMILIES = Path(__file__).resolve().parents[1] / "tests" / "data" / "decoder_families"


def cases() -> list[tuple[str, Job, Layout]]:
    bridge = stack_features("megatron-bridge", Features())
    sp = dict(sequence_parallel=True, distributed_optimizer=True)
    return [
        ("llama-3-8b, megatron-bridge stack, fp8 current scaling", Job(model=load_model("llama-3-8b"), cluster=_cluster(2), global_batch_size=64,
         seq_length=8192, precision="fp8", features=bridge), Layout(tp=2, pp=2, dp=4, cp=1, micro_batch_size=1, global_batch_size=64, **sp)),
        ("llama-3-8b, MXFP8 on B200", Job(model=load_model("llama-3-8b"), cluster=_cluster(1, "B200"), global_batch_size=64, seq_length=8192,
         precision="fp8", features=stack_features("megatron-bridge", Features(fp8_recipe="mxfp8"))),
         Layout(tp=1, pp=1, dp=8, cp=1, micro_batch_size=1, global_batch_size=64, distributed_optimizer=True)),
        ("llama-3-8b, NVFP4 on B200", Job(model=load_model("llama-3-8b"), cluster=_cluster(1, "B200"), global_batch_size=64, seq_length=8192,
                                         precision="nvfp4"),
         Layout(tp=1, pp=1, dp=8, cp=1, micro_batch_size=1, global_batch_size=64, sequence_parallel=False, distributed_optimizer=True)),
        ("llama-3-70b, block recompute of 2 layers per chunk", Job(model=load_model("llama-3-70b"), cluster=_cluster(4), global_batch_size=64,
         seq_length=8192), Layout(tp=4, pp=4, dp=2, cp=1, vpp=2, micro_batch_size=1, global_batch_size=64, recompute="full", recompute_num_layers=2, **sp)),
        ("llama-3-8b, fp16, recompute modules core_attn mlp", Job(model=load_model("llama-3-8b"), cluster=_cluster(1), global_batch_size=64,
         seq_length=8192, precision="fp16"), Layout(tp=2, pp=2, dp=2, cp=1, micro_batch_size=1, global_batch_size=64, recompute="selective",
                                                   recompute_modules=("core_attn", "mlp"), **sp)),
        ("deepseek-v3, Megatron-Bridge's recompute modules", Job(model=load_model("deepseek-v3"), cluster=_cluster(32), global_batch_size=512,
         seq_length=4096, precision="fp8", features=bridge), Layout(tp=2, pp=8, dp=16, cp=1, ep=8, micro_batch_size=1, global_batch_size=512,
                                                                     recompute="selective", recompute_modules=("mlp", "mla_up_proj"), **sp)),
        ("qwen3-235b, recompute modules moe_act layernorm", Job(model=load_model("qwen3-235b-a22b"), cluster=_cluster(8), global_batch_size=256,
         seq_length=4096, precision="fp8", features=bridge), Layout(tp=2, pp=4, dp=8, cp=1, ep=8, micro_batch_size=1, global_batch_size=256,
                                                                      recompute="selective", recompute_modules=("moe_act", "layernorm"), **sp)),
        ("qwen3-235b, DeepEP with the all-to-all overlapped", Job(model=load_model("qwen3-235b-a22b"), cluster=_cluster(8), global_batch_size=256,
         seq_length=4096, features=stack_features("megatron-bridge", Features(moe_token_dispatcher="deepep", overlap_moe_expert_parallel_comm=True))),
         Layout(tp=2, pp=4, vpp=2, dp=8, cp=1, ep=8, micro_batch_size=1, global_batch_size=256, **sp)),
        ("qwen3-235b, HybridEP", Job(model=load_model("qwen3-235b-a22b"), cluster=_cluster(8), global_batch_size=256, seq_length=4096,
         features=Features(moe_token_dispatcher="hybridep")), Layout(tp=1, pp=4, dp=16, cp=1, ep=8, micro_batch_size=1, global_batch_size=256,
                                                                     distributed_optimizer=True)),
        ("mixtral-8x7b, token drop padded to capacity", Job(model=load_model("mixtral-8x7b"), cluster=_cluster(2), global_batch_size=128,
         seq_length=4096, features=Features(moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True, moe_router_fusion=True)),
         Layout(tp=1, pp=1, dp=16, cp=1, ep=8, micro_batch_size=1, global_batch_size=128, distributed_optimizer=True)),
        ("qwen1.5-moe-a2.7b, gated shared expert, softmax before top-k", Job(model=load_model(str(FAMILIES / "qwen1.5-moe-a2.7b.json")),
         cluster=_cluster(1), global_batch_size=64, seq_length=4096), Layout(tp=1, pp=1, dp=8, cp=1, ep=4, micro_batch_size=1,
                                                                             global_batch_size=64, distributed_optimizer=True)),
        ("nemotron-4-15b, squared ReLU, LayerNorm 1p, partial RoPE", Job(model=load_model(str(FAMILIES / "nemotron-4-15b.json")),
                                                                           cluster=_cluster(2), global_batch_size=64, seq_length=4096),
         Layout(tp=4, pp=1, dp=4, cp=1, micro_batch_size=1, global_batch_size=64, sequence_parallel=True, distributed_optimizer=True)),
        ("phi-3-mini, sliding window on every layer", Job(model=load_model(str(FAMILIES / "phi-3-mini-4k-instruct.json")), cluster=_cluster(1),
         global_batch_size=64, seq_length=4096), Layout(tp=2, pp=1, dp=4, cp=1, micro_batch_size=1, global_batch_size=64, **sp)),
        ("deepseek-v3, shared experts beside the all-to-all", Job(model=load_model("deepseek-v3"), cluster=_cluster(32), global_batch_size=512,
         seq_length=4096, features=Features(moe_shared_expert_overlap=True)), Layout(tp=2, pp=8, dp=16, cp=1, ep=8, micro_batch_size=1,
                                                                                     global_batch_size=512, recompute="full", **sp)),
        ("llama-3-8b, Megatron-FSDP (NVIDIA's 25.09 H100 row)", Job(model=load_model("llama-3-8b"), cluster=_cluster(1), global_batch_size=128,
         seq_length=8192, precision="fp8", features=bridge), Layout(tp=1, pp=1, dp=8, cp=1, micro_batch_size=1, global_batch_size=128,
                                                                   distributed_optimizer=True, fsdp=8)),
        ("llama-3-70b, Megatron-FSDP with TP and a pipeline", Job(model=load_model("llama-3-70b"), cluster=_cluster(4), global_batch_size=64,
         seq_length=8192), Layout(tp=4, pp=2, dp=4, cp=1, micro_batch_size=1, global_batch_size=64, fsdp=4, **sp)),
        ("llama-3-70b, bf16 optimizer states", Job(model=load_model("llama-3-70b"), cluster=_cluster(4), global_batch_size=64,
         seq_length=8192, features=Features(optimizer_states="bf16")), Layout(tp=4, pp=2, dp=4, cp=1, micro_batch_size=1,
                                                                              global_batch_size=64, **sp)),
        ("llama-3-8b, tf32 (fp32 weights, unfused attention)", Job(model=load_model("llama-3-8b"), cluster=_cluster(1), global_batch_size=64,
         seq_length=2048, precision="tf32", features=Features(flash_attention=False)),
         Layout(tp=2, pp=1, dp=4, cp=1, micro_batch_size=1, global_batch_size=64, **sp)),
        ("llama-3-70b, optimizer offloaded to the host", Job(model=load_model("llama-3-70b"), cluster=_cluster(4), global_batch_size=64,
         seq_length=8192), Layout(tp=4, pp=2, dp=4, cp=1, micro_batch_size=1, global_batch_size=64, optimizer_offload=True, **sp)),
        ("nemotron-h-8b, hybrid Mamba with TP, CP and a pipeline, fp8", Job(model=load_model("nemotron-h-8b"), cluster=_cluster(2),
         global_batch_size=64, seq_length=8192, precision="fp8"),
         Layout(tp=2, pp=2, dp=2, cp=2, micro_batch_size=1, global_batch_size=64, **sp)),
        ("nemotron-3-nano, hybrid Mamba with MoE layers", Job(model=load_model("nemotron-3-nano-30b-a3b"), cluster=_cluster(2),
         global_batch_size=64, seq_length=8192), Layout(tp=1, pp=1, dp=16, cp=1, ep=8, micro_batch_size=1, global_batch_size=64,
                                                         distributed_optimizer=True)),
    ]


def planned() -> list[tuple[str, Job, Layout, list]]:
    """The plans loom makes (best layout and its stage split) for Mixtral 8x7B
    on 64 H100 and DeepSeek-V3 on 1,024 H100, as benchmarks/moe_runs.py does,
    and Nemotron-H 56B on 64 H100."""
    found = []
    for model, nodes, batch in [("mixtral-8x7b", 8, 256), ("deepseek-v3", 128, 4096), ("nemotron-h-56b", 8, 192)]:
        job = Job(model=load_model(model), cluster=parse_cluster({"nodes": nodes, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450,
                                                                   "nics_per_node": 8, "nic_Gbps": 400}, "dev"),
                  global_batch_size=batch, seq_length=4096)
        plan = search(job, top_k=1).plans[0]
        found.append((f"{model}, loom plan's best on {nodes * 8} H100: {plan.layout.label()}", plan.job, plan.layout, list(plan.stages)))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megatron-lm", required=True, help="folder with Megatron-LM's megatron/training etc.")
    options = parser.parse_args()
    sys.path.insert(0, options.megatron_lm)  # megatron is a namespace package: megatron-core's part and Megatron-LM's
    sys.modules["megatron.core.transformer.custom_layers.batch_invariant_kernels"] = MagicMock()
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.tokenizer.tokenizer import build_tokenizer

    capability = {"major": 9}
    torch.cuda.get_device_properties = lambda *a, **k: SimpleNamespace(major=capability["major"], minor=0, name="GPU", total_memory=80 * 2**30,
                                                                      multi_processor_count=132)
    torch.cuda.get_device_capability = lambda *a, **k: (capability["major"], 0)
    # validate_args asks Transformer Engine's version for some features (not
    # installed here): the one megatron-core 0.16's dev extra pins (>=2.9,<2.12).
    import megatron.core.utils
    from packaging.version import Version

    megatron.core.utils.get_te_version = lambda: Version(TE_VERSION)
    failures = 0
    checked = [(name, job, layout, uniform_stages(job.model, layout)) for name, job, layout in cases()] + planned()
    for name, job, layout, stages in checked:
        capability["major"] = 10 if job.cluster.slowest.gpu.fp8_gemm_any_layout else 9
        argv = megatron_args(job, layout, stages)
        os.environ.update(WORLD_SIZE=str(layout.world_size), RANK="0", CUDA_DEVICE_MAX_CONNECTIONS="1")  # as train.sh exports it,
        if layout.fsdp:
            del os.environ["CUDA_DEVICE_MAX_CONNECTIONS"]  # or unsets it for Megatron-FSDP
        sys.argv = ["pretrain_gpt.py", *argv, "--mock-data"]
        try:
            args = validate_args(parse_args())
            vocab = build_tokenizer(args).vocab_size
            if vocab != job.model.vocab_size:
                raise ValueError(f"the tokenizer's vocabulary is {vocab}, the config's {job.model.vocab_size}")
            print(f"accepted  {name}")
        except (AssertionError, ValueError, SystemExit) as error:
            failures += 1
            print(f"REJECTED  {name}: {error}")
    print(f"{len(checked) - failures} of {len(checked)} accepted by Megatron-LM's parse_args and validate_args")


if __name__ == "__main__":
    main()
