"""Pipeline stages and the default placement of ranks on GPUs.

Megatron orders global ranks ``tp-cp-ep-dp-pp`` (RankGenerator): rank =
tp_i + tp*(cp_i + cp*(dp_i + dp*pp_i)) for dense models (ep = 1). So pipeline
stage s owns the contiguous block of ranks [s*n, (s+1)*n), n = tp*cp*dp, and
the default placement puts rank r on node r // gpus_per_node, GPU r % gpus_per_node.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

from loom.planner.specs.cluster import Cluster
from loom.planner.specs.layout import Layout
from loom.planner.specs.model import ModelSpec
from loom.profiles.catalogue import GPU


@dataclass(frozen=True)
class Chunk:
    """The layers one virtual stage (model chunk) runs: decoder layers
    [first_layer, first_layer + num_layers), plus the embedding (and a vision
    tower, if the model has one) on the very first chunk and the final norm,
    LM head and loss on the very last."""

    first_layer: int
    num_layers: int
    embedding: bool = False
    head: bool = False
    vision: bool = False


@dataclass(frozen=True)
class Stage:
    index: int
    chunks: tuple[Chunk, ...]  # vpp chunks, in virtual-stage order
    ranks: range  # global ranks of this stage's device group (a range: cheap to hash in the search's memos)

    @property
    def num_layers(self) -> int:
        return sum(chunk.num_layers for chunk in self.chunks)

    @property
    def embedding(self) -> bool:
        return any(chunk.embedding for chunk in self.chunks)

    @property
    def head(self) -> bool:
        return any(chunk.head for chunk in self.chunks)

    @property
    def vision(self) -> bool:
        return any(chunk.vision for chunk in self.chunks)

    @functools.cached_property
    def _signatures(self) -> dict[ModelSpec, tuple]:
        return {}  # stage_signature per model (stages are built once per shape and asked for it again and again)


@functools.cache
def even_chunk_sizes(num_layers: int, chunks: int) -> tuple[int, ...]:
    """Decoder layers per chunk, as even as possible. A remainder goes to the
    middle chunks: the first and last already carry the embedding and the LM
    head. With ``chunks`` dividing ``num_layers`` this is Megatron's default split."""
    base, extra = divmod(num_layers, chunks)
    ends = {0, chunks - 1}
    # Middle chunks first, the most central first; the ends last.
    order = sorted(range(chunks), key=lambda c: (c in ends, abs(c - (chunks - 1) / 2), c))
    bonus = set(order[:extra])
    return tuple(base + (c in bonus) for c in range(chunks))


def split_stages(layout: Layout, chunk_sizes: tuple[int, ...], vision: bool = False) -> list[Stage]:
    """Stages from decoder layers per model chunk, in model order (pp * vpp
    entries). With interleaving, pipeline rank s runs chunks s, s + pp,
    s + 2pp, ... (Narayanan et al. SC'21, sec. 2.2). Stage s owns the block
    of global ranks [s*n, (s+1)*n), n = tp*cp*dp, of Megatron's rank order."""
    assert len(chunk_sizes) == layout.pp * layout.vpp, "one size per model chunk"
    return list(_stages(layout.pp, layout.vpp, layout.tp * layout.cp * layout.dp, tuple(chunk_sizes), vision))


def uniform_stages(model: ModelSpec, layout: Layout) -> list[Stage]:
    """Megatron's default split (as even as possible when it does not divide)."""
    return split_stages(layout, even_chunk_sizes(model.num_layers, layout.pp * layout.vpp), vision=model.vision is not None)


@functools.cache
def front_loaded_stage_sizes(num_layers: int, stages: int) -> tuple[int, ...]:
    """Decoder layers per stage as DeepSpeed's PipelineModule splits them
    with ``partition_method="type:<decoder layer class>"``: balanced by count,
    a remainder on the first stages (deepspeed/runtime/utils.py
    partition_balanced over 0/1 weights, the embedding on the first stage and
    the head on the last; tests/test_deepspeed.py checks it against DeepSpeed's own)."""
    base, extra = divmod(num_layers, stages)
    return tuple(base + (s < extra) for s in range(stages))


def default_stages(model: ModelSpec, layout: Layout, framework: str) -> list[Stage]:
    """The split ``framework`` runs when loom's planned split is the even
    one: DeepSpeed's PipelineModule's (front_loaded_stage_sizes: it takes no
    stage boundaries), else uniform_stages (Megatron's default, and what
    loom writes for Megatron and torchtitan)."""
    if framework == "deepspeed":
        return split_stages(layout, front_loaded_stage_sizes(model.num_layers, layout.pp), vision=model.vision is not None)
    return uniform_stages(model, layout)


@functools.lru_cache(maxsize=4096)
def _stages(pp: int, vpp: int, group: int, chunk_sizes: tuple[int, ...], vision: bool) -> tuple[Stage, ...]:
    """split_stages for a pipeline of ``pp`` groups of ``group`` ranks, built
    once per shape (a search asks for the same few thousand shapes tens of
    thousands of times)."""
    chunks_total = pp * vpp
    firsts = [0, *itertools.accumulate(chunk_sizes)]
    stages = []
    for s in range(pp):
        chunks = tuple(
            Chunk(first_layer=firsts[c], num_layers=chunk_sizes[c], embedding=c == 0, head=c == chunks_total - 1, vision=vision and c == 0)
            for c in (v * pp + s for v in range(vpp))
        )
        stages.append(Stage(index=s, chunks=chunks, ranks=range(s * group, (s + 1) * group)))
    return tuple(stages)


def stage_signature(model: ModelSpec, stage: Stage) -> tuple:
    """What a stage's costs and states are a function of: per chunk, its
    layers' kinds and counts and whether it runs the embedding, the head or
    the vision tower. Stages alike in it differ only in which micro batches
    they hold in flight."""
    found = stage._signatures.get(model)
    if found is None:
        found = stage._signatures[model] = tuple((model.layer_kinds_in(c.first_layer, c.num_layers), c.embedding, c.head, c.vision)
                                                 for c in stage.chunks)
    return found


@dataclass(frozen=True)
class Placement:
    """Where each global rank runs: ``gpus[rank] == (host, local GPU index)``."""

    gpus: tuple[tuple[str, int], ...]

    def host_of(self, rank: int) -> str:
        return self.gpus[rank][0]


def stage_gpus(cluster: Cluster, placement: Placement, stages: list[Stage]) -> list[GPU]:
    """The GPU type each stage runs at: the slowest of its device group's."""
    if not cluster.heterogeneous:
        return [cluster.slowest.gpu] * len(stages)
    return [cluster.slowest_gpu({placement.host_of(rank) for rank in stage.ranks}) for stage in stages]


def default_placement(cluster: Cluster, world_size: int) -> Placement:
    """Rank r on node r // gpus_per_node, GPU r % gpus_per_node: what torchrun
    with ``--node_rank`` = node index and no CUDA_VISIBLE_DEVICES does."""
    return stage_block_placement(cluster, world_size, (0,))


@functools.lru_cache(maxsize=64)
def stage_block_placement(cluster: Cluster, world_size: int, stage_slots: tuple[int, ...]) -> Placement:
    """Stage s's rank block on the GPU block ``stage_slots[s]`` (blocks of
    world_size / len(stage_slots) consecutive GPUs in node order): how a
    pipeline position is moved onto other device groups, e.g. faster GPUs.
    Cached: the search asks for the same few placements of every layout."""
    per_node, n = cluster.gpus_per_node, world_size // len(stage_slots)
    slots = (stage_slots[r // n] * n + r % n for r in range(world_size))
    return Placement(gpus=tuple((cluster.nodes[slot // per_node].host, slot % per_node) for slot in slots))
