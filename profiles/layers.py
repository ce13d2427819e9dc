"""``loom profile layers``: time each layer kind forward and backward and count
what it keeps for backward, on whatever device torch has (CUDA or CPU, one
code path). Importing this module imports torch.

- Time: ``warmup`` untimed runs, then ``repeats`` timed ones; the median and
  the spread (min, max) are kept. CUDA is timed with events around each pass
  (kernels are asynchronous), the CPU with ``perf_counter``.
- Saved for backward: every tensor autograd packs during one forward
  (``torch.autograd.graph.saved_tensors_hooks``), counted once per storage,
  weights and constant tables excluded, so views of one buffer count once and
  a view keeping a larger buffer alive counts all of it.
- On CUDA, also the caching allocator's peak over forward + backward.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from loom.planner.cost import activations, compute
from loom.planner.cost.shape import Shape
from loom.planner.specs.errors import SpecError
from loom.planner.specs.job import Features
from loom.planner.specs.layout import Layout
from loom.planner.specs.model import ModelSpec
from loom.profiles.catalogue import GPU
from loom.profiles.layer_profile import LayerEntry, RankDims, Spread
from loom.profiles.torch_blocks import RankShape, build

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
RECOMPUTE_MODES = ("none", "selective", "full")


@dataclass(frozen=True)
class Grid:
    """The shapes to measure: every combination of these."""

    tp: tuple[int, ...] = (1,)
    micro_batch_size: tuple[int, ...] = (1,)
    seq_length: tuple[int, ...] = (2048,)
    ep: tuple[int, ...] = (1,)
    kinds: tuple[str, ...] = ("dense", "moe", "embedding", "head")
    sequence_parallel: bool = True  # with tp > 1, as Megatron runs (and requires for MoE)


def rank_shapes(model: ModelSpec, grid: Grid) -> Iterator[tuple[str, RankShape]]:
    """(kind, shape) for every grid point the model has: MoE layers only in MoE
    models, expert parallelism only for them; TP must divide heads, query
    groups, widths and the vocabulary (the planner's own rule)."""
    if model.mla is not None:
        raise SpecError("--model", "model", "a model without multi-head latent attention (MLA layers are not built yet; the planner estimates them)", model.name)
    kinds = [kind for kind in grid.kinds if kind != "moe" or model.moe is not None]
    if model.moe is not None and model.moe.first_dense_layers == 0:
        kinds = [kind for kind in kinds if kind != "dense"]
    for kind in kinds:
        for tp in grid.tp:
            _check_tp(model, tp)
            if kind == "moe" and tp > 1 and not grid.sequence_parallel:
                raise SpecError("--no-sequence-parallel", "sequence_parallel", "on for MoE layers with tp > 1 (Megatron requires it)", False)
            for ep in grid.ep if kind == "moe" else (1,):
                if model.moe is not None and model.moe.num_experts % ep:
                    raise SpecError("--ep", "ep", f"a divisor of {model.name}'s {model.moe.num_experts} experts", ep)
                for mbs in grid.micro_batch_size:
                    for seq in grid.seq_length:
                        if grid.sequence_parallel and seq % tp:
                            raise SpecError("--seq-length", "seq_length", f"a multiple of tp = {tp} (sequence parallelism splits it)", seq)
                        yield kind, RankShape(model, tp, mbs, seq, grid.sequence_parallel and tp > 1, ep=ep)


def _check_tp(model: ModelSpec, tp: int) -> None:
    widths = {"num_attention_heads": model.num_attention_heads, "num_query_groups": model.num_query_groups,
              "ffn_hidden_size": model.ffn_hidden_size, "vocab_size": model.vocab_size}
    for field, width in widths.items():
        if width % tp:
            raise SpecError("--tp", "tp", f"a divisor of {model.name}'s {field} = {width}", tp)


def measure(kind: str, shape: RankShape, dtype: str, device: torch.device, repeats: int, warmup: int, gpu: GPU) -> LayerEntry:
    """Time one layer kind at ``shape`` (no recompute) and count its saved
    bytes under each recompute mode; beside them, loom's estimates for
    ``gpu`` (the catalogue GPU the numbers stand for)."""
    layer = build(kind, shape, DTYPES[dtype], device)
    forward, backward = _time(layer, device, repeats, warmup)
    modes = RECOMPUTE_MODES if kind in ("dense", "moe") else ("none",)
    saved = {mode: saved_bytes(build(kind, shape, DTYPES[dtype], device, mode)) for mode in modes}
    return LayerEntry(
        kind=kind, tp=shape.tp, ep=shape.ep, etp=shape.etp, micro_batch_size=shape.micro_batch_size, seq_length=shape.seq_length,
        sequence_parallel=shape.sequence_parallel, dims=rank_dims(shape),
        forward=forward, backward=backward, saved_bytes=saved,
        estimated_forward_s=estimated_time_s(kind, shape, gpu, dtype, backward=False),
        estimated_backward_s=estimated_time_s(kind, shape, gpu, dtype, backward=True),
        estimated_saved_bytes={mode: estimated_saved_bytes(kind, shape, mode) for mode in modes},
        peak_bytes=_peak_bytes(layer, device) if device.type == "cuda" else None,
    )


def _time(layer, device: torch.device, repeats: int, warmup: int) -> tuple[Spread, Spread]:
    forward_s, backward_s = [], []
    for repeat in range(warmup + repeats):
        inputs = layer.input()
        out, fwd = timed(lambda: layer.forward(*inputs), device)
        grad = torch.ones_like(out)
        _, bwd = timed(lambda: out.backward(grad), device)
        if repeat >= warmup:
            forward_s.append(fwd)
            backward_s.append(bwd)
    return spread(forward_s), spread(backward_s)


def timed(run: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """``run()`` and its duration in seconds: CUDA events on a GPU, the wall
    clock on the CPU."""
    if device.type != "cuda":
        start = time.perf_counter()
        result = run()
        return result, time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    begin.record()
    result = run()
    end.record()
    torch.cuda.synchronize(device)
    return result, begin.elapsed_time(end) / 1e3


def spread(samples: list[float]) -> Spread:
    return Spread(median_s=statistics.median(samples), min_s=min(samples), max_s=max(samples))


def saved_bytes(layer) -> int:
    """Bytes autograd keeps from one forward for backward, once per storage,
    not counting the layer's weights and constant tables."""
    persistent = {tensor.untyped_storage().data_ptr() for tensor in layer.persistent}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in persistent:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    inputs = layer.input()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = layer.forward(*inputs)
    out.backward(torch.ones_like(out))  # runs the graph once, so a broken backward fails here
    return sum(storages.values())


def _peak_bytes(layer, device: torch.device) -> int:
    """The caching allocator's peak over one forward + backward, above what
    was allocated before it (weights, inputs)."""
    inputs = layer.input()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = layer.forward(*inputs)
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def planner_shape(shape: RankShape, precision: str, recompute: str = "none") -> tuple[Shape, Layout]:
    """The planner's Shape (and a one-GPU-per-rank Layout) for a profiled shape."""
    layout = Layout(tp=shape.tp, pp=1, dp=1, cp=1, ep=shape.ep, etp=shape.etp, micro_batch_size=shape.micro_batch_size,
                    global_batch_size=shape.micro_batch_size, sequence_parallel=shape.sequence_parallel, recompute=recompute)
    return Shape.of(shape.model, layout, shape.seq_length, precision, Features()), layout


def estimated_time_s(kind: str, shape: RankShape, gpu: GPU, precision: str, backward: bool) -> float:
    """What loom's time model says one pass of this layer takes on ``gpu`` (planner/cost/compute.py)."""
    planned, _ = planner_shape(shape, precision)
    if kind == "embedding":
        return compute.embedding(planned, gpu, backward).total_s
    if kind == "head":
        return compute.head(planned, gpu, backward).total_s
    return compute.decoder_layer(planned, gpu, backward, moe=kind == "moe").total_s


def estimated_saved_bytes(kind: str, shape: RankShape, recompute: str) -> float:
    """What loom's memory estimator says this layer keeps (planner/cost/activations.py)."""
    planned, _ = planner_shape(shape, "bf16", recompute)
    if kind == "embedding":
        return activations.embedding(planned)
    if kind == "head":
        return activations.head(planned)
    return activations.decoder_layer(planned, recompute, moe=kind == "moe")


def rank_dims(shape: RankShape) -> RankDims:
    m, t = shape.model, shape.tp
    moe = m.moe
    return RankDims(
        tokens=shape.tokens, local_tokens=shape.local_tokens, hidden_size=m.hidden_size,
        heads=m.num_attention_heads // t, query_groups=m.num_query_groups // t, head_dim=m.head_dim,
        ffn_hidden_size=m.ffn_hidden_size // t, vocab_size=m.vocab_size // t,
        local_experts=moe.num_experts // shape.ep if moe else None,
        expert_ffn_hidden_size=moe.expert_ffn_hidden_size // shape.etp if moe else None,
    )
