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
- Before anything is allocated, every grid point is checked against the
  device's memory (``check_memory``): a sequence or micro batch whose layer
  cannot fit is bad input (exit 2, naming the flag and the largest value
  that fits), not an allocator failure. The check uses a lower bound on what
  a pass holds, so a point just under it may still run out of CUDA memory;
  that too is reported as bad input.
"""

from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
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
from loom.profiles.torch_blocks import KINDS, RankShape, build

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
RECOMPUTE_MODES = ("none", "selective", "full")
GiB = 2**30


@dataclass(frozen=True)
class Grid:
    """The shapes to measure: every combination of these."""

    tp: tuple[int, ...] = (1,)
    micro_batch_size: tuple[int, ...] = (1,)
    seq_length: tuple[int, ...] = (2048,)
    ep: tuple[int, ...] = (1,)
    kinds: tuple[str, ...] = ("dense", "moe", "embedding", "head")
    sequence_parallel: bool = True  # with tp > 1, as Megatron runs (and requires for MoE)


def model_kinds(model: ModelSpec) -> tuple[str, ...]:
    """The layer kinds ``model`` has: MoE layers only with experts, dense
    decoder layers unless every layer is MoE."""
    moe = model.moe
    return tuple(kind for kind in KINDS if (kind != "moe" or moe is not None) and (kind != "dense" or moe is None or moe.first_dense_layers > 0))


def _unbuilt_block_features(model: ModelSpec) -> str:
    """What of ``model``'s layers torch_blocks.py does not build (a
    pre-norm, sequential, Llama- or GPT-style block), named; '' when none."""
    features = {
        "Mamba layers": model.mamba is not None,
        "parallel attention and MLP": model.parallel_attention,
        "norms after each sublayer": model.post_norms_only or model.norms_per_layer != 2,
        "QK norm across heads": model.qk_norm_across_heads,
        "norm after the embedding": model.embedding_norm,
        "ALiBi": model.alibi,
        "soft-capped scores or logits": model.attention_softcap is not None or model.logit_softcap is not None,
    }
    return ", ".join(name for name, present in features.items() if present)


def rank_shapes(model: ModelSpec, grid: Grid) -> Iterator[tuple[str, RankShape]]:
    """(kind, shape) for every grid point the model has: of ``grid.kinds``
    those in ``model_kinds``, expert parallelism only for MoE layers; TP must
    divide heads, query groups, widths and the vocabulary (the planner's own
    rule). Raises SpecError naming the flag when no kind is left, an EP
    other than 1 has no MoE layer to split or does not divide the experts,
    or TP or the sequence length do not divide."""
    if model.mla is not None:
        raise SpecError("--model", "model", "a model without multi-head latent attention (MLA layers are not built yet; the planner estimates them)", model.name)
    unbuilt = _unbuilt_block_features(model)
    if unbuilt:
        raise SpecError("--model", "model", f"a model whose layers loom builds (its {unbuilt} are not built yet; the planner "
                        "estimates them)", model.name)
    available = model_kinds(model)
    kinds = [kind for kind in grid.kinds if kind in available]
    if not kinds:
        raise SpecError("--kinds", "kinds", f"a layer kind {model.name} has ({', '.join(available)})", ",".join(grid.kinds))
    _check_ep(model, grid.ep, kinds)
    for kind in kinds:
        for tp in grid.tp:
            check_tp(model, tp)
            if kind == "moe" and tp > 1 and not grid.sequence_parallel:
                raise SpecError("--no-sequence-parallel", "sequence_parallel", "on for MoE layers with tp > 1 (Megatron requires it)", False)
            for ep in grid.ep if kind == "moe" else (1,):
                for mbs in grid.micro_batch_size:
                    for seq in grid.seq_length:
                        if grid.sequence_parallel and seq % tp:
                            raise SpecError("--seq-length", "seq_length", f"a multiple of tp = {tp} (sequence parallelism splits it)", seq)
                        yield kind, RankShape(model, tp, mbs, seq, grid.sequence_parallel and tp > 1, ep=ep)


def check_tp(model: ModelSpec, tp: int) -> None:
    """Raise SpecError naming --tp unless ``tp`` divides the attention heads,
    the query groups, the MLP width and the vocabulary, which one TP rank
    holds a 1/tp share of."""
    widths = {"num_attention_heads": model.num_attention_heads, "num_query_groups": model.num_query_groups,
              "ffn_hidden_size": model.ffn_hidden_size, "vocab_size": model.vocab_size}
    for field, width in widths.items():
        if width % tp:
            raise SpecError("--tp", "tp", f"a divisor of {model.name}'s {field} = {width}", tp)


def _check_ep(model: ModelSpec, eps: tuple[int, ...], kinds: list[str]) -> None:
    """Expert parallelism other than 1 needs MoE layers to profile, and must divide their experts."""
    split = [ep for ep in eps if ep != 1]
    if not split:
        return
    if model.moe is None:
        raise SpecError("--ep", "ep", f"1: {model.name} is dense, it has no experts to split", split[0])
    if "moe" not in kinds:
        raise SpecError("--ep", "ep", "1 unless --kinds includes moe (only MoE layers are expert-parallel)", split[0])
    for ep in split:
        if model.moe.num_experts % ep:
            raise SpecError("--ep", "ep", f"a divisor of {model.name}'s {model.moe.num_experts} experts", ep)


def memory_bytes(device: torch.device) -> int:
    """Bytes ``device`` holds: a CUDA device's total memory
    (``torch.cuda.get_device_properties``), or on the CPU the machine's
    physical RAM (``os.sysconf``). No run that needs more can succeed."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(flag: str, value: int, needed_bytes: Callable[[int], float], device: torch.device, what: str) -> None:
    """Raise SpecError naming ``flag`` if at ``value`` the run needs more
    than ``device`` holds (``needed_bytes(value)`` against ``memory_bytes``).
    The message gives the largest value that fits, found by bisection, so
    ``needed_bytes`` must not fall as the value grows. ``what`` says what
    the value sizes, for the message."""
    capacity_bytes = memory_bytes(device)
    needed = needed_bytes(value)
    if needed <= capacity_bytes:
        return
    fits, too_big = 0, value  # needed_bytes(fits) <= capacity_bytes < needed_bytes(too_big), 0 standing for nothing
    while too_big - fits > 1:
        middle = (fits + too_big) // 2
        fits, too_big = (middle, too_big) if needed_bytes(middle) <= capacity_bytes else (fits, middle)
    raise SpecError(flag, _field(flag), f"at most {fits:,}: beyond that {what} needs more than the {capacity_bytes / GiB:.4g} GiB of "
                    f"{device.type} memory (at {value:,}, at least {needed / GiB:.4g} GiB)", value)


def least_bytes(kind: str, shape: RankShape) -> float:
    """A lower bound on the bytes one pass of a ``kind`` layer holds at once
    at ``shape``: what it keeps for backward (loom's estimator, which the
    measured layers meet or exceed: tests/test_profile_layers.py), and never
    less than one micro batch's hidden states in 16 bits, which every kind
    materialises (the embedding's output, the gathered input of the first
    GEMM, the head's input). Weights are left out: they do not grow with the
    flags this bounds."""
    hidden_states_bytes = 2 * shape.tokens * shape.model.hidden_size  # layers are profiled in bf16 or fp16
    return max(estimated_saved_bytes(kind, shape, "none"), hidden_states_bytes)


def check_memory(points: list[tuple[str, RankShape]], device: torch.device) -> None:
    """Refuse, before anything is allocated, a grid point whose layer cannot
    fit in ``device``'s memory (``least_bytes`` against ``memory_bytes``):
    SpecError naming --seq-length if one sequence alone does not fit, else
    --micro-batch-size."""
    for kind, shape in points:
        where = f"the {kind} layer at tp {shape.tp}"
        check_fits("--seq-length", shape.seq_length, lambda seq: least_bytes(kind, replace(shape, micro_batch_size=1, seq_length=seq)),
                   device, f"{where} with micro batch 1")
        check_fits("--micro-batch-size", shape.micro_batch_size, lambda mbs: least_bytes(kind, replace(shape, micro_batch_size=mbs)),
                   device, f"{where} at sequence length {shape.seq_length:,}")


# What c10's CPU allocator says when malloc fails (c10/core/impl/alloc_cpu.cpp).
CPU_ALLOCATOR_FAILED = "DefaultCPUAllocator: can't allocate memory"


@contextmanager
def out_of_memory_is_bad_input(flag: str, got: object, what: str) -> Iterator[None]:
    """Report the allocator running out of memory (``torch.OutOfMemoryError``,
    or the CPU allocator's RuntimeError) as a SpecError naming ``flag`` (``got``:
    its value, None to leave it out): the checks before the run use lower
    bounds, so a point just under them can still not fit (or other
    processes hold memory)."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise SpecError(flag, _field(flag), f"a smaller value: {what} ran out of device memory", got) from None
    except RuntimeError as error:  # the CPU allocator (c10/core/impl/alloc_cpu.cpp) raises a plain one
        if CPU_ALLOCATOR_FAILED not in str(error):
            raise
        raise SpecError(flag, _field(flag), f"a smaller value: {what} ran out of host memory", got) from None


def _field(flag: str) -> str:
    """A flag's field name: --seq-length -> seq_length."""
    return flag.lstrip("-").replace("-", "_")


def measure(kind: str, shape: RankShape, dtype: str, device: torch.device, repeats: int, warmup: int, gpu: GPU) -> LayerEntry:
    """Time one layer kind at ``shape`` (no recompute) and count its saved
    bytes under each recompute mode; beside them, loom's estimates for
    ``gpu`` (the catalogue GPU the numbers stand for). Raises SpecError
    naming --micro-batch-size (--seq-length at micro batch 1) if the device
    runs out of memory."""
    flag, value = ("--micro-batch-size", shape.micro_batch_size) if shape.micro_batch_size > 1 else ("--seq-length", shape.seq_length)
    with out_of_memory_is_bad_input(flag, value, f"the {kind} layer at tp {shape.tp}, micro batch {shape.micro_batch_size} x sequence {shape.seq_length:,}"):
        layer = build(kind, shape, DTYPES[dtype], device)
        forward, backward = _time(layer, device, repeats, warmup)
        modes = RECOMPUTE_MODES if kind in ("dense", "moe") else ("none",)
        saved = {mode: saved_bytes(build(kind, shape, DTYPES[dtype], device, mode)) for mode in modes}
        peak = _peak_bytes(layer, device) if device.type == "cuda" else None
    return LayerEntry(
        kind=kind, tp=shape.tp, ep=shape.ep, etp=shape.etp, micro_batch_size=shape.micro_batch_size, seq_length=shape.seq_length,
        sequence_parallel=shape.sequence_parallel, dims=rank_dims(shape),
        forward=forward, backward=backward, saved_bytes=saved,
        estimated_forward_s=estimated_time_s(kind, shape, gpu, dtype, backward=False),
        estimated_backward_s=estimated_time_s(kind, shape, gpu, dtype, backward=True),
        estimated_saved_bytes={mode: estimated_saved_bytes(kind, shape, mode) for mode in modes},
        peak_bytes=peak,
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
    return compute.decoder_layer(planned, gpu, backward, kind).total_s


def estimated_saved_bytes(kind: str, shape: RankShape, recompute: str) -> float:
    """What loom's memory estimator says this layer keeps (planner/cost/activations.py)."""
    planned, _ = planner_shape(shape, "bf16", recompute)
    if kind == "embedding":
        return activations.embedding(planned)
    if kind == "head":
        return activations.head(planned)
    return activations.decoder_layer(planned, recompute, kind)


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
