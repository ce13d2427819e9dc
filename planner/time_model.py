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

from dataclasses import dataclass

from loom.planner import compute
from loom.planner.collectives import Link, all_gather_s, all_reduce_s, reduce_scatter_s, send_recv_s
from loom.planner.compute import ACT_BYTES, PassTime, Shape
from loom.planner.efficiency import memory_time_s
from loom.planner.job import Job
from loom.planner.layout import Layout
from loom.planner.memory import GRAD_BYTES, WEIGHT_BYTES, stage_params
from loom.planner.network import group_link, pipeline_link
from loom.planner.stages import Chunk, Stage
from loom.profiles.catalogue import GPU

# Megatron's DDP bucket: max(40M, 1M x dp) parameters (megatron/core/distributed/
# distributed_data_parallel.py). The last bucket's reduce cannot overlap backward.
DDP_BUCKET_PARAMS = 40_000_000
# Adam's step is memory-bound: read fp32 master, m, v and grad (16 B), write
# master, m, v (12 B) and the 16-bit weight (2 B), plus reading the grads once
# more for the global norm used by gradient clipping (4 B).
OPTIMIZER_STEP_BYTES_PER_PARAM = 34


@dataclass(frozen=True)
class StepTime:
    step_time_s: float
    breakdown_s: dict[str, float]
    stage_microbatch_s: tuple[float, ...]  # tau_s: one micro batch, all chunks of stage s


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

    @property
    def total_s(self) -> float:
        return self.compute_fwd_s + self.compute_bwd_s + self.recompute_s + self.tp_comm_s + self.cp_comm_s

    @property
    def forward_s(self) -> float:
        return self.compute_fwd_s + self.tp_comm_fwd_s + self.cp_comm_fwd_s

    @property
    def backward_s(self) -> float:
        return self.total_s - self.forward_s


class Links:
    """The link each parallel group of the layout talks over."""

    def __init__(self, job: Job, layout: Layout):
        node = job.cluster.slowest
        self.tp = group_link(node, layout.tp, 1)
        self.cp = group_link(node, layout.cp, layout.tp)
        self.dp = group_link(node, layout.dp * layout.cp, layout.tp)
        stage_ranks = layout.tp * layout.cp * layout.dp
        self.pp = pipeline_link(node, stage_ranks, layout.pp)
        self.embedding = pipeline_link(node, stage_ranks * (layout.pp - 1), 2) if layout.pp > 1 else self.pp


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
    features, n = job.features, chunk.num_layers
    fwd_layer = compute.decoder_layer(shape, gpu)
    bwd_layer = compute.decoder_layer(shape, gpu, backward=True)
    fwd, bwd = fwd_layer.scaled(n), bwd_layer.scaled(n)
    if chunk.embedding:
        fwd, bwd = fwd + compute.embedding(shape, gpu), bwd + compute.embedding(shape, gpu, backward=True)
    if chunk.head:
        fwd, bwd = fwd + compute.head(shape, gpu), bwd + compute.head(shape, gpu, backward=True)
    if chunk.vision:
        fwd, bwd = fwd + compute.vision_tower(shape, gpu), bwd + compute.vision_tower(shape, gpu, backward=True)

    recompute = PassTime()
    if layout.recompute == "full":
        recompute = fwd_layer.scaled(n)
    elif layout.recompute == "selective":
        recompute = compute.attention_core(shape, gpu).scaled(n)

    # TP: two collectives per layer forward and two backward (Megatron's f/g
    # operators), again forward under full recompute; one each for the
    # embedding and the LM head. TE's --tp-comm-overlap hides them behind GEMMs.
    activation_bytes = shape.tokens * shape.model.hidden_size * ACT_BYTES
    per_layer_tp = _tp_collectives_s(activation_bytes, layout, links.tp, 2)
    fwd_tp = per_layer_tp * n + _tp_collectives_s(activation_bytes, layout, links.tp, chunk.embedding + chunk.head)
    if chunk.vision:
        vision = shape.vision()
        patch_bytes = vision.tokens * vision.model.hidden_size * ACT_BYTES
        fwd_tp += _tp_collectives_s(patch_bytes, layout, links.tp, 2) * vision.model.num_layers
    tp_passes = 2 + (layout.recompute == "full")
    tp_fwd = _exposed(fwd_tp, fwd_layer.gemm_s * n, features.tp_comm_overlap)

    # CP: ring attention passes K and V chunks cp - 1 times forward (and K, V,
    # dK, dV backward), overlapped with the attention blocks being computed.
    cp_fwd, cp_bwd = 0.0, 0.0
    if layout.cp > 1:
        kv_bytes = 2 * shape.tokens * shape.model.kv_size / layout.tp * ACT_BYTES
        ring_s = (layout.cp - 1) * send_recv_s(kv_bytes, links.cp)
        core_fwd = compute.attention_core(shape, gpu).total_s
        core_bwd = compute.attention_core(shape, gpu, backward=True).total_s
        cp_fwd, cp_bwd = n * max(0.0, ring_s - core_fwd), n * max(0.0, 2 * ring_s - core_bwd)
    # Weight- and input-gradient GEMMs have the same FLOPs (dW = X^T dY,
    # dX = dY W^T): half the backward GEMM time is the weight gradient.
    return ChunkTime(
        compute_fwd_s=fwd.total_s, compute_bwd_s=bwd.total_s, recompute_s=recompute.total_s,
        tp_comm_s=tp_fwd * tp_passes, cp_comm_s=cp_fwd + cp_bwd, tp_comm_fwd_s=tp_fwd, cp_comm_fwd_s=cp_fwd,
        weight_grad_s=bwd.gemm_s / 2,
    )


def _pipeline_s(stage_s: list[float], layout: Layout) -> float:
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
    one = send_recv_s(shape.tokens * shape.model.hidden_size * ACT_BYTES / layout.tp, links.pp)
    if layout.vpp == 1:
        return 2 * (layout.num_microbatches + layout.pp - 1) * one
    steady = 2 * layout.num_microbatches * layout.vpp * max(0.0, one - chunk_fwd_s)
    return 2 * (layout.pp * layout.vpp - 1) * one + steady


def _data_parallel_s(job: Job, layout: Layout, stages: list[Stage], links: Links, bwd_s: list[float]) -> dict[str, float]:
    """Exposed gradient reduction and parameter gather over DP x CP, per step."""
    features, n = job.features, layout.dp * layout.cp
    grad_exposed, gather_exposed, embedding_sync = 0.0, 0.0, 0.0
    if n > 1:
        for stage, bwd in zip(stages, bwd_s):
            params, _ = stage_params(job.model, layout, stage)
            grad_bytes = params * GRAD_BYTES[job.framework]
            sharded = layout.distributed_optimizer or layout.zero_stage >= 1
            if sharded:
                # ZeRO-2/3 reduce every micro batch and ZeRO-3 never gathers
                # after the step (see _zero_microbatch_comm_s).
                reduce = reduce_scatter_s(grad_bytes, n, links.dp) if layout.zero_stage < 2 else 0.0
                gather = all_gather_s(params * WEIGHT_BYTES, n, links.dp) if layout.zero_stage < 3 else 0.0
            else:
                reduce, gather = all_reduce_s(grad_bytes, n, links.dp), 0.0
            bucket_fraction = min(1.0, max(DDP_BUCKET_PARAMS, 1_000_000 * n) / params)
            # Buckets reduce during the last micro batch's backward; stage s also
            # has the s later-finishing stages' cool-down to hide behind.
            window = bwd * (1 + stage.index) if features.overlap_grad_reduce else 0.0
            grad_exposed = max(grad_exposed, max(reduce * bucket_fraction, reduce - window))
            # The parameter all-gather of the distributed optimizer overlaps the
            # next step's forward, all but its first bucket.
            overlap_gather = features.overlap_param_gather and layout.distributed_optimizer
            gather_exposed = max(gather_exposed, gather * bucket_fraction if overlap_gather else gather)
    if layout.pp > 1 and job.model.tied_embeddings:
        word_embedding = job.model.vocab_size * job.model.hidden_size / layout.tp
        embedding_sync = all_reduce_s(word_embedding * GRAD_BYTES[job.framework], 2, links.embedding)
    return {"dp_grad_reduce": grad_exposed, "dp_param_gather": gather_exposed, "embedding_sync": embedding_sync}


def _zero_microbatch_comm_s(job: Job, layout: Layout, stage: Stage, links: Links, microbatch_s: float) -> float:
    """Exposed ZeRO-2/3 communication per micro batch. ZeRO-2 reduce-scatters
    the gradients of every micro batch into their partitions; ZeRO-3 also
    gathers every weight forward and backward (Rajbhandari et al. 2020, sec.
    5 and 7.2.2). Both overlap compute, but the first layer's gather of each
    pass cannot be prefetched."""
    if layout.zero_stage < 2:
        return 0.0
    params, _ = stage_params(job.model, layout, stage)
    n = layout.dp * layout.cp
    comm = reduce_scatter_s(params * GRAD_BYTES[job.framework], n, links.dp)
    unhidden = 0.0
    if layout.zero_stage >= 3:
        gather = all_gather_s(params * WEIGHT_BYTES, n, links.dp)
        comm += 2 * gather
        unhidden = 2 * gather / max(1, stage.num_layers)
    return max(unhidden, comm - microbatch_s)


def step_time(job: Job, layout: Layout, stages: list[Stage], gpus: list[GPU]) -> StepTime:
    """Predict one optimizer step of ``layout`` on ``job``'s cluster, stage s
    running on GPUs of type ``gpus[s]``."""
    shape = Shape.of(job.model, layout, job.seq_length, job.precision, job.features)
    links = Links(job, layout)
    # Stages with the same chunk sizes (all but the first and last, usually)
    # cost the same: price each kind once.
    memo: dict[tuple, ChunkTime] = {}

    def priced(chunk: Chunk, gpu: GPU) -> ChunkTime:
        kind = (chunk.num_layers, chunk.embedding, chunk.head, chunk.vision, gpu.name)
        if kind not in memo:
            memo[kind] = chunk_time(shape, layout, chunk, gpu, links, job)
        return memo[kind]

    per_stage = [[priced(chunk, gpu) for chunk in stage.chunks] for stage, gpu in zip(stages, gpus)]
    tau = [sum(c.total_s for c in chunks) for chunks in per_stage]
    tau = [t + _zero_microbatch_comm_s(job, layout, stage, links, t) for t, stage in zip(tau, stages)]
    pipeline = _pipeline_s(tau, layout)
    all_chunks = [c for chunks in per_stage for c in chunks]
    p2p = _p2p_s(shape, layout, links, sum(c.compute_fwd_s for c in all_chunks) / len(all_chunks))

    slowest = max(range(len(stages)), key=lambda s: tau[s])
    m = layout.num_microbatches
    chunks = per_stage[slowest]
    breakdown = {
        "compute_forward": m * sum(c.compute_fwd_s for c in chunks),
        "compute_backward": m * sum(c.compute_bwd_s for c in chunks),
        "recompute": m * sum(c.recompute_s for c in chunks),
        "tp_comm": m * sum(c.tp_comm_s for c in chunks),
        "cp_comm": m * sum(c.cp_comm_s for c in chunks),
        "zero_comm": m * (tau[slowest] - sum(c.total_s for c in chunks)),
        "pp_comm": p2p,
        "pipeline_bubble": pipeline - m * tau[slowest],
    }
    bwd_last = [sum(c.compute_bwd_s + c.recompute_s + c.tp_comm_s / 2 for c in cs) for cs in per_stage]
    breakdown.update(_data_parallel_s(job, layout, stages, links, bwd_last))
    breakdown["optimizer"] = max(
        memory_time_s(stage_params(job.model, layout, stage)[0] / layout.optimizer_shards * OPTIMIZER_STEP_BYTES_PER_PARAM, gpu)
        for stage, gpu in zip(stages, gpus)
    )
    return StepTime(step_time_s=sum(breakdown.values()), breakdown_s=breakdown, stage_microbatch_s=tuple(tau))
