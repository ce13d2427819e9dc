"""PyTorch profiler traces (``torch.profiler`` ``export_chrome_trace``, one rank).

A Kineto Chrome trace is a JSON object whose ``traceEvents`` hold complete
events (``ph: "X"``, ``ts`` and ``dur`` in microseconds). Read here:

- steps: the ``ProfilerStep#N`` ranges that ``profiler.step()`` records, on the
  GPU timeline (``cat: gpu_user_annotation``, one per stream the step used:
  their union) where the trace has them, else on the CPU (``user_annotation``
  / ``cpu_op``);
- GPU kernels (``cat: kernel``; ``Kernel`` in torch < 1.13) and copies
  (``gpu_memcpy``, ``gpu_memset``), each classified by its name into loom's
  breakdown terms (``classify``): gemm, attention, elementwise, optimizer, and
  the collectives by the group they run over. NCCL kernels name the
  operation (``ncclDevKernel_AllGather_RING_LL``; ``ncclKernel_...`` before
  NCCL 2.19) but not the group: that comes from the ``record_param_comms``
  args that Kineto copies onto the kernel (torch >= 2.4), else from the CPU
  op that launched it (joined on ``args["External id"]``): its ``Process
  Group Description`` (Megatron names its groups ``TENSOR_MODEL_PARALLEL_GROUP``,
  ... through ``group_desc``; a DeviceMesh ``mesh_<dim>``, torchtitan's
  ``mesh_tp``, ``mesh_fsdp``, ...; ``default_pg`` the world) or its
  ``Collective name``. NCCL runs an all-to-all as grouped send/recv, so a
  ``SendRecv`` kernel with neither is taken as pipeline send/recv. DeepEP's
  kernels (``deep_ep::``) are expert-parallel dispatch;
- ``distributedInfo.rank``: the rank the trace was taken on.

Per steady-state step (``ProfilerStep#0``, the process's first iteration, is
warm-up; a profiler schedule that starts later recorded only steady steps):
the busy time of each
class, the time each collective class is *exposed* (its kernels running
while no compute kernel does, the part a step waits for) and the idle time
(no kernel at all: bubbles, host overhead, data loading).
"""

from __future__ import annotations

import bisect
import json
import re
from pathlib import Path

from loom.planner.specs.errors import SpecError
from loom.profiles.run_logs.record import WARMUP_LOGS, Interval, RunLog, read_text

STEP = re.compile(r"^ProfilerStep#(\d+)$")
GPU_CATEGORIES = {"kernel", "Kernel", "gpu_memcpy", "gpu_memset"}
COMPUTE = ("gemm", "attention", "elementwise", "optimizer")
COLLECTIVES = ("tp_comm", "cp_comm", "ep_comm", "pp_comm", "dp_comm", "comm")
# Kernel names, tried in order (first match wins). Sources: flash-attention's
# flash_fwd/bwd kernels and FA3's FlashAttn*Sm90; cuDNN's fused SDPA
# (cudnn_generated_fort_native_sdpa, Transformer Engine's fused attention);
# PyTorch's memory-efficient fmha_cutlass*; cuBLAS (sm90_xmma_gemm, nvjet,
# ampere_*gemm, s16816gemm), CUTLASS (cutlass::Kernel, grouped GEMMs),
# apex/TE multi_tensor_apply (fused Adam).
KERNEL_CLASSES = (
    ("attention", re.compile(r"flash|fmha|sdpa|attention|fused_attn|_attn_fwd|_attn_bwd", re.IGNORECASE)),
    ("optimizer", re.compile(r"multi_tensor_apply|adam", re.IGNORECASE)),
    ("gemm", re.compile(r"gemm|xmma|nvjet|cutlass|cublas|wgmma|s16816|s1688|h16816|matmul", re.IGNORECASE)),
)
# Process-group descriptions to terms, tried in order ("EXPERT_DATA_PARALLEL"
# reduces gradients: data before expert; expert-tensor-parallel collectives
# are part of the MoE dispatch, which loom prices in ep_comm).
GROUP_CLASSES = (("dp_comm", ("data", "dp", "shard", "replicate", "fsdp", "efsdp", "embedding", "default")),
                 ("ep_comm", ("expert", "ep", "etp")), ("cp_comm", ("context", "cp")), ("pp_comm", ("pipeline", "pp")),
                 ("tp_comm", ("tensor", "tp")))


def looks_like(path: Path) -> bool:
    """Whether ``path`` names a JSON file, maybe gzipped (a trace is JSON; logs are text)."""
    return path.name.endswith((".json", ".json.gz"))


def _group_class(description: str) -> str | None:
    """The collective term of a process-group description (GROUP_CLASSES), or None."""
    words = re.split(r"[^a-z]+", description.lower())
    for term, keys in GROUP_CLASSES:
        if any(key in words or (len(key) > 3 and key in description.lower()) for key in keys):
            return term
    return None


def classify(name: str, collective: dict | None = None) -> str:
    """The breakdown term of a GPU kernel named ``name``; ``collective``: the
    args of the CPU op that launched it, for NCCL kernels."""
    if name.startswith("nccl") or "deep_ep" in name:
        if "deep_ep" in name:
            return "ep_comm"
        args = collective or {}
        description = str(args.get("Process Group Description", args.get("Process Group Name", "")))
        term = _group_class(description) if description else None
        if term:
            return term
        op = str(args.get("Collective name", "")).lower()
        if "all_to_all" in op or "alltoall" in name.lower():
            return "ep_comm"
        if op in ("send", "recv", "batch_isend_irecv") or ("SendRecv" in name and not op):
            return "pp_comm"
        return "comm"
    for term, pattern in KERNEL_CLASSES:
        if pattern.search(name):
            return term
    return "elementwise"


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The sorted, disjoint union of ``(start, end)`` intervals."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _uncovered(start: float, end: float, cover: list[tuple[float, float]], ends: list[float]) -> float:
    """Length of [start, end] outside the sorted disjoint intervals ``cover``
    (``ends``: their ends, for the binary search to the first that reaches ``start``)."""
    covered, index = 0.0, bisect.bisect_right(ends, start)
    while index < len(cover) and cover[index][0] < end:
        covered += max(0.0, min(end, cover[index][1]) - max(start, cover[index][0]))
        index += 1
    return max(0.0, end - start - covered)


def _event_time(event: dict, source: str, index: int) -> tuple[float, float]:
    """A complete event's (start, end) in microseconds; SpecError naming it when they are not numbers."""
    ts, dur = event.get("ts"), event.get("dur")
    if not isinstance(ts, (int, float)) or not isinstance(dur, (int, float)) or isinstance(ts, bool) or isinstance(dur, bool) \
            or not (dur >= 0 and ts == ts and abs(ts) < 1e18 and dur < 1e15):
        raise SpecError(source, f"traceEvents.{index}", "a complete event with numeric ts and dur >= 0 (microseconds)",
                        {"ts": ts, "dur": dur})
    return float(ts), float(ts) + float(dur)


def read(path: Path) -> RunLog:
    """The steps of one rank's profiler trace (module docstring: what is read).

    Raises SpecError naming the file and the event or field that is wrong:
    not JSON, no ``traceEvents``, no ProfilerStep ranges, kernels of more than
    one GPU, an event without times."""
    source = str(path)
    try:
        data = json.loads(read_text(path, "PyTorch profiler trace (JSON)"))
    except json.JSONDecodeError as error:
        raise SpecError(source, f"line {error.lineno}", "valid JSON (a torch.profiler Chrome trace)") from None
    except RecursionError:
        raise SpecError(source, "<file>", "a Chrome trace, not JSON nested hundreds of levels deep") from None
    events = data.get("traceEvents") if isinstance(data, dict) else None
    if isinstance(data, dict) and "plans" in data and events is None:
        raise SpecError(source, "<file>", "a training log or profiler trace here, not a loom plan.json (a plan.json starts each run)")
    if not isinstance(events, list):
        raise SpecError(source, "traceEvents", "a list of trace events (torch.profiler's export_chrome_trace)")
    steps: dict[str, dict[int, tuple[float, float]]] = {"gpu": {}, "cpu": {}}
    launches: dict[object, dict] = {}
    kernels: list[tuple[float, float, str, object, int]] = []
    devices: set[object] = set()
    for index, event in enumerate(events):
        if not isinstance(event, dict) or event.get("ph") != "X":
            continue
        name, category, args = event.get("name"), event.get("cat"), event.get("args")
        args = args if isinstance(args, dict) else {}
        if not isinstance(name, str) or not isinstance(category, str):
            continue
        if match := STEP.match(name):
            # Kineto writes a step's GPU range once per stream it ran on: the step spans them all.
            timeline = steps["gpu" if category == "gpu_user_annotation" else "cpu"]
            start, end = _event_time(event, source, index)
            step = int(match.group(1))
            timeline[step] = (min(start, timeline[step][0]), max(end, timeline[step][1])) if step in timeline else (start, end)
        elif category in GPU_CATEGORIES:
            start, end = _event_time(event, source, index)
            devices.add(str(args.get("device", event.get("pid"))))
            own = args if "Process Group Description" in args or "Collective name" in args else None
            kernels.append((start, end, name, own if own is not None else args.get("External id"), index))
        elif category in ("cpu_op", "user_annotation") and ("Process Group Description" in args or "Collective name" in args):
            launches[str(args.get("External id"))] = args
    windows = steps["gpu"] or steps["cpu"]
    warmup = WARMUP_LOGS if 0 in windows else 0
    if len(windows) < warmup + 1:
        raise SpecError(source, "traceEvents", f"at least {warmup + 1} ProfilerStep#N ranges (call profiler.step() each "
                        "iteration; ProfilerStep#0 is warm-up)", f"{len(windows)} steps")
    if len(devices) > 1:
        raise SpecError(source, "traceEvents", "the kernels of one GPU (one rank's trace)", f"kernels of {len(devices)} devices")
    if not kernels:
        raise SpecError(source, "traceEvents", "GPU kernels (cat 'kernel': profile with ProfilerActivity.CUDA)", "none")
    ordered = sorted(windows.items())
    steady = ordered[warmup:]
    busy = {term: 0.0 for term in (*COMPUTE, *COLLECTIVES)}
    exposed = {term: 0.0 for term in (*COLLECTIVES, "idle")}
    by_step: dict[int, list[tuple[float, float, str]]] = {step: [] for step, _ in steady}
    starts = [begin for _, (begin, _) in steady]
    for start, end, name, collective, _ in kernels:
        at = bisect.bisect_right(starts, start) - 1
        if at >= 0 and start < steady[at][1][1]:
            step, (_, finish) = steady[at]
            args = collective if isinstance(collective, dict) else launches.get(str(collective))
            by_step[step].append((start, min(end, finish), classify(name, args)))
    for step, (begin, finish) in steady:
        placed = by_step[step]
        compute = _union([(a, b) for a, b, term in placed if term in COMPUTE])
        compute_ends = [b for _, b in compute]
        for a, b, term in placed:
            busy[term] += b - a
            if term in COLLECTIVES:
                exposed[term] += _uncovered(a, b, compute, compute_ends)
        every = _union([(a, b) for a, b, _ in placed])
        exposed["idle"] += _uncovered(begin, finish, every, [b for _, b in every])
    count = len(steady)
    intervals = tuple(Interval(first=step, last=step, line=0, step_time_s=(finish - begin) / 1e6) for step, (begin, finish) in ordered)
    rank = (data.get("distributedInfo") or {}).get("rank") if isinstance(data.get("distributedInfo"), dict) else None
    return RunLog(path=source, format="chrome-trace", intervals=intervals,
                  timers_s={term: value / count / 1e6 for term, value in busy.items() if value},
                  exposed_s={term: value / count / 1e6 for term, value in exposed.items() if value},
                  rank=rank if isinstance(rank, int) and not isinstance(rank, bool) and rank >= 0 else None, warmup_logs=warmup)

