"""A layout: the parallel degrees and knobs of one way to run the job.

Its fields are the ``parallel`` object of the JSON report. Megatron's global
rank order is ``tp-cp-ep-dp-pp`` (``megatron.core.parallel_state.RankGenerator``),
so TP groups are the innermost, contiguous ranks and PP stages the outermost.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

Recompute = Literal["none", "selective", "full"]


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    cp: int
    micro_batch_size: int
    global_batch_size: int
    ep: int = 1  # expert parallel: ranks sharing one layer's experts (MoE)
    etp: int = 1  # expert tensor parallel: ranks splitting each expert
    vpp: int = 1  # virtual (interleaved) stages per pipeline rank
    sequence_parallel: bool = False
    recompute: Recompute = "none"
    zero_stage: int = 0  # DeepSpeed ZeRO stage; Megatron uses distributed_optimizer
    distributed_optimizer: bool = False

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def num_microbatches(self) -> int:
        """Micro batches each pipeline runs per step (gradient accumulation)."""
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    @property
    def expert_dp(self) -> int:
        """Ranks holding the same experts: world / (etp x ep x pp) (Megatron's expert data parallel)."""
        return self.tp * self.cp * self.dp // (self.etp * self.ep)

    @property
    def optimizer_shards(self) -> int:
        """Ways the optimizer state is split: DP x CP ranks share it under
        Megatron's distributed optimizer or ZeRO (CP ranks hold the same weights)."""
        sharded = self.distributed_optimizer or self.zero_stage >= 1
        return self.dp * self.cp if sharded else 1

    def as_dict(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        """Short human label, e.g. ``TP8 PP4x3 DP32 mbs1 SP sel``."""
        parts = [f"TP{self.tp}", f"PP{self.pp}" + (f"x{self.vpp}" if self.vpp > 1 else ""), f"DP{self.dp}"]
        if self.cp > 1:
            parts.append(f"CP{self.cp}")
        if self.ep > 1:
            parts.append(f"EP{self.ep}")
        if self.etp > 1:
            parts.append(f"ETP{self.etp}")
        parts.append(f"mbs{self.micro_batch_size}")
        if self.sequence_parallel:
            parts.append("SP")
        if self.recompute != "none":
            parts.append({"selective": "sel", "full": "full"}[self.recompute])
        if self.distributed_optimizer:
            parts.append("DO")
        if self.zero_stage:
            parts.append(f"Z{self.zero_stage}")
        return " ".join(parts)


def rank_groups(layout: Layout) -> dict[str, np.ndarray]:
    """Megatron's process groups of a layout, as rows of global ranks.

    Rank order ``tp-cp-ep-dp-pp`` (megatron.core.parallel_state.RankGenerator):
    rank = tp_i + tp (cp_i + cp (dp_i + dp pp_i)). The gradient reduce runs
    over the ``dp-cp`` group (CP ranks hold the same weights); ``pp`` rows are
    whole pipelines, ``embedding`` the first and last stage's ranks that share
    the tied word embedding; ``ep``, ``etp`` and ``expert-dp`` are the MoE layers' groups."""
    grid = np.arange(layout.world_size).reshape(layout.pp, layout.dp, layout.cp, layout.tp)
    pipelines = grid.transpose(1, 2, 3, 0).reshape(-1, layout.pp)
    # MoE layers regroup the same ranks as tp-ep-dp-pp with etp in place of tp.
    experts = np.arange(layout.world_size).reshape(layout.pp, layout.expert_dp, layout.ep, layout.etp)
    return {
        "tp": grid.reshape(-1, layout.tp),
        "cp": grid.transpose(0, 1, 3, 2).reshape(-1, layout.cp),
        "dp-cp": grid.transpose(0, 3, 1, 2).reshape(-1, layout.dp * layout.cp),
        "pp": pipelines,
        "embedding": pipelines[:, [0, -1]] if layout.pp > 1 else pipelines,
        "ep": experts.transpose(0, 1, 3, 2).reshape(-1, layout.ep),
        "etp": experts.reshape(-1, layout.etp),
        "expert-dp": experts.transpose(0, 2, 3, 1).reshape(-1, layout.expert_dp),
    }


def neighbour_pairs(pipelines: np.ndarray) -> np.ndarray:
    """Each pipeline's neighbouring stages as rows of two: the send/recv pairs."""
    if pipelines.shape[1] < 2:
        return pipelines
    return np.stack([pipelines[:, :-1], pipelines[:, 1:]], axis=-1).reshape(-1, 2)
