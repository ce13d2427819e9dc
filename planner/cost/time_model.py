"""Predicted time of one optimizer step, with a breakdown of where it goes.

    step = pipeline (compute + exposed TP/CP/PP communication + bubble)
         + exposed DP gradient reduce + distributed-optimizer parameter gather
         + embedding gradient sync + optimizer step

The pipeline term for stages with per-micro-batch times tau_s, m micro
batches and v virtual stages per rank is m * max(tau) + (sum(tau) - max(tau)) / v:
for equal stages that is Megatron's (m + (p - 1) / v) * tau (Narayanan et al.
SC'21, sec. 2.2), and for v = 1 it is "one micro batch through every stage
plus (m - 1) times the slowest stage".
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, TypeVar

from loom.planner.cost import contention, host, layers, moe, offload, sharding
from loom.planner.cost.collectives import Link, all_gather_s, all_reduce_s, all_to_all_s, reduce_scatter_s, send_recv_s
from loom.planner.cost.compute import PassTime, attention_core, mlp, recomputed_forward
from loom.planner.cost.efficiency import memory_time_s
from loom.planner.cost.memo import Memo
from loom.planner.cost.memory import StageParams, StateBytes, optimizer_partition, sharding_units, stage_params
from loom.planner.cost.network import Links
from loom.planner.cost.shape import Shape
from loom.planner.schedule.simulate import split_pipeline_floor_s
from loom.planner.specs.job import Job
from loom.planner.specs.layout import OP_SAC, Layout
from loom.planner.specs.model import SUBLAYERS, ModelSpec
from loom.planner.specs.stages import Chunk, Placement, Stage, stage_signature
from loom.profiles.catalogue import GPU

# Megatron's DDP bucket: max(40M, 1M x dp) parameters (megatron/core/distributed/
# distributed_data_parallel.py). The last bucket's reduce cannot overlap backward.
DDP_BUCKET_PARAMS = 40_000_000
# Adam's step is memory-bound: read fp32 master, m, v and grad (16 B), write
# master, m, v (12 B) and the 16-bit weight (2 B), plus reading the grads once
# more for the global norm used by gradient clipping (4 B).
OPTIMIZER_STEP_BYTES_PER_PARAM = 34
# torchtitan steps torch.optim.AdamW after clip_grad_norm_(foreach=True),
# whose _foreach_norm reads the gradients (4 B) and _foreach_mul_ scales
# them (8 B) (torch 2.6-2.13 nn/utils/clip_grad.py). Fused AdamW reads the
# weight, both moments and the gradient and writes the three back in one
# pass (28 B); the foreach path (optim/adam.py _multi_tensor_adam, decoupled
# weight decay) runs one pass per op: mul_ weights 8, lerp_ m 12, mul_ v 8,
# addcmul_ v 16, sqrt 8, div_ 8, add_ eps 8, addcdiv_ weights 16 (84 B).
TORCHTITAN_OPTIMIZER_STEP_BYTES_PER_PARAM = {True: 28 + 12, False: 84 + 12}


@dataclass(frozen=True)
class StepTime:
    step_time_s: float
    breakdown_s: dict[str, float]
    stage_microbatch_s: tuple[float, ...]  # tau_s: one micro batch, all chunks of stage s
    # Per stage, one GPU's whole step: its compute kernels by kind and its TP
    # collectives before overlap (what a profiler trace measures; the
    # simulated step fills them, the search's closed form leaves them empty).
    stage_kernels: tuple[PassTime, ...] = ()
    stage_tp_busy_s: tuple[float, ...] = ()


@dataclass(frozen=True)
class ChunkTime:
    compute_fwd_s: float
    compute_bwd_s: float
    recompute_s: float
    tp_comm_s: float  # exposed, all passes
    cp_comm_s: float
    tp_comm_fwd_s: float  # of which in the forward pass
    cp_comm_fwd_s: float
    weight_grad_s: float  # the weight-gradient GEMMs within compute_bwd_s
    tp_busy_s: float = 0.0  # TP and CP communication before overlap: what placement can speed up
    cp_busy_s: float = 0.0
    ep_comm_s: float = 0.0  # MoE token dispatch and combine, all passes (not overlapped)
    ep_comm_fwd_s: float = 0.0
    host_s: float = 0.0  # host time the GPU waits for (host.py), all passes
    host_fwd_s: float = 0.0
    kernels: PassTime = PassTime()  # compute_fwd + compute_bwd + recompute, by kernel kind
    contention_s: float = 0.0  # compute slowed by the MoE all-to-alls hidden behind it (contention.py), all passes
    contention_fwd_s: float = 0.0

    @property
    def total_s(self) -> float:
        return (self.compute_fwd_s + self.compute_bwd_s + self.recompute_s + self.tp_comm_s + self.cp_comm_s + self.ep_comm_s + self.host_s
                + self.contention_s)

    @property
    def forward_s(self) -> float:
        return self.compute_fwd_s + self.tp_comm_fwd_s + self.cp_comm_fwd_s + self.ep_comm_fwd_s + self.host_fwd_s + self.contention_fwd_s

    @property
    def backward_s(self) -> float:
        return self.total_s - self.forward_s


def _tp_collectives_s(bytes_: float, layout: Layout, link: Link, count: int) -> float:
    """``count`` TP collectives on a T x h activation: all-reduces, or with
    sequence parallelism a reduce-scatter + all-gather pair each (same bytes
    on the wire; Korthikanti et al. 2022, sec. 4.2.2)."""
    if layout.sequence_parallel:
        return count * (reduce_scatter_s(bytes_, layout.tp, link) + all_gather_s(bytes_, layout.tp, link))
    return count * all_reduce_s(bytes_, layout.tp, link)


def _exposed(comm_s: float, overlappable_s: float, overlap: bool) -> float:
    return max(0.0, comm_s - overlappable_s) if overlap else comm_s


def chunk_time(shape: Shape, layout: Layout, chunk: Chunk, gpu: GPU, links: Links, job: Job) -> ChunkTime:
    """One micro batch through one model chunk: forward, backward, recompute
    and the exposed TP and CP communication (per-layer costs for the
    pipeline partition come from one-layer chunks)."""
    features, n, model = job.features, chunk.num_layers, shape.model
    kinds = model.layer_kinds_in(chunk.first_layer, n)
    n_moe = model.moe_layers_in(chunk.first_layer, n)
    fwd_layer, bwd_layer = _layers(shape, gpu, kinds, backward=False), _layers(shape, gpu, kinds, backward=True)
    fwd, bwd = fwd_layer, bwd_layer
    if chunk.embedding:
        fwd, bwd = fwd + layers.embedding(shape, gpu), bwd + layers.embedding(shape, gpu, backward=True)
    if chunk.head:
        fwd, bwd = fwd + layers.head(shape, gpu), bwd + layers.head(shape, gpu, backward=True)
        if shape.model.mtp_layers:
            fwd, bwd = fwd + layers.mtp(shape, gpu), bwd + layers.mtp(shape, gpu, backward=True)
    if chunk.vision:
        fwd, bwd = fwd + layers.vision_tower(shape, gpu), bwd + layers.vision_tower(shape, gpu, backward=True)

    recompute, tp_again, ep_again = _recompute(shape, layout, chunk, gpu)

    # TP: one collective per sublayer forward and one backward (Megatron's f/g
    # operators: two per transformer layer), again forward under full
    # recompute; one each for the embedding and the LM head. TE's
    # --tp-comm-overlap hides them behind GEMMs.
    activation_bytes = shape.tokens * model.hidden_size * shape.act_bytes
    sublayers = sum(count * len(SUBLAYERS[kind]) for kind, count in kinds)
    fwd_tp = _tp_collectives_s(activation_bytes, layout, links.tp, sublayers + chunk.embedding + chunk.head)
    if chunk.vision:
        vision = shape.vision()
        patch_bytes = vision.tokens * vision.model.hidden_size * shape.act_bytes
        fwd_tp += _tp_collectives_s(patch_bytes, layout, links.tp, 2) * vision.model.num_layers
    tp_passes = 2 + tp_again
    tp_fwd = _exposed(fwd_tp, fwd_layer.gemm_s, features.tp_comm_overlap)
    tp_bwd = _micro_pipeline_backward_s(activation_bytes, layout, links.tp, n) if _micro_pipelined(job, layout) else tp_fwd

    # CP: ring attention passes K and V chunks cp - 1 times forward (and K, V,
    # dK, dV backward), overlapped with the attention blocks being computed.
    cp_fwd, cp_bwd, cp_busy = 0.0, 0.0, 0.0
    n_attention = model.sublayers_in(chunk.first_layer, n, "attention")
    if layout.cp > 1 and job.framework == "torchtitan":
        cp_fwd, cp_bwd, cp_busy = _torch_ring_attention_s(shape, gpu, links.cp, n_attention, tp_again)
    elif layout.cp > 1:
        kv_bytes = 2 * shape.tokens * model.kv_size / layout.tp * shape.act_bytes
        ring_s = (layout.cp - 1) * send_recv_s(kv_bytes, links.cp)
        core_fwd = attention_core(shape, gpu).total_s
        core_bwd = attention_core(shape, gpu, backward=True).total_s
        cp_fwd, cp_bwd = n_attention * max(0.0, ring_s - core_fwd), n_attention * max(0.0, 2 * ring_s - core_bwd)
        cp_busy = 3 * n_attention * ring_s
        n_mamba = model.sublayers_in(chunk.first_layer, n, "mamba")
        if n_mamba:
            mamba_fwd = n_mamba * _mamba_context_parallel_s(shape, links.cp)
            cp_fwd, cp_bwd, cp_busy = cp_fwd + mamba_fwd, cp_bwd + mamba_fwd * (1 + tp_again), cp_busy + mamba_fwd * (2 + tp_again)
    # MoE: each MoE layer dispatches its tokens to the experts' ranks and
    # combines the outputs back in every pass (moe.dispatch_s); with ETP the
    # alltoall and allgather dispatchers all-gather each expert's rows over
    # its ETP ranks before the expert GEMMs and reduce-scatter them after.
    # (the multi-token prediction modules on the last stage have MoE layers too)
    dispatching = n_moe + chunk.head * model.mtp_layers * (model.moe is not None)
    ep_fwd = ep_bwd = slowed_fwd = slowed_bwd = 0.0
    if dispatching:
        dispatch = dispatching * 2 * moe.dispatch_s(shape, links.ep, links.ep_remote_share)
        etp = 0.0
        if features.moe_token_dispatcher in ("alltoall", "allgather") and layout.etp > 1:
            routed_bytes = shape.moe_tokens * model.moe.top_k * model.hidden_size * shape.act_bytes * layout.etp
            etp = dispatching * (all_gather_s(routed_bytes, layout.etp, links.etp) + reduce_scatter_s(routed_bytes, layout.etp, links.etp))
        held = dispatch * _dispatcher_sm_share(features.moe_token_dispatcher, links.ep, gpu) + etp * contention.sm_share(links.etp, gpu)
        ep_fwd, ep_bwd, slowed_fwd, slowed_bwd = _exposed_dispatch(shape, gpu, dispatching, fwd_layer, bwd_layer,
                                                                   sharding.Comm(dispatch + etp, held), 1 + ep_again, paired_share(layout))
    host_fwd, host_bwd = _exposed_host(shape, gpu, kinds, (tp_fwd + ep_fwd) / max(n, 1), fwd_layer.total_s + tp_fwd + ep_fwd,
                                       bwd_layer.total_s + tp_fwd * tp_again + tp_bwd + ep_bwd)
    # Weight- and input-gradient GEMMs have the same FLOPs (dW = X^T dY,
    # dX = dY W^T): half the backward GEMM time is the weight gradient.
    return ChunkTime(
        compute_fwd_s=fwd.total_s, compute_bwd_s=bwd.total_s, recompute_s=recompute.total_s,
        tp_comm_s=tp_fwd * (1 + tp_again) + tp_bwd, cp_comm_s=cp_fwd + cp_bwd, tp_comm_fwd_s=tp_fwd, cp_comm_fwd_s=cp_fwd,
        weight_grad_s=bwd.gemm_s / 2, tp_busy_s=fwd_tp * tp_passes, cp_busy_s=cp_busy,
        ep_comm_s=ep_fwd + ep_bwd, ep_comm_fwd_s=ep_fwd, host_s=host_fwd + host_bwd, host_fwd_s=host_fwd, kernels=fwd + bwd + recompute,
        contention_s=slowed_fwd + slowed_bwd, contention_fwd_s=slowed_fwd,
    )


# Bytes PyTorch's ring attention moves through HBM per element of a rank's
# attention output (heads x head_dim per token) each time it merges one
# step's partial result, with convert_to_f32 (the default): the block's
# output cast to fp32 (2 + 4), then out - sigmoid(lse_b - lse) * (out -
# out_b) as three unfused fp32 kernels (12 + 8 + 12); a step that updates
# only the second half of the queries (round-robin load balance) does that
# on half and copies the whole output through torch.cat (8). Mean over the
# two kinds of steps: (38 + 27) / 2 [derived from torch 2.6-2.13
# torch/distributed/tensor/experimental/_attention.py _SDPAMerger, run
# eager; under torch.compile inductor may fuse the three into one pass].
RING_MERGE_BYTES_PER_ELEMENT = 32.5
# Backward, per step: the fp32 query gradient accumulates the step's bf16
# one (read 4 + 2, write 4) and each of dK, dV likewise (10) before both are
# copied into one buffer for the next rank (torch.cat, 4 + 4)
# (_templated_ring_attention_backward) [derived, same source].
RING_DQ_BYTES_PER_ELEMENT, RING_DKV_BYTES_PER_ELEMENT = 10, 18


def _torch_ring_attention_s(shape: Shape, gpu: GPU, link: Link, n: int, again: float) -> tuple[float, float, float]:
    """PyTorch's context parallelism (torch.distributed.tensor.experimental
    context_parallel, what torchtitan runs), for ``n`` layers of which a
    share ``again`` runs its forward again in backward (recompute): the
    forward and backward time it adds to the attention blocks, and the
    link's busy time. With the default rotate method K and V are all-gathered once per
    attention call, awaited after the first (local) block, so only that
    block hides the gather; backward gathers K and V again and passes the
    fp32 dK, dV partial sums around the ring (a permute per step, each
    hidden by one block's backward but the last); every step merges its
    partial output in fp32 (RING_MERGE_BYTES_PER_ELEMENT). The blocks are
    load balanced (round robin, 2 chunks per rank), so each of the cp steps
    does 1/cp of a rank's attention. Features.repeat_kv: K and V were
    repeated to every query head before attention, so that is what moves.
    (_templated_ring_attention, _AllGatherRotater, _SDPAMerger and
    _templated_ring_attention_backward in torch 2.6-2.13.)"""
    m, cp, tp = shape.model, shape.cp, shape.tp
    kv_width = m.q_size if shape.features.repeat_kv else m.kv_size
    kv_elements = 2 * shape.tokens * kv_width / tp
    out_elements = shape.tokens * m.num_attention_heads * m.v_head_dim / tp
    q_elements = shape.tokens * m.q_size / tp
    gather_s = all_gather_s(cp * kv_elements * shape.act_bytes, cp, link)
    dkv_send_s = send_recv_s(kv_elements * 4, link)
    block_fwd = attention_core(shape, gpu).total_s / cp
    block_bwd = attention_core(shape, gpu, backward=True).total_s / cp
    merge_fwd = memory_time_s((cp - 1) * RING_MERGE_BYTES_PER_ELEMENT * out_elements + 6 * out_elements, gpu)
    merge_bwd = memory_time_s((cp - 1) * (RING_DQ_BYTES_PER_ELEMENT * q_elements + RING_DKV_BYTES_PER_ELEMENT * kv_elements), gpu)
    fwd = max(0.0, gather_s - block_fwd) + merge_fwd
    bwd = max(0.0, gather_s - block_bwd) + (cp - 1) * max(0.0, dkv_send_s - block_bwd) + dkv_send_s + merge_bwd
    return n * fwd, n * (bwd + again * fwd), n * ((2 + again) * gather_s + cp * dkv_send_s)


def _micro_pipelined(job: Job, layout: Layout) -> bool:
    """torchtitan's async TP: torch.compile's micro-pipeline pass fuses each
    sequence-parallel collective with the matmul beside it (torch 2.6
    torch/_inductor/fx_passes/micro_pipeline_tp.py)."""
    return job.framework == "torchtitan" and job.features.tp_comm_overlap and layout.sequence_parallel and layout.tp > 1


def _micro_pipeline_backward_s(activation_bytes: float, layout: Layout, link: Link, n: int) -> float:
    """The backward TP time async TP leaves exposed in ``n`` layers. The
    pass fuses an all-gather with the matmuls that consume it and a
    reduce-scatter only with the single matmul that produces it
    (micro_pipeline_tp.py fuse_all_gather_matmul, fuse_matmul_reduce_scatter
    / _find_producer_matmul). Backward, the all-gathers of the output
    gradients of wo and w2 feed their input-gradient matmuls and are hidden,
    but autograd first sums the input gradients of wq, wk, wv (and of w1,
    w3), so the reduce-scatters of those sums run on their own: two per
    layer, exposed. (The forward and the recomputed forward are fused
    throughout: chunk_time's overlap.)"""
    return n * 2 * reduce_scatter_s(activation_bytes, layout.tp, link)


def _dispatcher_sm_share(dispatcher: str, link: Link, gpu: GPU) -> float:
    """The share of the SMs the token dispatcher's kernels hold while they
    run: DeepEP's or HybridEP's (moe.DISPATCHER_SMS), NCCL's send/recv
    channels for the alltoall and allgather dispatchers (contention.py)."""
    if dispatcher in moe.DISPATCHER_SMS:
        return moe.DISPATCHER_SMS[dispatcher] / gpu.sms
    return contention.sm_share(link, gpu, all_to_all=dispatcher == "alltoall")


def paired_share(layout: Layout) -> float:
    """Of a pipeline rank's forward (and backward) chunk passes, the share
    megatron-core's combined 1F1B runs beside another micro batch's backward
    (forward). Without a pipeline every forward but the first runs beside
    the previous micro batch's backward, and the last backward runs alone
    (combined_1f1b.py combined_1f1b_schedule_for_no_pipelining); interleaved,
    rank r's (pp - r - 1) x 2 + (vpp - 1) x pp + 1 warm-up forwards and as
    many cool-down backwards run alone (schedules.py
    get_pp_rank_microbatches: one warm-up step more for the overlap),
    pp - 1 + (vpp - 1) x pp + 1 on the mean rank. Of m x vpp passes, the
    rest are paired."""
    passes = layout.num_microbatches * layout.vpp
    alone = (layout.pp - 1) + (layout.vpp - 1) * layout.pp + 1
    return max(0, passes - alone) / passes


def _exposed_dispatch(shape: Shape, gpu: GPU, n_moe: int, fwd: PassTime, bwd: PassTime, forward: sharding.Comm,
                      backward_passes: float, paired: float) -> tuple[float, float, float, float]:
    """The dispatch and combine time nothing hides, forward and backward,
    and what the hidden part costs the compute beside it, forward and
    backward; ``forward``: one forward pass's all-to-alls (and ETP
    collectives), which backward runs ``backward_passes`` times (again under
    recompute). --overlap-moe-expert-parallel-comm runs one micro batch's
    forward beside another's backward, layer by layer, so each pass's
    all-to-alls hide behind the other pass's compute (megatron-core
    combined_1f1b.py, fine_grained_callables.py) and slow it by the SMs
    their kernels hold meanwhile — in the ``paired`` share of the passes
    (paired_share), the rest running alone. --moe-shared-expert-overlap runs
    the shared experts on a side stream during the dispatch and combine
    (shared_experts.py)."""
    features = shape.features
    backward = sharding.Comm(forward.seconds * backward_passes, forward.held_s * backward_passes)
    if features.overlap_moe_expert_parallel_comm:
        # A paired pass hides its all-to-alls behind the other pass's compute
        # (slowing it), a pass alone waits for them.
        found = []
        for comm, behind in ((forward, bwd.total_s), (backward, fwd.total_s)):
            hidden = min(comm.seconds, behind)
            slowed = contention.slowdown_s(comm.seconds, comm.held_s, hidden, comm.seconds - hidden)
            found.append((comm.seconds - paired * hidden, paired * slowed))
        (exposed_fwd, slowed_fwd), (exposed_bwd, slowed_bwd) = found
        return exposed_fwd, exposed_bwd, slowed_fwd, slowed_bwd
    if features.moe_shared_expert_overlap and shape.model.moe.shared_ffn_hidden_size:
        behind_fwd = n_moe * mlp(shape, gpu, shape.model.moe.shared_ffn_hidden_size).total_s
        behind_bwd = n_moe * mlp(shape, gpu, shape.model.moe.shared_ffn_hidden_size, backward=True).total_s
    else:
        return forward.seconds, backward.seconds, 0.0, 0.0
    exposed_fwd, exposed_bwd = max(0.0, forward.seconds - behind_fwd), max(0.0, backward.seconds - behind_bwd)
    slowed_fwd = contention.slowdown_s(forward.seconds, forward.held_s, forward.seconds - exposed_fwd, exposed_fwd)
    slowed_bwd = contention.slowdown_s(backward.seconds, backward.held_s, backward.seconds - exposed_bwd, exposed_bwd)
    return exposed_fwd, exposed_bwd, slowed_fwd, slowed_bwd


def _exposed_host(shape: Shape, gpu: GPU, kinds: tuple[tuple[str, int], ...], comm_per_layer_s: float, gpu_fwd_s: float,
                  gpu_bwd_s: float) -> tuple[float, float]:
    """Host time the GPU waits for, forward and backward (host.py), for
    ``kinds`` (kind, count) of layers. The host runs ahead of the GPU through
    a pass, so the pass takes the longer of the two — except that a dropless
    MoE layer's forward waits for the GPU (host.syncs_every_moe_layer), so
    then each layer's forward takes the longer of its own host and GPU
    (kernels and exposed communication) times."""
    host_fwd = {kind: layers.layer_host_s(shape, gpu, kind) for kind, _ in kinds}
    host_bwd = sum(count * layers.layer_host_s(shape, gpu, kind, backward=True) for kind, count in kinds)
    exposed_bwd = max(0.0, host_bwd - gpu_bwd_s)
    if not (any("moe" in SUBLAYERS[kind] for kind, _ in kinds) and host.syncs_every_moe_layer(shape)):
        return max(0.0, sum(count * host_fwd[kind] for kind, count in kinds) - gpu_fwd_s), exposed_bwd
    return sum(count * max(0.0, host_fwd[kind] - layers.decoder_layer(shape, gpu, kind=kind).total_s - comm_per_layer_s)
               for kind, count in kinds), exposed_bwd


def _recompute(shape: Shape, layout: Layout, chunk: Chunk, gpu: GPU) -> tuple[PassTime, float, float]:
    """What recomputation re-runs in one micro batch through ``chunk``, and
    the share of the chunk's forward TP collectives and of its MoE
    all-to-alls that run again with it. Full recompute re-runs the forward
    of its layers (every layer, or the first N of the chunk: megatron-core's
    uniform and block methods), collectives included; selective re-runs its
    modules' kernels (compute.recomputed_forward): the dense MLP half of a
    layer's TP collectives with mlp, an MoE layer's dispatch and combine with moe."""
    n, model = chunk.num_layers, shape.model
    n_moe = model.moe_layers_in(chunk.first_layer, n)
    full = layout.fully_recomputed(n)
    if full:
        full_moe = model.moe_layers_in(chunk.first_layer, full)
        recompute = _layers(shape, gpu, model.layer_kinds_in(chunk.first_layer, full), backward=False)
        if chunk.vision and full == n:
            recompute = recompute + layers.vision_tower(shape, gpu)
        return recompute, full / n, full_moe / n_moe if n_moe else 0.0
    modules = layout.selective_modules
    if not modules or not n:
        return PassTime(), 0.0, 0.0
    recompute = PassTime()
    for kind, count in model.layer_kinds_in(chunk.first_layer, n):
        recompute = recompute + recomputed_forward(shape, gpu, modules, kind).scaled(count)
    if modules == (OP_SAC,):
        # Every all-gather runs again; the reduce-scatters' outputs are kept
        # (torchtitan's _op_sac_save_list): half of each layer's collectives,
        # and the MoE dispatch and combine (not in the list) in full.
        return recompute, 0.5, float(n_moe > 0)
    sublayers = sum(count * len(SUBLAYERS[kind]) for kind, count in model.layer_kinds_in(chunk.first_layer, n))
    dense_mlps = model.sublayers_in(chunk.first_layer, n, "mlp")
    return recompute, dense_mlps / sublayers * ("mlp" in modules), float("moe" in modules and n_moe > 0)


def _layers(shape: Shape, gpu: GPU, kinds: tuple[tuple[str, int], ...], backward: bool) -> PassTime:
    """``kinds`` (kind, count) of decoder layers, one pass."""
    total = PassTime()
    for kind, count in kinds:
        total = total + layers.decoder_layer(shape, gpu, backward, kind).scaled(count)
    return total


def _mamba_context_parallel_s(shape: Shape, link: Link) -> float:
    """What context parallelism adds to one Mamba layer, forward: the
    all-to-alls from sequence to head shards of z, x, B, C and dt before the
    conv1d and scan, one at a time, and of y back after (megatron-core
    ssm/mamba_context_parallel.py pre_conv_ssm, post_conv_ssm), each on the
    layer's critical path; each rank's buffer is its own tokens' share.
    Backward runs the same in reverse."""
    mamba = shape.model.mamba
    group_state = mamba.num_groups * mamba.state_size
    widths = (mamba.inner_size, mamba.inner_size, group_state, group_state, mamba.num_heads, mamba.inner_size)
    return sum(all_to_all_s(shape.tokens * width / shape.tp * shape.act_bytes, shape.cp, link) for width in widths)


def pipeline_term_s(stage_s: list[float], layout: Layout) -> float:
    """The closed form's pipeline term of stages taking ``stage_s`` per micro
    batch: m * max(tau) + (sum(tau) - max(tau)) / v (module docstring)."""
    slowest = max(stage_s)
    return layout.num_microbatches * slowest + (sum(stage_s) - slowest) / layout.vpp


def _p2p_s(shape: Shape, layout: Layout, links: Links, chunk_fwd_s: float) -> float:
    """Exposed pipeline send/recv per step. The activation a stage sends is
    split over its TP ranks (SC'21's scatter/gather optimisation, or sequence
    parallelism). Plain 1F1B waits for every transfer: two per micro batch
    (activation forward, gradient backward). Interleaved 1F1B sends v times
    as often (SC'21 sec. 2.2.2) but overlaps each transfer with the next
    chunk's forward (Megatron's overlap_p2p_comm), so only what outlasts an
    average chunk's forward is exposed — except along the fill and drain path, 2 (p*v - 1)
    transfers that nothing hides."""
    if layout.pp == 1:
        return 0.0
    one = send_recv_s(shape.tokens * shape.model.hidden_size * shape.act_bytes / layout.tp, links.pp)
    if layout.vpp == 1:
        return 2 * (layout.num_microbatches + layout.pp - 1) * one
    steady = 2 * layout.num_microbatches * layout.vpp * max(0.0, one - chunk_fwd_s)
    return 2 * (layout.pp * layout.vpp - 1) * one + steady


@dataclass(frozen=True)
class DataParallelComm:
    """One stage's gradient reduce and parameter gather over DP x CP, whole."""

    reduce_s: float
    gather_s: float
    bucket_fraction: float  # of the stage's parameters in one DDP bucket
    # SM-seconds (in whole GPUs) NCCL's kernels hold while each runs (contention.py)
    reduce_held_s: float
    gather_held_s: float


def data_parallel_comm(job: Job, layout: Layout, stage: Stage, links: Links, gpu: GPU) -> DataParallelComm:
    """Dense parameters reduce over DP x CP; routed experts over expert data
    parallel, on their own group's link (Megatron's expert DDP buffers)."""
    params = stage_params(job.model, layout, stage)
    state = _state_bytes(job, layout)
    experts = StageParams(total=params.expert, linear=params.expert, expert=params.expert)
    dense = StageParams(total=params.total - params.expert, linear=params.linear - params.expert, expert=0.0)
    dense_reduce, dense_gather = _reduce_and_gather_s(job, layout, dense.total * state.grad, state.gathered_bytes(dense), layout.dp * layout.cp, links.dp)
    expert_reduce, expert_gather = _reduce_and_gather_s(job, layout, experts.total * state.grad, state.gathered_bytes(experts), layout.expert_dp, links.expert_dp)
    n = layout.dp * layout.cp
    dense_share, expert_share = contention.sm_share(links.dp, gpu), contention.sm_share(links.expert_dp, gpu)
    return DataParallelComm(
        reduce_s=dense_reduce + expert_reduce, gather_s=dense_gather + expert_gather,
        bucket_fraction=min(1.0, max(DDP_BUCKET_PARAMS, 1_000_000 * n) / params.total),
        reduce_held_s=dense_reduce * dense_share + expert_reduce * expert_share,
        gather_held_s=dense_gather * dense_share + expert_gather * expert_share,
    )


def _state_bytes(job: Job, layout: Layout) -> StateBytes:
    """Bytes per parameter of gradients and gathered weights (memory.StateBytes)."""
    return StateBytes.of(job.framework, job.precision, job.features, job.cluster.slowest.gpu, layout.distributed_optimizer,
                         layout.zero_stage, layout.fsdp)


def _reduce_and_gather_s(job: Job, layout: Layout, grad_bytes: float, gather_bytes: float, n: int, link: Link) -> tuple[float, float]:
    """The gradient reduce of ``grad_bytes`` and the parameter all-gather of
    ``gather_bytes`` (distributed optimizer or ZeRO) over ``n`` ranks."""
    if n == 1 or grad_bytes == 0:
        return 0.0, 0.0
    if sharding.reduces_every_microbatch(job.framework, layout):
        # ZeRO-2, sharded data parallelism and torchtitan's DDP reduce every
        # micro batch, and FSDP gathers before each layer (sharding.py).
        return 0.0, 0.0
    if layout.distributed_optimizer or layout.zero_stage >= 1:
        return reduce_scatter_s(grad_bytes, n, link), all_gather_s(gather_bytes, n, link)
    return all_reduce_s(grad_bytes, n, link), 0.0


def _exposed_gather_s(comm: DataParallelComm, job: Job, layout: Layout, forward_s: float) -> float:
    """The distributed optimizer's parameter all-gather overlaps the next
    step's first forward pass, ``forward_s`` on the stage: each bucket's
    forward pre-hook waits for its gather and issues the next bucket's
    (megatron-core distributed_data_parallel.py _make_forward_pre_hook,
    param_and_grad_buffer.py finish_param_sync), so the first bucket and
    whatever outlasts that forward are exposed."""
    if not (job.features.overlap_param_gather and layout.distributed_optimizer):
        return comm.gather_s
    return max(comm.gather_s * comm.bucket_fraction, comm.gather_s - forward_s)


def _embedding_sync_s(job: Job, layout: Layout, links: Links) -> float:
    """Tied embeddings: the first and last stages all-reduce their copies' gradients."""
    if layout.pp == 1 or not job.model.tied_embeddings:
        return 0.0
    word_embedding = job.model.vocab_size * job.model.hidden_size / layout.tp
    return all_reduce_s(word_embedding * _state_bytes(job, layout).grad, 2, links.embedding)


def reduce_overlaps_backward(job: Job, layout: Layout) -> bool:
    """Whether the data-parallel gradient reduce runs behind the backward:
    as ``overlap_grad_reduce`` says (Megatron's --overlap-grad-reduce,
    DeepSpeed ZeRO-1's overlap_comm, whose gradient hooks reduce buckets as
    they fill: stage_1_and_2.py create_gradient_handling_hooks), except
    under DeepSpeed without ZeRO, which all-reduces every gradient after the
    backward whatever its config says (engine.py _backward_epilogue ->
    allreduce_gradients -> buffered_allreduce_fallback), and under
    DeepSpeed's pipeline engine, which reduces only after its flush: its
    is_gradient_accumulation_boundary is true only inside _exec_reduce_grads,
    so ZeRO-1's hooks reduce nothing during the backward (pipe/engine.py)."""
    if job.framework == "deepspeed" and (layout.zero_stage == 0 or layout.pp > 1):
        return False
    return job.features.overlap_grad_reduce


def _exposed_reduce_s(comm: DataParallelComm, window_s: float, overlap: bool) -> float:
    """Buckets reduce while backward still runs (``window_s``); the last
    bucket (the first layers' gradients) cannot overlap."""
    if not overlap:
        return comm.reduce_s
    return max(comm.reduce_s * comm.bucket_fraction, comm.reduce_s - window_s)


def _accumulation_copies_s(job: Job, layout: Layout, stage: Stage, gpu: GPU) -> float:
    """DeepSpeed ZeRO-1/2 with offload and gradient accumulation copies the
    stage's gradients to the host and back every micro batch (offload.py)."""
    if not (job.framework == "deepspeed" and layout.optimizer_offload and layout.zero_stage <= 2 and layout.num_microbatches > 1):
        return 0.0
    return offload.accumulation_copies_s(stage_params(job.model, layout, stage).total, gpu, layout.num_microbatches)


def _optimizer_s(job: Job, layout: Layout, stage: Stage, gpu: GPU) -> float:
    """The optimizer step over this rank's shard: memory-bound on the GPU,
    or on the host with offload (offload.py)."""
    params = optimizer_partition(stage_params(job.model, layout, stage), layout)
    if layout.optimizer_offload:
        return offload.step_s(params, gpu, job.framework)
    if job.framework == "torchtitan":
        return memory_time_s(params * TORCHTITAN_OPTIMIZER_STEP_BYTES_PER_PARAM[job.features.fused_optimizer], gpu)
    return memory_time_s(params * OPTIMIZER_STEP_BYTES_PER_PARAM, gpu)


def _sharding_s(job: Job, layout: Layout, stage: Stage, gpu: GPU, links: Links, chunks: list[ChunkTime]) -> sharding.ShardingTime:
    """ZeRO-2 / ZeRO-3 / FSDP time of ``stage`` (sharding.time_s) behind its
    chunks' compute, with torchtitan FSDP2's copies in and out of its
    collectives' buffers on the compute stream (sharding.fsdp2_copy_bytes)
    and, under its pipeline, its fp32 gradient accumulation
    (sharding.fsdp2_accumulation_bytes)."""
    if not sharding.reduces_every_microbatch(job.framework, layout):
        return sharding.ShardingTime()
    params = stage_params(job.model, layout, stage)
    units = sharding_units(job.model, job.framework, layout, params, stage, _state_bytes(job, layout))
    shard = links.shard if layout.fsdp else links.dp
    sharding_links = sharding.ShardingLinks(shard=shard, replicate=links.replicate, expert_dp=links.expert_dp, host=offload.pcie_link(gpu))
    forward_s = sum(c.forward_s for c in chunks)
    time = sharding.time_s(job.framework, layout, units, sharding_links, gpu, forward_s, sum(c.total_s for c in chunks) - forward_s,
                           sharding.Overlap.of(job.framework, job.features, layout))
    if not (job.framework == "torchtitan" and layout.fsdp):
        return time
    grad_bytes = layers.shape_of(job, layout).act_bytes
    copies_s = memory_time_s(sharding.fsdp2_copy_bytes(layout, units, grad_bytes), gpu)
    if sharding.held_across_microbatches(job.framework, layout):
        # The accumulation runs in each micro batch's backward: its share of it per micro batch.
        accumulation_s = memory_time_s(sharding.fsdp2_accumulation_bytes(layout, units, grad_bytes), gpu) / layout.num_microbatches
        return replace(time, step_s=time.step_s + copies_s, microbatch_s=time.microbatch_s + accumulation_s)
    return replace(time, microbatch_s=time.microbatch_s + copies_s)


@dataclass(frozen=True)
class StepParts:
    """What a step is made of, before the schedule puts it together."""

    job: Job
    layout: Layout
    chunks: list[list[ChunkTime]]  # per stage, in virtual-stage order
    sharded: list[sharding.ShardingTime]  # per stage
    offload_s: list[float]  # per stage, per micro batch (DeepSpeed's offloaded gradient accumulation)
    p2p_one_s: float  # one activation (or gradient) transfer between stages
    dp: list[DataParallelComm]  # per stage
    optimizer_s: list[float]  # per stage
    embedding_sync_s: float
    p2p_exposed_s: float  # the closed form's estimate of exposed send/recv

    @property
    def stage_kernels(self) -> tuple[PassTime, ...]:
        """Each stage's compute kernels over the whole step (all micro
        batches), by kind, as a trace times them: its GEMMs and attention
        slowed by the collectives beside them (stage_contention_s), in
        proportion."""
        m, kernels = self.layout.num_microbatches, []
        for chunks, (microbatch_s, once_s) in zip(self.chunks, self.stage_contention_s):
            total = sum((c.kernels for c in chunks), PassTime()).scaled(m)
            compute_s = total.gemm_s + total.attention_s
            slowed = 1 + (m * microbatch_s + once_s) / compute_s if compute_s else 1.0
            kernels.append(PassTime(gemm_s=total.gemm_s * slowed, attention_s=total.attention_s * slowed, elementwise_s=total.elementwise_s))
        return tuple(kernels)

    @property
    def stage_tp_busy_s(self) -> tuple[float, ...]:
        """Each stage's TP collectives over the whole step, before any overlap."""
        return tuple(self.layout.num_microbatches * sum(c.tp_busy_s for c in chunks) for chunks in self.chunks)

    @property
    def tau_s(self) -> list[float]:
        """One micro batch through all chunks of each stage."""
        return [sum(c.total_s for c in chunks) + z.microbatch_s + z.contention_microbatch_s + o
                for chunks, z, o in zip(self.chunks, self.sharded, self.offload_s)]

    @property
    def reduce_windows_s(self) -> list[float]:
        """Per stage, the compute its gradient reduce hides behind: its last
        backward and the cool-down of the stages after it."""
        return [sum(c.backward_s for c in chunks) * (1 + s) for s, chunks in enumerate(self.chunks)]

    @property
    def cooldown_s(self) -> list[float]:
        """Per stage, how long after its last backward the step's last one
        ends, which a torchtitan stage's reduce after its last backward
        (ShardingTime.after_backward_s) hides behind: under 1F1B stage s ends
        s backwards before stage 0. Under interleaving none: each model
        chunk's reduce makes the rank's compute stream wait for it (torch
        2.13 stage.py perform_reduce_grad -> _root_post_backward_final_callback
        -> _fsdp_param_group.py finalize_backward) while its other chunks
        still have backwards to run."""
        if self.layout.vpp > 1:
            return [0.0] * len(self.chunks)
        return [sum(c.backward_s for c in chunks) * s for s, chunks in enumerate(self.chunks)]

    @property
    def stage_contention_s(self) -> list[tuple[float, float]]:
        """Per stage, (per micro batch, once per step) seconds the
        collectives hidden behind its compute cost it (contention.py): its
        chunks' MoE all-to-alls and sharded data parallelism's per micro
        batch; sharding's once-per-step collectives, the gradient reduce
        that overlaps backward (beyond its closed-form exposure) and the
        parameter gather the next forward hides, once."""
        job, layout = self.job, self.layout
        overlap = reduce_overlaps_backward(job, layout)
        found = []
        for chunks, z, d, window in zip(self.chunks, self.sharded, self.dp, self.reduce_windows_s):
            reduce_exposed = _exposed_reduce_s(d, window, overlap)
            reduce = contention.slowdown_s(d.reduce_s, d.reduce_held_s, d.reduce_s - reduce_exposed,
                                           max(0.0, reduce_exposed - d.reduce_s * d.bucket_fraction))
            gather_exposed = _exposed_gather_s(d, job, layout, sum(c.forward_s for c in chunks))
            gather = contention.slowdown_s(d.gather_s, d.gather_held_s, d.gather_s - gather_exposed,
                                           max(0.0, gather_exposed - d.gather_s * d.bucket_fraction))
            found.append((sum(c.contention_s for c in chunks) + z.contention_microbatch_s, z.contention_step_s + reduce + gather))
        return found

    def breakdown_s(self, pipeline_s: float, dp_grad_reduce_s: float, pp_comm_s: float) -> dict[str, float]:
        """Where the step goes, with the pipeline's length, the send/recv time
        it exposes and the exposed gradient reduce coming from the closed form
        or the simulator. The pipeline's time is the slowest stage's work,
        the exposed send/recv, and the rest of that stage's idle time: the
        pipeline bubble (warm-up, cool-down and waiting for other stages)."""
        tau, slowed = self.tau_s, self.stage_contention_s
        slowest = max(range(len(tau)), key=lambda s: tau[s])
        m, chunks = self.layout.num_microbatches, self.chunks[slowest]
        work = {
            "compute_forward": m * sum(c.compute_fwd_s for c in chunks),
            "compute_backward": m * sum(c.compute_bwd_s for c in chunks),
            "recompute": m * sum(c.recompute_s for c in chunks),
            "tp_comm": m * sum(c.tp_comm_s for c in chunks),
            "cp_comm": m * sum(c.cp_comm_s for c in chunks),
            "ep_comm": m * sum(c.ep_comm_s for c in chunks),
            "host_overhead": m * sum(c.host_s for c in chunks),
            "overlap_contention": m * slowed[slowest][0],
            "sharding_comm": m * self.sharded[slowest].microbatch_s,
            "offload_copies": m * self.offload_s[slowest],
        }
        # Nothing sharded (torchtitan's DDP): each micro batch's all-reduce is
        # data parallelism's gradient reduce, not sharding's.
        ddp_s = work["sharding_comm"] if not self.layout.fsdp and self.layout.grad_shards == 1 else 0.0
        work["sharding_comm"] -= ddp_s
        idle_s = max(0.0, pipeline_s - sum(work.values()) - ddp_s)
        p2p_s = min(pp_comm_s, idle_s)
        return {
            **work,
            "pp_comm": p2p_s,
            "pipeline_bubble": idle_s - p2p_s,
            "dp_grad_reduce": dp_grad_reduce_s + ddp_s,
            "sharding_comm_once": max(z.step_s + max(0.0, z.after_backward_s - cooldown) for z, cooldown in zip(self.sharded, self.cooldown_s)),
            "overlap_contention": work["overlap_contention"] + max(once for _, once in slowed),
            "dp_param_gather": max(_exposed_gather_s(d, self.job, self.layout, sum(c.forward_s for c in chunks))
                                   for d, chunks in zip(self.dp, self.chunks)),
            "embedding_sync": self.embedding_sync_s,
            "optimizer": max(self.optimizer_s),
        }


# A chunk's time depends on its layout only through what chunk_time reads:
# the shape (tp, cp, ep, etp, micro batch, sequence parallelism, features),
# the recompute settings and the TP, CP, EP and ETP links; DP, PP, sharding
# and the optimizer do not enter it. Chunks with the same layers' kinds (all
# but the first and last, usually) cost the same; full recompute of a
# chunk's first N layers re-runs those N layers' kinds.
_CHUNK_TIMES: Memo[ChunkTime] = Memo()


def _chunk_time_memo(shape: Shape, layout: Layout, chunk: Chunk, gpu: GPU, links: Links, job: Job) -> ChunkTime:
    """chunk_time, shared by the layouts that agree on what it reads."""
    model = shape.model
    again = model.layer_kinds_in(chunk.first_layer, layout.recompute_num_layers) if layout.recompute_num_layers else ()
    paired = paired_share(layout) if job.features.overlap_moe_expert_parallel_comm else None
    key = (shape, job.framework, paired, layout.recompute, layout.recompute_num_layers, layout.selective_modules,
           model.layer_kinds_in(chunk.first_layer, chunk.num_layers), again, chunk.embedding, chunk.head, chunk.vision, gpu,
           links.tp, links.cp, links.ep, links.ep_remote_share, links.etp)
    return _CHUNK_TIMES.get(key, lambda: chunk_time(shape, layout, chunk, gpu, links, job))


T = TypeVar("T")


def _per_stage_kind(model: ModelSpec, stages: list[Stage], gpus: list[GPU], price: Callable[[Stage, GPU], T]) -> list[T]:
    """``price(stage, gpu)`` of each stage, computed once per kind of stage:
    stages alike in their layers (stage_signature) on one kind of GPU cost
    the same."""
    priced: dict[tuple, T] = {}
    found = []
    for stage, gpu in zip(stages, gpus):
        kind = (stage_signature(model, stage), gpu.kind)
        if kind not in priced:
            priced[kind] = price(stage, gpu)
        found.append(priced[kind])
    return found


def step_parts(job: Job, layout: Layout, stages: list[Stage], gpus: list[GPU], placement: Placement | None = None) -> StepParts:
    """Price every piece of a step of ``layout``, stage s on GPUs ``gpus[s]``,
    its groups on the links ``placement`` gives them (default: Megatron's order)."""
    shape = layers.shape_of(job, layout)
    links = Links.of(job, layout, placement)

    def stage_costs(stage: Stage, gpu: GPU) -> tuple:
        chunks = [_chunk_time_memo(shape, layout, chunk, gpu, links, job) for chunk in stage.chunks]
        return (chunks, _sharding_s(job, layout, stage, gpu, links, chunks), _accumulation_copies_s(job, layout, stage, gpu),
                data_parallel_comm(job, layout, stage, links, gpu), _optimizer_s(job, layout, stage, gpu))

    costs = _per_stage_kind(job.model, stages, gpus, stage_costs)
    chunks = [list(chunk_times) for chunk_times, *_ in costs]
    all_chunks = [c for cs in chunks for c in cs]
    return StepParts(
        job=job,
        layout=layout,
        chunks=chunks,
        sharded=[sharded for _, sharded, *_ in costs],
        offload_s=[offload_s for _, _, offload_s, _, _ in costs],
        p2p_one_s=send_recv_s(shape.tokens * job.model.hidden_size * shape.act_bytes / layout.tp, links.pp) if layout.pp > 1 else 0.0,
        dp=[dp for *_, dp, _ in costs],
        optimizer_s=[optimizer_s for *_, optimizer_s in costs],
        embedding_sync_s=_embedding_sync_s(job, layout, links),
        p2p_exposed_s=_p2p_s(shape, layout, links, sum(c.compute_fwd_s for c in all_chunks) / len(all_chunks)),
    )


def closed_form_step(parts: StepParts) -> StepTime:
    """The step by formula: pipeline m * max(tau) + (sum(tau) - max(tau)) / v
    plus exposed send/recv, and each stage's gradient reduce hidden behind its
    last backward and the cool-down of the stages after it. Exact for equal
    stages; the search prunes with it and ranks its best with the simulator."""
    layout, tau = parts.layout, parts.tau_s
    overlap = reduce_overlaps_backward(parts.job, layout)
    reduce = max(_exposed_reduce_s(d, w, overlap) for d, w in zip(parts.dp, parts.reduce_windows_s))
    breakdown = parts.breakdown_s(pipeline_term_s(tau, layout) + parts.p2p_exposed_s, reduce, parts.p2p_exposed_s)
    return StepTime(step_time_s=sum(breakdown.values()), breakdown_s=breakdown, stage_microbatch_s=tuple(tau))


def hideable_s(timing: StepTime) -> float:
    """Of a closed-form step, what the simulated one (cost/simulated_step.py)
    may hide behind other stages' work: the send/recv and the gradient
    reduce the closed form exposes, and the optimizer (the slowest stage's
    in the closed form; in the simulation each stage steps once its own
    pipeline work is done, so only the last stage to finish adds its own)."""
    return timing.breakdown_s["pp_comm"] + timing.breakdown_s["dp_grad_reduce"] + timing.breakdown_s["optimizer"]


def step_lower_bound_s(job: Job, layout: Layout) -> float:
    """Seconds no split, placement or overlap, nor any of Megatron's
    schedules, can take a step of ``layout`` below, closed form or
    simulated, at a fraction of pricing
    it: the least pipeline time of any split (_split_pipeline_floor_s) of
    every decoder layer's forward and backward kernels, each kind of layer
    on whichever of the cluster's GPUs runs it fastest.
    Valid because chunk_time adds only non-negative terms (recompute,
    exposed communication and host time, the embedding and head) to those
    kernels, that floor grows with the work, and the step's other parts are
    non-negative (closed_form_step, simulated_step)."""
    shape = layers.shape_of(job, layout)
    per_microbatch_s = _LAYER_KERNELS.get((shape, job.cluster.gpu_types), lambda: _layer_kernels_s(shape, job.cluster.gpu_types))
    return _split_pipeline_floor_s(per_microbatch_s, layout)


def layer_rates_s(job: Job, layout: Layout, gpus: list[GPU]) -> dict[GPU, float]:
    """Per GPU of ``gpus``, the least one decoder layer adds to a stage's
    time per micro batch on it (its chunk time, forward, backward and
    recompute, at the cheapest of the model's kinds of layer), whatever the
    split: chunk_time adds up layer by layer. Not for layouts that recompute
    the first N layers of each chunk, whose layers cost what their place in
    the chunk says."""
    model, shape, links = job.model, layers.shape_of(job, layout), Links.of(job, layout)
    firsts = {model.layer_kind(layer): layer for layer in reversed(range(model.num_layers))}
    return {gpu: min(_chunk_time_memo(shape, layout, Chunk(first, 1), gpu, links, job).total_s for first in firsts.values())
            for gpu in dict.fromkeys(gpus)}


def mixed_split_floor_s(job: Job, layout: Layout, gpus: list[GPU]) -> float | None:
    """The least pipeline time any schedule of any split of the model's L
    layers reaches over stages on ``gpus`` of different speeds, stage s
    taking at least r_s a layer (layer_rates_s): the slowest stage is no
    faster than the continuous split that evens them out, T = L / sum(1 / r),
    so the pipeline takes at least m T; and all of them take no less than
    every layer on the fastest, W = L min r, whose least pipeline time under
    any split is _split_pipeline_floor_s(W). None on GPUs of one kind (the
    stages' total work is then the same under any split) or when the layout
    recomputes the first N layers of each chunk."""
    if len(set(gpus)) == 1 or layout.recompute_num_layers:
        return None
    rates = layer_rates_s(job, layout, gpus)
    num_layers = job.model.num_layers
    slowest = num_layers / sum(1 / rates[gpu] for gpu in gpus)
    work = num_layers * min(rates.values())
    return max(layout.num_microbatches * slowest, _split_pipeline_floor_s(work, layout))


def _split_pipeline_floor_s(work_s: float, layout: Layout) -> float:
    """The least pipeline time any schedule of any split of ``work_s``
    seconds per micro batch over ``layout``'s stages reaches
    (schedule/simulate.py split_pipeline_floor_s)."""
    return split_pipeline_floor_s(work_s, layout.pp, layout.vpp, layout.num_microbatches)


# Every layer's kernels for one micro batch read the shape and the GPUs only.
_LAYER_KERNELS: Memo[float] = Memo()


def _layer_kernels_s(shape: Shape, gpus: tuple[GPU, ...]) -> float:
    """Every decoder layer's forward and backward kernels for one micro
    batch of ``shape``, each kind of layer on whichever of ``gpus`` runs it fastest."""
    return sum(count * min(layers.decoder_layer(shape, gpu, False, kind).total_s + layers.decoder_layer(shape, gpu, True, kind).total_s
                           for gpu in gpus)
               for kind, count in shape.model.layer_kinds_in(0, shape.model.num_layers))


def chunk_bounds_s(job: Job, layout: Layout, stages: list[Stage], gpus: list[GPU]) -> tuple[float, float]:
    """Seconds a step of ``layout`` cannot go below, at a part of pricing
    it: on ``stages`` (stage s on ``gpus[s]``, Megatron's placement), and
    under any split of its layers. Both from its chunks' times alone, tau'_s
    per stage, which the step's tau_s only adds sharding and offload time to.

    On these stages: the pipeline term m * max(tau') + (sum(tau') - max(tau')) / v;
    the closed-form step is at least its pipeline term (closed_form_step:
    work, exposed send/recv and bubble, plus non-negative terms). Under any
    split and schedule, closed form or simulated (split_bound_s, which keeps
    the stages' total work W): the least pipeline time of any split of
    W' = sum(tau') (_split_pipeline_floor_s). Tighter than step_lower_bound_s by the exposed
    communication, host time, recomputation and the embedding and head;
    the chunk times are the ones step_time reads (_chunk_time_memo). On
    GPUs of different speeds a split moves work to the faster ones, so W is
    no constant there: mixed_split_floor_s bounds it instead."""
    tau = chunk_stage_times_s(job, layout, stages, gpus)
    mixed = mixed_split_floor_s(job, layout, gpus)  # a split moves work to the faster GPUs: W is no constant
    return pipeline_term_s(tau, layout), _split_pipeline_floor_s(sum(tau), layout) if mixed is None else mixed


def chunk_stage_times_s(job: Job, layout: Layout, stages: list[Stage], gpus: list[GPU]) -> list[float]:
    """tau'_s: each stage's chunks' times for one micro batch (forward,
    backward, recompute, exposed TP/CP/EP communication, host time), stage s
    on ``gpus[s]``: the step's tau_s without the sharding and offload time a
    stage's parameters add. On GPUs of one kind their sum is the same under
    any split of the layers, except that a chunk's exposed TP and host time
    is a maximum taken over the chunk (chunk_time), which a split may
    shift: the search's split bounds take it as fixed."""
    shape, links = layers.shape_of(job, layout), Links.of(job, layout)

    def stage_s(stage: Stage, gpu: GPU) -> float:
        return sum(_chunk_time_memo(shape, layout, chunk, gpu, links, job).total_s for chunk in stage.chunks)

    return _per_stage_kind(job.model, stages, gpus, stage_s)


def step_time(job: Job, layout: Layout, stages: list[Stage], gpus: list[GPU], placement: Placement | None = None) -> StepTime:
    """Predict one optimizer step of ``layout`` by the closed form."""
    return closed_form_step(step_parts(job, layout, stages, gpus, placement))
