"""Pipeline stages and the default placement of ranks on GPUs.

Megatron orders global ranks ``tp-cp-ep-dp-pp`` (RankGenerator): rank =
tp_i + tp*(cp_i + cp*(dp_i + dp*pp_i)) for dense models (ep = 1). So pipeline
stage s owns the contiguous block of ranks [s*n, (s+1)*n), n = tp*cp*dp, and
the default placement puts rank r on node r // gpus_per_node, GPU r % gpus_per_node.
"""

from __future__ import annotations

from dataclasses import dataclass

from loom.planner.cluster import Cluster
from loom.planner.layout import Layout
from loom.planner.model import ModelSpec


@dataclass(frozen=True)
class Chunk:
    """The layers one virtual stage (model chunk) runs: decoder layers
    [first_layer, first_layer + num_layers), plus the embedding on the very
    first chunk and the final norm, LM head and loss on the very last."""

    first_layer: int
    num_layers: int
    embedding: bool = False
    head: bool = False


@dataclass(frozen=True)
class Stage:
    index: int
    chunks: tuple[Chunk, ...]  # vpp chunks, in virtual-stage order
    ranks: tuple[int, ...]  # global ranks of this stage's device group

    @property
    def num_layers(self) -> int:
        return sum(chunk.num_layers for chunk in self.chunks)

    @property
    def embedding(self) -> bool:
        return any(chunk.embedding for chunk in self.chunks)

    @property
    def head(self) -> bool:
        return any(chunk.head for chunk in self.chunks)


def uniform_stages(model: ModelSpec, layout: Layout) -> list[Stage]:
    """Megatron's default split: every model chunk gets L / (pp * vpp) layers.

    With interleaving, pipeline rank s runs virtual stages s, s + pp, s + 2pp, ...
    (Narayanan et al. SC'21, sec. 2.2)."""
    chunks_total = layout.pp * layout.vpp
    per_chunk = model.num_layers // chunks_total
    ranks_per_stage = layout.tp * layout.cp * layout.dp
    stages = []
    for s in range(layout.pp):
        chunks = tuple(
            Chunk(
                first_layer=(v * layout.pp + s) * per_chunk,
                num_layers=per_chunk,
                embedding=(v * layout.pp + s) == 0,
                head=(v * layout.pp + s) == chunks_total - 1,
            )
            for v in range(layout.vpp)
        )
        stages.append(Stage(index=s, chunks=chunks, ranks=tuple(range(s * ranks_per_stage, (s + 1) * ranks_per_stage))))
    return stages


@dataclass(frozen=True)
class Placement:
    """Where each global rank runs: ``gpus[rank] == (host, local GPU index)``."""

    gpus: tuple[tuple[str, int], ...]

    def host_of(self, rank: int) -> str:
        return self.gpus[rank][0]


def default_placement(cluster: Cluster, world_size: int) -> Placement:
    """Rank r on node r // gpus_per_node, GPU r % gpus_per_node: what torchrun
    with ``--node_rank`` = node index and no CUDA_VISIBLE_DEVICES does."""
    per_node = cluster.gpus_per_node
    return Placement(gpus=tuple((cluster.nodes[r // per_node].host, r % per_node) for r in range(world_size)))
