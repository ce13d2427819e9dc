"""Megatron-LM launch files: the ``pretrain_gpt.py`` arguments and ``train.sh``.

Flag spellings follow Megatron-LM's ``megatron/training/arguments.py`` (many
flags are generated there from megatron-core's ``TransformerConfig`` and
``ModelParallelConfig`` fields). ``train.sh`` runs torchrun once per node
(output/torchrun.py).
"""

from __future__ import annotations

from loom.planner.output import torchrun
from loom.planner.output import optimizer
from loom.planner.output.slurm import nodes_of
from loom.planner.output.torchrun import Program, bash_array
from loom.planner.output.trial import TRIAL_LOG_INTERVAL
from loom.planner.specs.job import Job
from loom.planner.specs.layout import Layout
from loom.planner.specs.model import ModelSpec
from loom.planner.specs.stages import Chunk, Placement, Stage

LOG_INTERVAL = "10"

# --attention-backend for each attention kernel of job.Features.
ATTENTION_BACKEND = {"cudnn": "fused", "flash2": "flash"}


def megatron_args(job: Job, layout: Layout, stages: list[Stage]) -> list[str]:
    """Every model, parallel, batch and precision flag of ``pretrain_gpt.py``
    (or ``pretrain_mamba.py``) for this layout (data flags are added by ``train.sh``).

    Raises ValueError for a layout or split Megatron-LM cannot run as planned."""
    check_layout(job, layout, stages)
    return [
        *_model_args(job),
        *_parallel_args(job.model, layout, stages),
        *_optimizer_args(job, layout),
        *_recompute_args(layout),
        *_overlap_args(job, layout),
        *_precision_args(job, layout),
        *_training_args(job, layout),
    ]


def check_layout(job: Job, layout: Layout, stages: list[Stage]) -> None:
    """What Megatron-LM / megatron-core would reject at start-up, checked here
    so loom never writes a launch that fails or silently runs another layout."""
    model = job.model
    problems = []
    if model.moe is None and (layout.ep, layout.etp) != (1, 1):
        problems.append(f"expert parallelism (EP{layout.ep} ETP{layout.etp}) on a dense model")
    if model.moe is not None and layout.tp > 1 and not layout.sequence_parallel:
        problems.append("MoE with tensor parallelism needs sequence parallelism")
    if model.num_attention_heads % layout.tp or model.num_query_groups % layout.tp:
        problems.append(f"{model.num_attention_heads} heads / {model.num_query_groups} query groups over TP{layout.tp}")
    if layout.sequence_parallel and layout.tp == 1:
        # validate_args silently turns it off; the layout would not be what runs.
        problems.append("sequence parallelism without tensor parallelism")
    if layout.global_batch_size % (layout.micro_batch_size * layout.dp):
        problems.append(f"global batch {layout.global_batch_size} not a multiple of mbs x dp")
    if layout.cp > 1 and job.seq_length % (2 * layout.cp):
        problems.append(f"seq length {job.seq_length} not a multiple of 2 x CP{layout.cp} (load-balanced CP chunks)")
    if layout.cp > 1 and (model.window_binds(job.seq_length) or model.attention_sinks):
        problems.append("context parallelism with sliding-window attention or attention sinks (Transformer Engine runs them "
                        "under CP only with a2a or all-gather communication, not the ring loom prices)")
    if layout.cp > 1 and not job.features.flash_attention:
        # Transformer Engine implements context parallelism only in its flash and fused backends.
        problems.append("context parallelism without flash attention")
    if layout.vpp > 1 and layout.num_microbatches % layout.pp:
        # megatron-core's interleaved schedule runs micro batches in groups of pp
        # (microbatch_group_size_per_vp_stage defaults to pp) and raises unless
        # num_microbatches is a multiple of pp (pipeline_parallel/schedules.py).
        problems.append(f"{layout.num_microbatches} micro batches with interleaving over PP{layout.pp}")
    if layout.zero_stage:
        problems.append(f"ZeRO stage {layout.zero_stage} (Megatron uses --use-distributed-optimizer)")
    if job.features.optimizer_states == "bf16" and (not layout.distributed_optimizer or layout.fsdp):
        problems.append("bf16 optimizer states need the distributed optimizer and no Megatron-FSDP")
    if layout.optimizer_offload and (not layout.distributed_optimizer or layout.fsdp):
        problems.append("optimizer offload needs the distributed optimizer and no Megatron-FSDP")
    if layout.fsdp and (layout.fsdp != layout.dp or not layout.distributed_optimizer or not layout.reshard_after_forward):
        problems.append("Megatron-FSDP shards over all of DP with the distributed optimizer and reshards after forward")
    if model.mamba is not None and (layout.vpp > 1 or len({stage.num_layers for stage in stages}) > 1 or layout.recompute == "full"):
        # MambaStack (ssm/mamba_block.py) asserts no virtual stages, splits
        # its layers evenly unless told first/last counts, and has no
        # checkpointed forward.
        problems.append("a hybrid Mamba model split other than evenly over PP without interleaving, or under full recompute")
    problems += _stage_problems(layout, stages, model.num_layers)
    if problems:
        raise ValueError(f"Megatron-LM cannot run layout {layout.label()} as planned: " + "; ".join(problems))


def _stage_problems(layout: Layout, stages: list[Stage], num_layers: int) -> list[str]:
    """Stages must be Megatron's: pp stages of vpp chunks each, stage s on the
    rank block [s*n, (s+1)*n), chunk v of stage s being virtual stage v*pp + s,
    the virtual stages running all layers in order."""
    n = layout.tp * layout.cp * layout.dp
    if len(stages) != layout.pp:
        return [f"{len(stages)} stages for PP{layout.pp}"]
    problems = []
    for s, stage in enumerate(stages):
        if stage.ranks != range(s * n, (s + 1) * n):
            problems.append(f"stage {s} does not own ranks {s * n}..{(s + 1) * n - 1} (rank order tp-cp-ep-dp-pp)")
        if len(stage.chunks) != layout.vpp:
            problems.append(f"stage {s} has {len(stage.chunks)} chunks for VPP{layout.vpp}")
    if problems:
        return problems
    chunks = _chunks_in_layer_order(stages)
    next_layer = 0
    for chunk in chunks:
        if chunk.first_layer != next_layer:
            return [f"virtual stages do not run consecutive layers (layer {next_layer} expected)"]
        next_layer += chunk.num_layers
    if next_layer != num_layers:
        problems.append(f"the stages run {next_layer} of {num_layers} layers")
    if not (chunks[0].embedding and chunks[-1].head) or any(c.embedding for c in chunks[1:]) or any(c.head for c in chunks[:-1]):
        problems.append("the embedding must be on the first virtual stage and the head on the last")
    return problems


def _chunks_in_layer_order(stages: list[Stage]) -> list[Chunk]:
    """Model chunks in virtual-stage order: v*pp + s is chunk v of stage s."""
    return [stage.chunks[v] for v in range(len(stages[0].chunks)) for stage in stages]


def _exact(value: float) -> str:
    """A config's number as a flag value, every digit kept (``:g`` keeps 6:
    an mscale of 0.70710678 would train as 0.707107), integers without ".0"."""
    text = repr(float(value))
    return text.removesuffix(".0")


def _model_args(job: Job) -> list[str]:
    m = job.model
    args = [
        "--num-layers", str(m.num_layers),
        "--hidden-size", str(m.hidden_size),
        "--num-attention-heads", str(m.num_attention_heads),
        "--ffn-hidden-size", str(m.ffn_hidden_size),
        "--seq-length", str(job.seq_length),
        "--max-position-embeddings", str(_max_positions(m, job.seq_length)),
        "--normalization", m.normalization,
        "--norm-epsilon", _exact(m.norm_epsilon),
        "--position-embedding-type", "learned_absolute" if m.learned_position_embeddings else "rope" if m.rotary else "none",
        "--hidden-dropout", str(m.dropout),
        "--attention-dropout", str(m.attention_dropout),
        # Pre-tokenised data (or mock data) only needs the vocabulary size.
        # NullTokenizer adds its end-of-document id after the ids it is given
        # (megatron/training/tokenizer/tokenizer.py _NullTokenizer.vocab_size:
        # given + 1): one fewer makes its vocabulary the config's.
        "--tokenizer-type", "NullTokenizer",
        "--vocab-size", str(m.vocab_size - 1),
    ]
    if m.rotary:
        args += ["--rotary-base", str(int(m.rope_theta))]
        if m.rope_scaling_factor is not None:
            args += ["--use-rope-scaling", "--rope-scaling-factor", _exact(m.rope_scaling_factor)]
        if m.rotary_percent < 1.0:
            args += ["--rotary-percent", _exact(m.rotary_percent)]
    if m.kv_channels:
        args += ["--kv-channels", str(m.kv_channels)]
    if m.num_query_groups != m.num_attention_heads:
        args += ["--group-query-attention", "--num-query-groups", str(m.num_query_groups)]
    if m.glu_clamp is not None:
        # gpt-oss's MLP, (up + 1) * gate * sigmoid(1.702 gate) with gate <= limit
        # and |up| <= limit: megatron-core's quick_gelu GLU with a linear
        # offset and a clamp (moe/experts.py, mlp.py; Megatron-Bridge's GPTOSSProvider).
        args += ["--quick-geglu", "--glu-linear-offset", "1.0", "--activation-func-clamp-value", _exact(m.glu_clamp)]
    elif m.gated_mlp:
        args.append("--swiglu")
    elif m.squared_relu:
        args.append("--squared-relu")
    if m.layernorm_1p:
        args.append("--apply-layernorm-1p")  # TransformerConfig.layernorm_zero_centered_gamma
    if not m.tied_embeddings:
        args.append("--untie-embeddings-and-output-weights")
    if not m.linear_bias:
        args.append("--disable-bias-linear")
        if m.qkv_bias:
            args.append("--add-qkv-bias")
    elif m.moe is not None:
        # megatron-core's TEGroupedMLP: "bias_dropout_fusion is not supported
        # in TEGroupedMLP when add_bias_linear=True" (moe/experts.py).
        args.append("--no-bias-dropout-fusion")
    if m.qk_norm:
        args.append("--qk-layernorm")
    return args + _window_args(m, job.seq_length) + _mla_args(m) + _hybrid_args(m) + _moe_args(m) + _moe_feature_args(job)


def _hybrid_args(m: ModelSpec) -> list[str]:
    """A hybrid Mamba model for pretrain_mamba.py: megatron-core's Mamba
    stack spec, its layer pattern and the Mamba-2 mixers' shape
    (TransformerConfig's is_hybrid_model and mamba_* fields; Megatron-LM
    examples/mamba/train.sh)."""
    if m.mamba is None:
        return []
    mamba = m.mamba
    return ["--spec", "megatron.core.models.mamba.mamba_layer_specs", "mamba_stack_spec", "--is-hybrid-model",
            "--hybrid-override-pattern", m.hybrid_pattern, "--mamba-num-heads", str(mamba.num_heads), "--mamba-head-dim", str(mamba.head_dim),
            "--mamba-state-dim", str(mamba.state_size), "--mamba-num-groups", str(mamba.num_groups)]


def _window_args(m: ModelSpec, seq_length: int) -> list[str]:
    """Sliding-window layers (gpt-oss; every layer of StarCoder2 and Phi-3)
    and attention sinks (gpt-oss). Transformer
    Engine's window (left, 0) lets query i see keys i - left .. i, so a
    window of W keys, the query's own included (Hugging Face's and the gpt-oss
    reference's), is left = W - 1. --window-attn-skip-freq lists the layers,
    1 windowed, 0 full (megatron-core transformer/utils.py
    is_layer_window_attention). Sinks are megatron-core's learnable softmax
    offset, one logit per head (softmax_type 'learnable'). A window as wide
    as the sequence is no window (ModelSpec.window_binds): none is written."""
    args = []
    if m.window_binds(seq_length):
        args += ["--window-size", f"{m.sliding_window - 1},0", "--window-attn-skip-freq", _layer_pattern(m.window_layers)]
    if m.attention_sinks:
        args += ["--softmax-type", "learnable"]
    return args


def _layer_pattern(flags: tuple[bool, ...]) -> str:
    """A per-layer 0/1 list as Megatron's list expression, its shortest
    repeating unit times the repeats: ``([1,0]*18)``."""
    bits = [int(flag) for flag in flags]
    n = len(bits)
    period = next(p for p in range(1, n + 1) if n % p == 0 and bits == bits[:p] * (n // p))
    return f"([{','.join(map(str, bits[:period]))}]*{n // period})"


def _mla_args(m: ModelSpec) -> list[str]:
    """Multi-head latent attention (megatron-core's MLATransformerConfig).
    DeepSeek's RMSNorms on the query and key/value latents (q_a_layernorm,
    kv_a_layernorm) are built only with --qk-layernorm (gpt_layer_specs.py:
    the up-projections become LayerNormLinear, q_layernorm and kv_layernorm
    norms; IdentityOp without it)."""
    if m.mla is None:
        return []
    args = ["--multi-latent-attention", "--kv-lora-rank", str(m.mla.kv_lora_rank), "--qk-head-dim", str(m.mla.qk_nope_head_dim),
            "--qk-pos-emb-head-dim", str(m.mla.qk_rope_head_dim), "--v-head-dim", str(m.mla.v_head_dim), "--qk-layernorm"]
    if m.mla.q_lora_rank:
        args += ["--q-lora-rank", str(m.mla.q_lora_rank)]
    if m.mla.rope_scaling_factor is not None:
        # MLA's rotary embeddings are YaRN by default (rope_type "yarn"); these
        # are its factor and temperatures (Megatron-LM's DeepSeek examples).
        args += ["--rotary-scaling-factor", _exact(m.mla.rope_scaling_factor), "--mscale", _exact(m.mla.mscale),
                 "--mscale-all-dim", _exact(m.mla.mscale_all_dim)]
    return args


def _moe_args(m: ModelSpec) -> list[str]:
    """MoE layers: experts, router, grouped GEMMs (what the time model
    prices), and the dense-then-MoE pattern as a
    ``--moe-layer-freq`` list expression (DeepSeek-V3: ``([0]*3+[1]*58)``)."""
    moe = m.moe
    if moe is None:
        return []
    args = [
        "--num-experts", str(moe.num_experts),
        "--moe-router-topk", str(moe.top_k),
        "--moe-ffn-hidden-size", str(moe.expert_ffn_hidden_size),
        "--moe-grouped-gemm",
    ]
    if moe.aux_loss_coeff is not None:
        args += ["--moe-router-load-balancing-type", "seq_aux_loss" if moe.seq_aux_loss else "aux_loss",
                 "--moe-aux-loss-coeff", _exact(moe.aux_loss_coeff)]
    if moe.shared_ffn_hidden_size:
        args += ["--moe-shared-expert-intermediate-size", str(moe.shared_ffn_hidden_size)]
        if moe.shared_gate:
            args.append("--moe-shared-expert-gate")
    if moe.pre_softmax:
        args.append("--moe-router-pre-softmax")
    if moe.sigmoid_router:
        args += ["--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias"]
    if moe.topk_scaling_factor is not None:
        args += ["--moe-router-topk-scaling-factor", _exact(moe.topk_scaling_factor)]
    if moe.router_groups > 1:
        args += ["--moe-router-num-groups", str(moe.router_groups), "--moe-router-group-topk", str(moe.router_group_topk)]
    if moe.first_dense_layers:
        args += ["--moe-layer-freq", f"([0]*{moe.first_dense_layers}+[1]*{m.num_layers - moe.first_dense_layers})"]
    if m.mtp_layers:
        args += ["--mtp-num-layers", str(m.mtp_layers)]
    return args


def _moe_feature_args(job: Job) -> list[str]:
    """The job's MoE features as megatron-core 0.16.1 names them
    (megatron/training/arguments.py): the dispatcher (DeepEP and HybridEP are
    the flex dispatcher's backends), token dropping, the fused kernels and
    the two overlaps (the all-to-all overlap defers the weight gradients
    with --delay-wgrad-compute, as Megatron-Bridge's moe_a2a_overlap does)."""
    if job.model.moe is None:
        return []
    features = job.features
    dispatcher = features.moe_token_dispatcher
    args = ["--moe-token-dispatcher-type", "flex" if dispatcher in ("deepep", "hybridep") else dispatcher]
    if dispatcher in ("deepep", "hybridep"):
        args += ["--moe-flex-dispatcher-backend", dispatcher]
    if features.moe_expert_capacity_factor is not None:
        args += ["--moe-expert-capacity-factor", _exact(features.moe_expert_capacity_factor)]
        if features.moe_pad_expert_input_to_capacity:
            args.append("--moe-pad-expert-input-to-capacity")
    if features.moe_router_fusion:
        args.append("--moe-router-fusion")
    if features.moe_permute_fusion:
        args.append("--moe-permute-fusion")
    if features.overlap_moe_expert_parallel_comm:
        args += ["--overlap-moe-expert-parallel-comm", "--delay-wgrad-compute"]
    if features.moe_shared_expert_overlap:
        args.append("--moe-shared-expert-overlap")
    return args


def _max_positions(model: ModelSpec, seq_length: int) -> int:
    """validate_args requires max_position_embeddings >= seq_length. Learned
    positions are a table of that size (job checks keep seq_length within it);
    with RoPE it only sizes the rotary cache, so a longer sequence is allowed."""
    return model.max_position_embeddings if model.learned_position_embeddings else max(model.max_position_embeddings, seq_length)


def _parallel_args(model: ModelSpec, layout: Layout, stages: list[Stage]) -> list[str]:
    args = [
        "--tensor-model-parallel-size", str(layout.tp),
        "--pipeline-model-parallel-size", str(layout.pp),
        "--context-parallel-size", str(layout.cp),
    ]
    if model.moe is not None:
        args += ["--expert-model-parallel-size", str(layout.ep), "--expert-tensor-parallel-size", str(layout.etp)]
    if layout.sequence_parallel:
        args.append("--sequence-parallel")
    args += _split_args(layout, stages, model.mtp_layers)
    if layout.distributed_optimizer:
        args.append("--use-distributed-optimizer")
    return args + _megatron_fsdp_args(layout)


def _optimizer_args(job: Job, layout: Layout) -> list[str]:
    """Offload puts the whole optimizer on the host (the argparse default
    fraction is 1.0; given so the file says it), copies overlapped with the
    host's step; bf16 moments. Both go through the precision-aware
    optimizer, which validate_args requires for offload."""
    args = []
    bf16_states = job.features.optimizer_states == "bf16"
    if layout.optimizer_offload or bf16_states:
        args.append("--use-precision-aware-optimizer")
    if layout.optimizer_offload:
        args += ["--optimizer-cpu-offload", "--optimizer-offload-fraction", "1.0", "--overlap-cpu-optimizer-d2h-h2d"]
    if bf16_states:
        args += ["--exp-avg-dtype", "bf16", "--exp-avg-sq-dtype", "bf16"]
    return args


def _megatron_fsdp_args(layout: Layout) -> list[str]:
    """Megatron-FSDP sharding weights, gradients and optimizer state over DP
    (ZeRO-3), with the flags its user guide requires (megatron-core
    docs/discussions/megatron-fsdp-user-guide: the fsdp_dtensor checkpoint
    format, which validate_args asserts, and no gradient-accumulation
    fusion) and the double buffer of two layers' gathers that loom's memory
    prices (cost/sharding.py)."""
    if not layout.fsdp:
        return []
    return ["--use-megatron-fsdp", "--data-parallel-sharding-strategy", "optim_grads_params", "--fsdp-double-buffer",
            "--no-gradient-accumulation-fusion", "--ckpt-format", "fsdp_dtensor"]


def _split_args(layout: Layout, stages: list[Stage], mtp_layers: int = 0) -> list[str]:
    """How many decoder layers each (virtual) stage runs, in the simplest
    flags that say it: none for an even split; first/last stage counts when
    only the end stages differ (without interleaving, the middle stages
    equal); otherwise the full pipeline layout (megatron/training/arguments.py)."""
    sizes = [chunk.num_layers for chunk in _chunks_in_layer_order(stages)]
    if len(set(sizes)) == 1:
        if layout.vpp > 1:
            return ["--num-layers-per-virtual-pipeline-stage", str(sizes[0])]
        return []
    middle = set(sizes[1:-1])
    if layout.vpp == 1 and len(middle) <= 1 and min(sizes[0], sizes[-1]) > 0:
        usual = middle.pop() if middle else None
        args = []
        if sizes[0] != usual:
            args += ["--decoder-first-pipeline-num-layers", str(sizes[0])]
        if sizes[-1] != usual:
            args += ["--decoder-last-pipeline-num-layers", str(sizes[-1])]
        return args
    return ["--pipeline-model-parallel-layout", pipeline_layout(stages, mtp_layers)]


def pipeline_layout(stages: list[Stage], mtp_layers: int = 0) -> str:
    """Megatron's ``--pipeline-model-parallel-layout`` for an uneven split:
    virtual stages in order, separated by ``|``; ``E`` the embedding, ``t`` a
    decoder layer, ``m`` a multi-token prediction layer (with the head, as
    loom prices it), ``L`` the loss (head), e.g. ``Ettt|tttt|tttmL``
    (megatron/core/transformer/pipeline_parallel_layer_layout.py, whose
    validate_layer_layout requires the mtp count to match --mtp-num-layers)."""
    return "|".join(
        "E" * chunk.embedding + "t" * chunk.num_layers + "m" * (mtp_layers * chunk.head) + "L" * chunk.head
        for chunk in _chunks_in_layer_order(stages)
    )


def _recompute_args(layout: Layout) -> list[str]:
    """Selective recomputes the layout's modules (Megatron's default,
    core_attn, unless others are named); full recomputes every layer from its
    input (uniform method, 1 layer per checkpoint) or the first N layers of
    each model chunk (block method), as the memory model prices them."""
    if layout.recompute == "selective":
        modules = ["--recompute-modules", *layout.recompute_modules] if layout.recompute_modules else []
        return ["--recompute-granularity", "selective", *modules]
    if layout.recompute == "full":
        method, layers = ("block", layout.recompute_num_layers) if layout.recompute_num_layers else ("uniform", 1)
        return ["--recompute-granularity", "full", "--recompute-method", method, "--recompute-num-layers", str(layers)]
    return []


def _overlap_args(job: Job, layout: Layout) -> list[str]:
    """Communication overlap from the job's features, where Megatron allows it:
    param-gather overlap needs the distributed optimizer and grad-reduce overlap,
    TP comm overlap needs sequence parallelism (validate_args asserts both)."""
    features = job.features
    args = []
    if features.overlap_grad_reduce:
        args.append("--overlap-grad-reduce")
        if features.overlap_param_gather and layout.distributed_optimizer:
            args.append("--overlap-param-gather")
    if features.tp_comm_overlap and layout.sequence_parallel:
        args.append("--tp-comm-overlap")
    return args


def _precision_args(job: Job, layout: Layout) -> list[str]:
    """Precision and what the stack keeps in which dtype (job.Features):
    fp8 runs Transformer Engine GEMMs with the hybrid format (e4m3 forward,
    e5m2 gradients) and the job's scaling recipe, with fp8 primary weights
    under --fp8-param-gather (Megatron allows it with the distributed
    optimizer only; MXFP8 then reuses the gradient buffer for the bf16
    all-gather, which Megatron-Bridge requires). The gradient buffer is fp32
    by --accumulate-allreduce-grads-in-fp32 (Megatron-LM turns it on itself
    for bf16, not for fp16), or bf16 by --grad-reduce-in-bf16."""
    features = job.features
    # tf32: fp32 parameters (no --bf16/--fp16), their GEMMs on TF32 tensor cores.
    args = {"bf16": ["--bf16"], "fp16": ["--fp16"], "fp8": ["--bf16", "--fp8-format", "hybrid"], "tf32": [],
            # NVFP4 (megatron-core TransformerConfig.fp4 / fp4_recipe): TE's NVFP4BlockScaling, bf16 elsewhere.
            "nvfp4": ["--bf16", "--fp4-format", "e2m1", "--fp4-recipe", "nvfp4"]}[job.precision]
    if job.precision == "fp8":
        args += ["--fp8-recipe", features.fp8_recipe]
        if features.fp8_param_gather and layout.distributed_optimizer:
            args.append("--fp8-param-gather")
            if features.fp8_recipe == "mxfp8":
                args.append("--reuse-grad-buf-for-mxfp8-param-ag")
    if job.precision == "tf32":
        pass  # fp32 gradients reduce in fp32
    elif features.grad_reduce_in_fp32:
        args.append("--accumulate-allreduce-grads-in-fp32")
    elif job.precision != "fp16":
        args.append("--grad-reduce-in-bf16")
    if features.cross_entropy_fusion != "none":
        args += ["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", features.cross_entropy_fusion]
    # The kernel loom priced: cuDNN's fused attention is Transformer Engine's
    # FusedAttention backend, FlashAttention-2 its FlashAttention one
    # (megatron-core AttnBackend; TE dot_product_attention/utils.py).
    backend = ATTENTION_BACKEND[features.attention_kernel] if features.flash_attention else "unfused"
    if job.model.attention_sinks and features.flash_attention:
        # Transformer Engine runs a learnable softmax offset in its cuDNN fused
        # attention (and unfused), never in flash-attn (TE 2.9
        # dot_product_attention/utils.py get_attention_backend: "Disabling
        # FlashAttention for softmax_type").
        backend = "fused"
    return [*args, "--attention-backend", backend]


def _training_args(job: Job, layout: Layout) -> list[str]:
    """Batch, steps and the shared optimiser settings (output/optimizer.py;
    Megatron's adam is AdamW: decoupled weight decay)."""
    schedule = optimizer.schedule_of(job.model, job.train_iters)
    return [
        "--micro-batch-size", str(layout.micro_batch_size),
        "--global-batch-size", str(layout.global_batch_size),
        "--train-iters", str(job.train_iters),
        "--optimizer", "adam",
        "--lr", _exact(schedule.peak_lr),
        "--min-lr", _exact(schedule.min_lr),
        "--lr-decay-style", "cosine",
        "--lr-warmup-iters", str(schedule.warmup_steps),
        "--weight-decay", _exact(optimizer.WEIGHT_DECAY),
        "--clip-grad", _exact(optimizer.CLIP_GRAD),
        "--adam-beta1", _exact(optimizer.ADAM_BETAS[0]),
        "--adam-beta2", _exact(optimizer.ADAM_BETAS[1]),
        "--adam-eps", _exact(optimizer.ADAM_EPS),
        *(("--log-interval", str(TRIAL_LOG_INTERVAL), "--log-throughput", "--timing-log-level", "1") if job.trial else ("--log-interval", LOG_INTERVAL)),
    ]


def train_sh(job: Job, layout: Layout, stages: list[Stage], placement: Placement) -> str:
    """``train.sh``: run once on every node; starts torchrun for that node
    (output/torchrun.py) with ``pretrain_gpt.py`` (``pretrain_mamba.py`` for
    a hybrid Mamba model) and this layout's flags.

    Raises ValueError when the placement cannot be realised by one torchrun per
    node (see ``nodes_of``: a host's ranks not contiguous, hosts with different
    rank counts, a GPU used twice or not in the cluster)."""
    args = megatron_args(job, layout, stages)
    if len(placement.gpus) != layout.world_size:
        raise ValueError(f"placement has {len(placement.gpus)} ranks, layout {layout.label()} needs {layout.world_size}")
    # Hybrid Mamba models train with pretrain_mamba.py (MambaModel), the rest with pretrain_gpt.py.
    script = "pretrain_mamba.py" if job.model.mamba is not None else "pretrain_gpt.py"
    program = Program(
        title=f"Megatron-LM pre-training of {job.model.name}",
        notes=["# Data: --mock-data unless DATA_PATH is set (a Megatron indexed-dataset prefix,",
               "# or a blend 'weight prefix weight prefix')."],
        setup=['MEGATRON_LM_DIR="${MEGATRON_LM_DIR:-/workspace/Megatron-LM}"', "", *_environment(layout), *torchrun.tf32_environment(job.precision),
               *bash_array("MEGATRON_ARGS", args), *_data_args()],
        target=f'"$MEGATRON_LM_DIR/{script}" "${{MEGATRON_ARGS[@]}}" "${{DATA_ARGS[@]}}"',
    )
    return torchrun.train_sh(program, job.cluster.name, layout.label(), layout.world_size, nodes_of(placement, job.cluster), job.cluster.named_hosts)


def _environment(layout: Layout) -> list[str]:
    """Before Blackwell, Megatron requires one CUDA hardware queue with TP or CP
    so communication kernels are issued ahead of the GEMMs they overlap
    (validate_args asserts CUDA_DEVICE_MAX_CONNECTIONS=1) — except under
    Megatron-FSDP, which asserts the opposite (and only warns about TP/CP)."""
    if layout.fsdp:
        return ["unset CUDA_DEVICE_MAX_CONNECTIONS  # Megatron-FSDP requires more than one", ""]
    if layout.tp > 1 or layout.cp > 1:
        return ["export CUDA_DEVICE_MAX_CONNECTIONS=1", ""]
    return []


def _data_args() -> list[str]:
    return [
        'if [[ -n "${DATA_PATH:-}" ]]; then',
        '    read -r -a DATA_PREFIXES <<< "$DATA_PATH"',
        '    DATA_ARGS=(--data-path "${DATA_PREFIXES[@]}" --split 99,1,0)',
        "else",
        "    DATA_ARGS=(--mock-data)",
        "fi",
        "",
    ]
