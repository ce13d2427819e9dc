"""The rules a layout must satisfy to run a job: divisibility (heads by TP,
layers by the pipeline's chunks, the batch by micro batch x DP, the
sequence by CP), what expert parallelism needs, and what each framework can
run. ``loom evaluate`` reports the first broken rule as bad input; the search
skips layouts that break any.
"""

from __future__ import annotations

from loom.planner.specs import torchtitan
from loom.planner.specs.job import Job
from loom.planner.specs.layout import OP_SAC, RECOMPUTE_MODULES, Layout


def layout_problems(job: Job, layout: Layout) -> list[tuple[str, str, object]]:
    """Why ``layout`` cannot run ``job``: (field, expected, got) per problem."""
    model, problems = job.model, []

    def need(ok: bool, field: str, expected: str, got: object) -> None:
        if not ok:
            problems.append((field, expected, got))

    need(layout.world_size <= job.cluster.num_gpus, "tp*pp*dp*cp", f"at most the cluster's {job.cluster.num_gpus} GPUs", layout.world_size)
    if model.moe is None:
        need(layout.ep == 1, "ep", "1 (expert parallelism needs an MoE model)", layout.ep)
        need(layout.etp == 1, "etp", "1 (expert tensor parallelism needs an MoE model)", layout.etp)
    else:
        need(model.moe.num_experts % layout.ep == 0, "ep", f"a divisor of {model.moe.num_experts} experts", layout.ep)
        need(model.moe.expert_ffn_hidden_size % layout.etp == 0, "etp", f"a divisor of the expert width {model.moe.expert_ffn_hidden_size}", layout.etp)
        stage_ranks = layout.tp * layout.cp * layout.dp
        need(stage_ranks % (layout.ep * layout.etp) == 0, "ep", f"ep x etp dividing a stage's tp x cp x dp = {stage_ranks} ranks", layout.ep * layout.etp)
        need(layout.tp == 1 or layout.sequence_parallel, "sequence_parallel", "on with tp > 1 for MoE (Megatron requires it)", layout.sequence_parallel)
        problems += _moe_feature_problems(job, layout)
        need(layout.etp == 1 or not model.moe.bias, "etp", "1 for experts with biases (megatron-core: 'Bias in Moe is only supported when ETP==1')", layout.etp)
    need(model.num_attention_heads % layout.tp == 0, "tp", f"a divisor of {model.num_attention_heads} attention heads", layout.tp)
    need(model.num_query_groups % layout.tp == 0, "tp", f"a divisor of {model.num_query_groups} key/value heads", layout.tp)
    _tp_width_problems(model, layout.tp, need)
    chunks = layout.pp * layout.vpp
    # Uneven splits: Megatron's --pipeline-model-parallel-layout, torchtitan's
    # module_fqns_per_model_part, DeepSpeed's count-balanced partition (stages.default_stages).
    need(chunks <= model.num_layers, "pp*vpp", f"at most {model.num_layers} layers (one per model chunk)", chunks)
    per_step = layout.micro_batch_size * layout.dp
    need(layout.global_batch_size % per_step == 0, "global_batch_size", f"a multiple of micro batch x dp = {per_step}", layout.global_batch_size)
    # Context parallelism cuts the sequence into 2*cp chunks (two per rank,
    # for load balance: megatron validate_args); sequence parallelism splits
    # each rank's seq/cp tokens over TP (megatron-core scatter_to_sequence_parallel_region).
    if layout.cp > 1:
        need(job.seq_length % (2 * layout.cp) == 0, "cp", f"2*cp dividing the sequence length {job.seq_length}", layout.cp)
    if layout.sequence_parallel and layout.tp > 1:
        need(job.seq_length % (layout.tp * layout.cp) == 0, "tp", f"tp x cp dividing the sequence length {job.seq_length} "
             "(sequence parallelism splits each rank's tokens over TP)", layout.tp)
    need(not layout.sequence_parallel or layout.tp > 1, "sequence_parallel", "only with tp > 1", layout.sequence_parallel)
    need(layout.vpp == 1 or layout.pp > 1, "vpp", "1 unless pp > 1", layout.vpp)
    need(layout.cp == 1 or job.features.flash_attention, "cp", "1 without flash attention (Megatron's and PyTorch's ring attention run "
         "flash kernels only)", layout.cp)
    # Transformer Engine runs attention sinks under CP only with a2a
    # communication and sliding windows only with a2a or all-gather (TE 2.9
    # get_attention_backend, attn_forward_func_with_cp), not the ring loom prices.
    need(layout.cp == 1 or not (model.window_binds(job.seq_length) or model.attention_sinks), "cp",
         f"1 for {model.name} (Transformer Engine runs its sliding window and attention sinks under CP only with a2a, which loom does not price)", layout.cp)
    if layout.vpp > 1 and layout.global_batch_size % per_step == 0:
        need(layout.num_microbatches % layout.pp == 0, "vpp", f"interleaving needs micro batches ({layout.num_microbatches}) divisible by pp", layout.vpp)
    _recompute_problems(job, layout, need)
    if model.mamba is not None:
        _hybrid_problems(job, layout, need)
    need(layout.fsdp == 0 or layout.dp % layout.fsdp == 0, "fsdp", f"0 (off) or a divisor of dp = {layout.dp}", layout.fsdp)
    _offload_problems(job, layout, need)
    if job.framework == "megatron" and job.features.optimizer_states == "bf16":
        # --use-precision-aware-optimizer: "only supported with distributed
        # optimizer" (megatron-core optimizer_config.py __post_init__).
        need(not layout.fsdp, "fsdp", "0 for bf16 optimizer states (Megatron's precision-aware optimizer runs without Megatron-FSDP)",
             layout.fsdp)
        need(layout.distributed_optimizer or layout.fsdp, "distributed_optimizer", "on for bf16 optimizer states (Megatron's "
             "precision-aware optimizer)", layout.distributed_optimizer)
    if job.framework == "torchtitan":
        _torchtitan_problems(job, layout, need)
        return problems
    need(layout.reshard_after_forward, "reshard_after_forward", f"true with {job.framework} (it frees each layer's gathered weights after forward)",
         layout.reshard_after_forward)
    if job.framework == "megatron":
        need(layout.zero_stage == 0, "zero_stage", "0 with Megatron (use distributed_optimizer, or fsdp for Megatron-FSDP)", layout.zero_stage)
        # Megatron-FSDP: --use-megatron-fsdp --data-parallel-sharding-strategy
        # optim_grads_params requires --use-distributed-optimizer (its user
        # guide); its HSDP (--num-distributed-optimizer-instances) loom does not write.
        need(layout.fsdp in (0, layout.dp), "fsdp", f"0 or dp = {layout.dp} with Megatron-FSDP (loom does not write its HSDP flags)", layout.fsdp)
        need(not layout.fsdp or layout.distributed_optimizer, "distributed_optimizer", "on with Megatron-FSDP (it requires --use-distributed-optimizer)",
             layout.distributed_optimizer)
    else:
        # DeepSpeed 0.19 removed MiCS (runtime/config.py _REMOVED_ZERO_CONFIG_KEYS):
        # ZeRO-3 shards over the whole data-parallel group.
        need(layout.fsdp == (layout.dp if layout.zero_stage == 3 else 0), "fsdp",
             f"dp = {layout.dp} with DeepSpeed's ZeRO-3 (it shards weights over all of DP only)" if layout.zero_stage == 3 else
             f"0 with ZeRO-{layout.zero_stage} (fsdp is ZeRO-3's weight sharding: set zero_stage 3 for it)", layout.fsdp)
        need(layout.tp == 1, "tp", "1 with DeepSpeed (ZeRO data parallel + optional pipeline)", layout.tp)
        need(layout.etp == 1, "etp", "1 with DeepSpeed (its MoE layers have no expert tensor parallelism)", layout.etp)
        need(layout.cp == 1, "cp", "1 with DeepSpeed (ZeRO data parallel + optional pipeline)", layout.cp)
        need(not layout.distributed_optimizer, "distributed_optimizer", "false with DeepSpeed (use zero_stage)", True)
        need(layout.recompute != "selective", "recompute", "none or full with DeepSpeed", layout.recompute)
        need(layout.recompute_num_layers == 0, "recompute_num_layers", "0 with DeepSpeed (it checkpoints every layer)", layout.recompute_num_layers)
        need(layout.pp == 1 or layout.zero_stage <= 1, "zero_stage", "0 or 1 with a DeepSpeed pipeline", layout.zero_stage)
        need(layout.vpp == 1, "vpp", "1 with DeepSpeed (PipelineModule has no interleaved schedule)", layout.vpp)
        need(model.moe is None or layout.zero_stage <= 2, "zero_stage", "at most 2 for DeepSpeed MoE (ZeRO-3 does not shard experts)", layout.zero_stage)
    return problems


def default_recompute_modules(job: Job, recompute: str) -> tuple[str, ...]:
    """The modules a selective layout names when the user names none:
    torchtitan's per-op checkpointing (its one selective policy loom prices);
    () elsewhere (Megatron's default, core_attn, is implied)."""
    return (OP_SAC,) if job.framework == "torchtitan" and recompute == "selective" else ()


def default_distributed_optimizer(job: Job, data_parallel: int, fsdp: int, offload: bool) -> bool:
    """Whether ``loom evaluate`` turns Megatron's distributed optimizer on
    when not told: over more than one data-parallel rank, and wherever
    Megatron-FSDP, offload or bf16 optimizer states need it."""
    if job.framework != "megatron":
        return False
    return data_parallel > 1 or fsdp > 0 or offload or job.features.optimizer_states == "bf16"


def _offload_problems(job: Job, layout: Layout, need) -> None:
    """Where each framework offloads the optimizer: Megatron's
    HybridDeviceOptimizer wraps the distributed optimizer through the
    precision-aware path (validate_args: --use-precision-aware-optimizer, and
    fp8 parameter gathers only with delayed scaling; optimizer_config.py:
    distributed optimizer only), not Megatron-FSDP's; DeepSpeed's
    offload_optimizer needs a ZeRO stage; torchtitan's CPUOffloadPolicy is
    FSDP2's."""
    if not layout.optimizer_offload:
        return
    if job.framework == "megatron":
        need(layout.distributed_optimizer and not layout.fsdp, "optimizer_offload",
             "with the distributed optimizer and without Megatron-FSDP (Megatron's HybridDeviceOptimizer)", True)
        fp8_gather = job.precision == "fp8" and job.features.fp8_param_gather
        need(not fp8_gather or job.features.fp8_recipe == "delayed", "optimizer_offload",
             "fp8 parameter gathers only with delayed scaling (Megatron-LM validate_args)", True)
    elif job.framework == "deepspeed":
        need(layout.zero_stage >= 1, "optimizer_offload", "a ZeRO stage of 1 or more (DeepSpeed's offload_optimizer)", True)
    else:
        need(layout.param_shards > 1, "optimizer_offload", "FSDP over 2 or more ranks (torchtitan's CPUOffloadPolicy is FSDP2's)", True)


def _torchtitan_problems(job: Job, layout: Layout, need) -> None:
    """What torchtitan 0.2.2 runs (torchtitan/distributed/parallel_dims.py,
    models/llama3/infra/parallelize.py): FSDP2 over dp_shard x CP composed
    with TP, PP, CP and EP, or 1-D DDP ("DDP has not supported > 1D
    parallelism"); TP always shards the norms' sequence; full activation
    checkpointing per block (its selective modes, per op or every N-th
    block, are not Megatron's modules); EP borrowing ranks from FSDP and TP."""
    model = job.model
    need(layout.zero_stage == 0, "zero_stage", "0 with torchtitan (use fsdp)", layout.zero_stage)
    need(not layout.distributed_optimizer, "distributed_optimizer", "false with torchtitan (use fsdp)", layout.distributed_optimizer)
    # FSDP applies when its mesh (dp_shard x cp) has more than one rank, over
    # CP ranks too; otherwise DDP across the replicas, which is 1-D only.
    need(layout.cp == 1 or layout.fsdp > 0, "fsdp", "at least 1 with CP (torchtitan shards the weights over CP ranks)", layout.fsdp)
    need(layout.param_shards > 1 or layout.dp == 1 or layout.tp * layout.pp * layout.ep == 1, "fsdp",
         "fsdp x cp of at least 2 with TP, PP or EP (torchtitan otherwise runs DDP, which is 1-D only)", layout.fsdp)
    need(layout.fsdp != 1 or layout.cp > 1 or layout.dp == 1, "fsdp", "0 rather than 1 (one shard per replica is torchtitan's DDP)", layout.fsdp)
    # Without FSDP (dp_shard x cp of 1) torchtitan autocasts only a 1-D job:
    # with TP or PP it trains in float32 (distributed/utils.py maybe_enable_amp).
    shardable = layout.dp * layout.cp > 1  # then fsdp is what leaves one shard
    need(layout.param_shards > 1 or layout.tp * layout.pp == 1, "fsdp" if shardable else "dp",
         f"{'fsdp' if shardable else 'dp'} x cp of at least 2 with TP or PP (torchtitan runs no mixed precision without FSDP when TP or "
         "PP is on)", layout.fsdp if shardable else layout.dp)
    # Every parallelize_fn asserts seq_len % (tp x 2cp) == 0 (ParallelDims.seq_len_divisor).
    need(job.seq_length % (layout.tp * 2 * layout.cp) == 0, "seq_length", f"a multiple of tp x 2 x cp = {layout.tp * 2 * layout.cp} with "
         "torchtitan", job.seq_length)
    # torch.distributed.pipelining's Schedule1F1B needs a micro batch per stage
    # at least (torch 2.13 schedules.py; interleaving's whole rounds follow from
    # the micro batches pp divides, checked for every framework).
    need(layout.pp == 1 or layout.vpp > 1 or layout.num_microbatches >= layout.pp, "global_batch_size", f"at least pp = {layout.pp} "
         f"micro batches per step for torchtitan's 1F1B (got {layout.num_microbatches})", layout.global_batch_size)
    # MXLinearConverter: "TP not yet supported with torch.compile for mxfp8" (loom's TOML compiles).
    need(layout.tp == 1 or not (job.precision == "fp8" and job.features.fp8_recipe == "mxfp8"), "tp", "1 with mxfp8 on torchtitan (its "
         "mx converter refuses TP under torch.compile)", layout.tp)
    # torch.distributed.pipelining keeps every FSDP stage's gradients unreduced
    # until the last micro batch whatever the forward policy (stage.py);
    # loom prices torchtitan's pipeline with its default, weights kept gathered.
    need(layout.pp == 1 or not layout.reshard_after_forward, "reshard_after_forward",
         "false with a torchtitan pipeline (its default; loom prices no other)", layout.reshard_after_forward)
    need(layout.sequence_parallel == (layout.tp > 1), "sequence_parallel", "on exactly when tp > 1 (torchtitan's TP shards the norms by sequence)",
         layout.sequence_parallel)
    need(layout.recompute in ("none", "full") or layout.selective_modules == (OP_SAC,), "recompute_modules",
         "op with selective recompute on torchtitan (its per-op checkpointing)", list(layout.selective_modules))
    need(not layout.recompute_num_layers, "recompute_num_layers", "0 with torchtitan (it checkpoints every block)", layout.recompute_num_layers)
    need(layout.etp == 1, "etp", "1 with torchtitan", layout.etp)
    flavor = torchtitan.flavor_of(model)
    need(layout.pp == 1 or flavor is None or flavor.pipeline, "pp", f"1 for torchtitan's {flavor and flavor.name} (it has no pipelining_fn)", layout.pp)
    if flavor is not None and flavor.name == "deepseek_v3":
        # Its flavors run FlexAttention; deepseek_v3/infra/parallelize.py raises
        # for CP ("Context Parallel only supports SDPA attention") and for TP
        # under float8 tensorwise ("not tested for deepseekv3").
        need(layout.cp == 1, "cp", "1 for torchtitan's deepseek_v3 (its FlexAttention has no context parallelism)", layout.cp)
        need(layout.tp == 1 or job.precision != "fp8", "tp", "1 under fp8 for torchtitan's deepseek_v3 (float8 TP is refused there)", layout.tp)
    if model.moe is not None:
        shard_ranks = max(1, layout.fsdp) * layout.cp * layout.tp
        need(shard_ranks % layout.ep == 0, "ep", f"a divisor of fsdp x cp x tp = {shard_ranks} (torchtitan's EP borrows FSDP and TP ranks)", layout.ep)


def _hybrid_problems(job: Job, layout: Layout, need) -> None:
    """What a hybrid Mamba model needs (megatron-core 0.16): TP splitting
    the Mamba heads and groups (ssm/mamba_mixer.py asserts both), CP
    splitting each TP rank's heads and its groups, or the groups its ranks
    (ssm/mamba_context_parallel.py), and under fp8 an in-projection width
    that is a multiple of 16. Megatron's MambaStack (ssm/mamba_block.py)
    has no interleaved pipeline (it asserts no virtual stages), splits its
    layers evenly or with first/last stage counts only, and no checkpointed
    forward, so no full recompute (loom plans its even split only);
    Megatron-FSDP does not shard its Mamba layers."""
    mamba, tp, cp = job.model.mamba, layout.tp, layout.cp
    need(mamba.num_heads % tp == 0 and mamba.num_groups % tp == 0, "tp",
         f"a divisor of the {mamba.num_heads} Mamba heads and {mamba.num_groups} groups", tp)
    if mamba.num_heads % tp == 0 and mamba.num_groups % tp == 0:
        heads, groups = mamba.num_heads // tp, mamba.num_groups // tp
        need(heads % cp == 0 and (groups % cp == 0 if groups >= cp else cp % groups == 0), "cp",
             f"a divisor of the {heads} Mamba heads per TP rank that divides or is a multiple of its {groups} groups", cp)
    need(job.precision not in ("fp8", "nvfp4") or mamba.in_proj_size % 16 == 0, "precision",
         f"bf16 for {job.model.name} (fp8 needs a Mamba in-projection width, {mamba.in_proj_size}, that is a multiple of 16)", job.precision)
    if job.framework == "megatron":
        # MambaMixer takes megatron-core's defaults (d_conv 4, chunk_size 128):
        # mamba_layer_specs passes neither.
        need((mamba.conv_kernel, mamba.chunk_size) == (4, 128), "model", f"a Mamba conv1d of 4 and SSD chunks of 128 with Megatron "
             f"(its Mamba mixer fixes both; {job.model.name} has {mamba.conv_kernel} and {mamba.chunk_size})", job.model.name)
        # Megatron-FSDP shards and frees TransformerLayer units only
        # (distributed/fsdp/mcore_fsdp_adapter.py fsdp_unit_modules): a
        # MambaLayer's weights would stay gathered, which loom does not price.
        need(layout.fsdp == 0, "fsdp", "0 for a hybrid Mamba model with Megatron (Megatron-FSDP's units are TransformerLayers; "
             "its Mamba layers would stay gathered)", layout.fsdp)
        need(layout.vpp == 1, "vpp", "1 for a hybrid Mamba model (Megatron's MambaStack has no interleaved schedule)", layout.vpp)
        need(job.model.num_layers % layout.pp == 0, "pp", f"a divisor of {job.model.num_layers} layers for a hybrid Mamba model "
             "(Megatron's MambaStack splits its layers evenly)", layout.pp)
        need(layout.recompute != "full", "recompute", "none or selective for a hybrid Mamba model (Megatron's MambaStack has no "
             "full-layer recompute)", layout.recompute)


def _recompute_problems(job: Job, layout: Layout, need) -> None:
    """What megatron-core's TransformerConfig.__post_init__ checks of
    recompute_modules and recompute_num_layers (0.16): known modules, each
    for a model that has what it recomputes, moe_act and layernorm not under
    delayed fp8 scaling; modules only with selective, a layer count only
    with full."""
    model, modules = job.model, layout.recompute_modules
    if modules:
        need(layout.recompute == "selective", "recompute_modules", "only with recompute selective", list(modules))
        known = (OP_SAC,) if job.framework == "torchtitan" else RECOMPUTE_MODULES
        unknown = [m for m in modules if m not in known]
        need(not unknown, "recompute_modules", f"module names among {', '.join(known)} with {job.framework}", unknown)
        need(len(set(modules)) == len(modules), "recompute_modules", "each module once", list(modules))
        need(model.sublayers_in(0, model.num_layers, "mlp") > 0 or "mlp" not in modules, "recompute_modules",
             "mlp only for a model with dense MLP layers (every layer of this one is MoE: use moe or moe_act)", "mlp")
        moe_only = [m for m in modules if m in ("moe", "moe_act", "shared_experts")]
        need(model.moe is not None or not moe_only, "recompute_modules", "moe, moe_act and shared_experts only for MoE models", moe_only)
        need("shared_experts" not in modules or (model.moe is not None and model.moe.shared_ffn_hidden_size > 0), "recompute_modules",
             "shared_experts only for a model with shared experts", "shared_experts")
        need("mla_up_proj" not in modules or model.mla is not None, "recompute_modules",
             "mla_up_proj only for multi-head latent attention", "mla_up_proj")
        delayed = job.precision == "fp8" and job.features.fp8_recipe == "delayed"
        need(not delayed or not {"moe_act", "layernorm"} & set(modules), "recompute_modules",
             "no moe_act or layernorm under delayed fp8 scaling (megatron-core rejects them)", list(modules))
    if layout.recompute_num_layers:
        need(layout.recompute == "full", "recompute_num_layers", "only with recompute full", layout.recompute_num_layers)
        most = -(-model.num_layers // (layout.pp * layout.vpp))
        need(0 < layout.recompute_num_layers <= most, "recompute_num_layers",
             f"0 (every layer) or 1 to the {most} layers of a model chunk", layout.recompute_num_layers)


def _moe_feature_problems(job: Job, layout: Layout) -> list[tuple[str, str, object]]:
    """What the job's MoE features need of the layout (megatron-core 0.16.1
    transformer_config.py __post_init__ and moe/token_dispatcher.py)."""
    features, problems = job.features, []
    if features.moe_token_dispatcher in ("deepep", "hybridep") and layout.ep * layout.etp == 1:
        problems.append(("ep", "more than 1 with the flex dispatcher ('Flex token dispatcher requires TPxEP > 1')", layout.ep))
    if features.moe_shared_expert_overlap and layout.recompute == "selective" and "shared_experts" in layout.selective_modules:
        problems.append(("recompute_modules", "no shared_experts with moe_shared_expert_overlap (megatron-core: 'shared_experts "
                         "recompute cannot work with --moe-shared-expert-overlap')", ",".join(layout.selective_modules)))
    if features.overlap_moe_expert_parallel_comm:
        if layout.ep == 1:
            problems.append(("ep", "more than 1 with overlap_moe_expert_parallel_comm", layout.ep))
        if layout.pp > 1 and layout.vpp == 1:
            problems.append(("vpp", "more than 1 with overlap_moe_expert_parallel_comm and pp > 1", layout.vpp))
        if layout.recompute == "full":
            problems.append(("recompute", "not full with overlap_moe_expert_parallel_comm", layout.recompute))
        if job.model.mtp_layers and layout.pp == 1:
            problems.append(("pp", "more than 1 with overlap_moe_expert_parallel_comm and multi-token prediction", layout.pp))
    return problems


def _tp_width_problems(model, tp: int, need) -> None:
    """Every width TP splits must split evenly: megatron-core's column and
    row parallel linears take ``divide(width, tp)``, which asserts it
    (tensor_parallel/layers.py), and a width narrower than TP would leave a
    rank a GEMM of width 0. The dense FFN (MoE models' dense layers too),
    the shared experts and a vision encoder (TP as in the language model)."""
    need(model.ffn_hidden_size % tp == 0, "tp", f"a divisor of the FFN width {model.ffn_hidden_size} (intermediate_size)", tp)
    if model.moe is not None and model.moe.shared_ffn_hidden_size:
        shared = model.moe.shared_ffn_hidden_size
        need(shared % tp == 0, "tp", f"a divisor of the shared experts' width {shared}", tp)
    if model.vision is not None:
        encoder = model.vision.encoder
        need(encoder.num_attention_heads % tp == 0, "tp", f"a divisor of the vision encoder's {encoder.num_attention_heads} attention heads", tp)
        need(encoder.ffn_hidden_size % tp == 0, "tp", f"a divisor of the vision encoder's FFN width {encoder.ffn_hidden_size}", tp)
