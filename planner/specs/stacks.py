"""Training stacks: the feature defaults a framework release runs with, as
named presets a job picks with ``stack:`` (or ``--stack``). A job's own
``features:`` entries win over its stack's.

The same Megatron-Core runs with different defaults depending on who drives
it: Megatron-LM's ``pretrain_gpt.py`` arguments, or NVIDIA's performance
recipes (NeMo / Megatron-Bridge). They differ in what changes memory and
time most: the gradient buffer's dtype, fp8 weights and the fused loss.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stack:
    """Feature values (fields of ``job.Features``) and where each comes
    from, for the frameworks that run them."""

    name: str
    features: dict[str, object]
    source: str
    frameworks: tuple[str, ...]


STACKS = {
    stack.name: stack
    for stack in (
        Stack(
            name="megatron-lm",
            # Megatron-LM core_v0.16.1, megatron/training/arguments.py:
            # validate_args turns --accumulate-allreduce-grads-in-fp32 on for
            # bf16 unless --grad-reduce-in-bf16; --fp8-recipe defaults to
            # delayed; --fp8-param-gather, --tp-comm-overlap and
            # --cross-entropy-loss-fusion are off unless given.
            features=dict(grad_reduce_in_fp32=True, fp8_recipe="delayed", fp8_param_gather=False,
                          cross_entropy_fusion="none", tp_comm_overlap=False),
            source="Megatron-LM core_v0.16.1 megatron/training/arguments.py (argument defaults, validate_args)",
            # DeepSpeed trains Megatron-LM's model code (Megatron-DeepSpeed) with these defaults.
            frameworks=("megatron", "deepspeed"),
        ),
        Stack(
            name="megatron-bridge",
            # Megatron-Bridge v0.3.1 performance recipes
            # (scripts/performance/configs/*/*_llm_pretrain.py set
            # ddp.grad_reduce_in_fp32 = False; utils/precision.py picks
            # bf16_with_fp8_current_scaling_mixed: fp8_recipe "tensorwise",
            # fp8_param_gather True; utils/overrides.py sets
            # cross_entropy_fusion_impl "te"; the Llama recipes'
            # CommOverlapConfig(tp_comm_overlap=True)).
            # Its MoE providers turn on the fused router and permutation
            # (Qwen3 provider moe_permute_fusion=True; set_qwen3_common_configs
            # moe_router_fusion=True; scripts/performance, v0.3.0).
            features=dict(grad_reduce_in_fp32=False, fp8_recipe="tensorwise", fp8_param_gather=True,
                          cross_entropy_fusion="te", tp_comm_overlap=True, moe_router_fusion=True, moe_permute_fusion=True),
            source="Megatron-Bridge v0.3.1 scripts/performance (perf recipes: grad_reduce_in_fp32 False, "
                   "fp8 current scaling with fp8_param_gather, TE fused cross-entropy, TP comm overlap, fused MoE router and permutation)",
            frameworks=("megatron",),
        ),
        Stack(
            name="torchtitan",
            # torchtitan 0.2.2 torchtitan/config/job_config.py: FSDP2 reduces
            # gradients in fp32 (Training.mixed_precision_reduce, the only
            # choice); float8 through torchao with tensorwise scaling
            # (Float8Linear.recipe_name None), weights gathered in bf16
            # unless enable_fsdp_float8_all_gather; async TP off
            # (Parallelism.enable_async_tensor_parallel).
            # Its float8 leaves the MoE experts in bf16 (Features.quantized_experts).
            # Its loss is PyTorch's cross_entropy on fp32 logits
            # (components/loss.py) and SDPA tries cuDNN's attention first
            # (models/attention.py ScaledDotProductAttentionWrapper).
            features=dict(grad_reduce_in_fp32=True, fp8_recipe="tensorwise", fp8_param_gather=False,
                          cross_entropy_fusion="torch", tp_comm_overlap=False, attention_kernel="cudnn", quantized_experts=False),
            source="torchtitan 0.2.2 torchtitan/config/job_config.py (Training, Parallelism, Float8Linear defaults), "
                   "components/loss.py, models/attention.py",
            frameworks=("torchtitan",),
        ),
        Stack(
            name="torchtitan-2412",
            # torchtitan 9dec370 (2024-12-26) on torch of 2024-12-23, as its
            # published Llama 3.1 benchmark ran: the same defaults, with
            # SDPA's default priority then (flash, efficient, math, cuDNN:
            # cuDNN made opt-in by pytorch/pytorch#138522, discussed in
            # #138649 and #142132) running FlashAttention-2.
            # Its Llama repeats K and V to every query head before SDPA
            # (models/llama/model.py repeat_kv); its torch's pipeline stages
            # keep every micro batch's output (Features.pipeline_keeps_outputs);
            # its AdamW runs foreach kernels (optimizer.py: fused False).
            features=dict(grad_reduce_in_fp32=True, fp8_recipe="tensorwise", fp8_param_gather=False,
                          cross_entropy_fusion="torch", tp_comm_overlap=False, attention_kernel="flash2", repeat_kv=True,
                          pipeline_keeps_outputs=True, fused_optimizer=False, quantized_experts=False),
            source="torchtitan 9dec370 (December 2024) on PyTorch's SDPA default of then (pytorch/pytorch#138522, #142132), "
                   "models/llama/model.py, optimizer.py, torch 2.6 distributed/pipelining/stage.py",
            frameworks=("torchtitan",),
        ),
    )
}
DEFAULT_STACK = "megatron-lm"
# The stack a framework's job runs when it names none.
FRAMEWORK_STACK = {"megatron": "megatron-lm", "deepspeed": "megatron-lm", "torchtitan": "torchtitan"}
