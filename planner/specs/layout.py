"""A layout: the parallel degrees and knobs of one way to run the job.

Its fields are the ``parallel`` object of the JSON report. Megatron's global
rank order is ``tp-cp-ep-dp-pp`` (``megatron.core.parallel_state.RankGenerator``),
so TP groups are the innermost, contiguous ranks and PP stages the outermost.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

Recompute = Literal["none", "selective", "full"]
# What megatron-core 0.16's TransformerConfig accepts in recompute_modules
# (transformer_config.py __post_init__): core_attn, mlp, moe and
# shared_experts are checkpointed (their input kept, the rest recomputed);
# moe_act, layernorm and mla_up_proj discard their output and recompute it.
RECOMPUTE_MODULES = ("core_attn", "mlp", "moe", "shared_experts", "moe_act", "layernorm", "mla_up_proj")
DEFAULT_RECOMPUTE_MODULES = ("core_attn",)  # Megatron's default for selective
# torchtitan's per-op selective checkpointing (activation_checkpoint.mode
# selective, selective_ac_option "op"): its one recompute "module".
OP_SAC = "op"
_MODULE_LABELS = {"core_attn": "attn", "mlp": "mlp", "moe": "moe", "shared_experts": "shared", "moe_act": "act",
                  "layernorm": "norm", "mla_up_proj": "mla", OP_SAC: "op"}


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
    # selective: the modules recomputed (--recompute-modules), in
    # RECOMPUTE_MODULES order; empty means Megatron's default, core_attn.
    recompute_modules: tuple[str, ...] = ()
    # full: 0 recomputes every layer (--recompute-method uniform
    # --recompute-num-layers 1); N > 0 the first N layers of each model
    # chunk (--recompute-method block --recompute-num-layers N).
    recompute_num_layers: int = 0
    zero_stage: int = 0  # DeepSpeed ZeRO stage; Megatron uses distributed_optimizer
    distributed_optimizer: bool = False
    # Sharded data parallelism: the weights, gradients and optimizer state
    # split over ``fsdp`` of the DP ranks (times CP, whose ranks hold the same
    # weights) and replicated over the other dp / fsdp (HSDP); 0 leaves the
    # weights whole on every rank. Megatron-FSDP's optim_grads_params,
    # DeepSpeed's ZeRO-3 (over all of dp), torchtitan's FSDP2 (cost/sharding.py).
    fsdp: int = 0
    # Free a layer's gathered weights after its forward and gather them again
    # for its backward (FSDP2 reshard_after_forward); False keeps them.
    reshard_after_forward: bool = True
    # The optimizer's state and step on the host CPU (ZeRO-Offload,
    # Megatron's --optimizer-cpu-offload, FSDP2's CPUOffloadPolicy; cost/offload.py).
    optimizer_offload: bool = False

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
    def selective_modules(self) -> tuple[str, ...]:
        """The modules selective recompute re-runs (none unless selective)."""
        if self.recompute != "selective":
            return ()
        return self.recompute_modules or DEFAULT_RECOMPUTE_MODULES

    def fully_recomputed(self, chunk_layers: int) -> int:
        """Of a model chunk's ``chunk_layers`` layers, how many full recompute re-runs."""
        if self.recompute != "full":
            return 0
        return chunk_layers if self.recompute_num_layers == 0 else min(self.recompute_num_layers, chunk_layers)

    @property
    def optimizer_shards(self) -> int:
        """Ways the optimizer state is split: DP x CP ranks share it under
        Megatron's distributed optimizer or ZeRO (CP ranks hold the same
        weights); under sharded data parallelism the shard group's fsdp x CP
        (each HSDP replica keeps a whole copy)."""
        if self.fsdp:
            return self.param_shards
        sharded = self.distributed_optimizer or self.zero_stage >= 1
        return self.dp * self.cp if sharded else 1

    @property
    def param_shards(self) -> int:
        """Ways the weights are split: fsdp x CP under sharded data parallelism, else 1."""
        return self.fsdp * self.cp if self.fsdp else 1

    @property
    def grad_shards(self) -> int:
        """Ways the gradients are split: as the weights under sharded data
        parallelism, over DP x CP under ZeRO-2, else 1."""
        if self.fsdp:
            return self.param_shards
        return self.dp * self.cp if self.zero_stage >= 2 else 1

    @property
    def expert_shards(self) -> int:
        """Ways the routed experts' state is split: expert data parallel
        (world / (etp x ep x pp)), within one HSDP replica under sharded data
        parallelism (torchtitan's efsdp = fsdp x cp x tp / (etp x ep),
        parallel_dims.py)."""
        return self.expert_dp // self.dp_replicate if self.fsdp else self.expert_dp

    @property
    def dp_replicate(self) -> int:
        """Replicas of the sharded state (HSDP): dp / fsdp; dp without sharding."""
        return self.dp // self.fsdp if self.fsdp else self.dp

    def as_dict(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        """Short human label, e.g. ``TP8 PP4x3 DP32 mbs1 SP sel``: ``sel`` is
        selective recompute of the attention core, ``sel:mla+mlp`` of other
        modules, ``full`` every layer and ``full2`` the first 2 layers of
        each model chunk."""
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
        if self.recompute == "selective":
            modules = self.selective_modules
            parts.append("sel" if modules == DEFAULT_RECOMPUTE_MODULES else "sel:" + "+".join(_MODULE_LABELS[m] for m in modules))
        elif self.recompute == "full":
            parts.append(f"full{self.recompute_num_layers}" if self.recompute_num_layers else "full")
        if self.distributed_optimizer:
            parts.append("DO")
        if self.zero_stage:
            parts.append(f"Z{self.zero_stage}")
        if self.fsdp:
            parts.append(f"FSDP{self.fsdp}" + ("" if self.reshard_after_forward else "k"))
        if self.optimizer_offload:
            parts.append("offload")
        return " ".join(parts)


# What each word of ``Layout.label`` stands for, by its leading letters;
# the parallel degrees first, read together ("TP, DP: tensor, data parallel").
_PARALLEL_DEGREES = {"TP": "tensor", "PP": "pipeline", "DP": "data", "CP": "context", "EP": "expert", "ETP": "expert tensor"}
_LABEL_TERMS = {
    "mbs": "micro batch size", "SP": "sequence parallel", "sel": "selective recompute (of core_attn; sel:a+b of modules a, b)",
    "full": "full recompute (fullN: of N layers per chunk)", "DO": "distributed optimizer", "Z": "ZeRO stage",
    "FSDP": "weights sharded over N data-parallel ranks times CP, as torchtitan counts dp_shard (FSDP1 with CP2 shards over 2; "
            "FSDPNk: kept whole from forward to backward)",
    "offload": "optimizer state and step on the host CPU",
}


def label_legend(labels: list[str]) -> str:
    """What the words of these ``Layout.label`` strings stand for, only the
    ones used, e.g. ``TP, DP: tensor, data parallel; mbs: micro batch size``."""
    words = [word for label in labels for word in label.split()]
    used = {re.match(r"[A-Za-z]+", word).group() for word in words}
    degrees = [term for term in _PARALLEL_DEGREES if term in used]
    parts = [f"{', '.join(degrees)}: {', '.join(_PARALLEL_DEGREES[term] for term in degrees)} parallel"] if degrees else []
    if any(re.fullmatch(r"PP\d+x\d+", word) for word in words):
        parts.append("PPaxb: a stages of b virtual stages each")
    parts += [f"{term}: {meaning}" for term, meaning in _LABEL_TERMS.items() if term in used]
    short = {word for label in words if label.startswith("sel:") for word in label[4:].split("+")}
    renamed = [f"{label} {module}" for module, label in _MODULE_LABELS.items() if label in short and label != module]
    if renamed:
        parts.append(f"modules: {', '.join(renamed)}")
    return "; ".join(parts)


def rank_groups(layout: Layout) -> dict[str, np.ndarray]:
    """Megatron's process groups of a layout, as rows of global ranks.

    Rank order ``tp-cp-ep-dp-pp`` (megatron.core.parallel_state.RankGenerator):
    rank = tp_i + tp (cp_i + cp (dp_i + dp pp_i)). The gradient reduce runs
    over the ``dp-cp`` group (CP ranks hold the same weights); ``pp`` rows are
    whole pipelines, ``embedding`` the first and last stage's ranks that share
    the tied word embedding; ``ep``, ``etp`` and ``expert-dp`` are the MoE layers' groups.
    Sharded data parallelism splits DP into replicas of fsdp ranks each, the
    shard index innermost (torchtitan's mesh ``pp, dp_replicate, dp_shard,
    cp, tp``): ``shard`` is fsdp x CP ranks, ``replicate`` the dp / fsdp copies."""
    grid = np.arange(layout.world_size).reshape(layout.pp, layout.dp, layout.cp, layout.tp)
    fsdp = layout.fsdp or layout.dp
    sharded = grid.reshape(layout.pp, layout.dp // fsdp, fsdp, layout.cp, layout.tp)
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
        "shard": sharded.transpose(0, 1, 4, 2, 3).reshape(-1, fsdp * layout.cp),
        "replicate": sharded.transpose(0, 2, 3, 4, 1).reshape(-1, layout.dp // fsdp),
    }


def neighbour_pairs(pipelines: np.ndarray) -> np.ndarray:
    """Each pipeline's neighbouring stages as rows of two: the send/recv pairs."""
    if pipelines.shape[1] < 2:
        return pipelines
    return np.stack([pipelines[:, :-1], pipelines[:, 1:]], axis=-1).reshape(-1, 2)
