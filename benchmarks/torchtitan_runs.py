"""torchtitan's published Llama 3.1 runs through loom: tokens/s per GPU and
peak memory, predicted against measured, every row.

    python benchmarks/torchtitan_runs.py

Rows: pytorch/torchtitan ``benchmarks/llama3_h100_202412_torchtitan.md``
(at 820504e; torch 1963fc8, torchao eab345c, torchtitan 9dec370, December
2024), transcribed exactly: Meta's Grand Teton hosts, 8 H100 with 96 GB
HBM2e at a 500 W limit per host, NVLink inside, 400 Gb/s RDMA per GPU
(loom's ``H100-SXM5-96GB``); tokens/s per GPU read at step 90, memory the
largest reserved over GPUs (the file's footnote 1). Memory in torchtitan's
log is the caching allocator's peak reserved bytes (9dec370 metrics.py:
``reserved_bytes.all.peak``), so it is compared with loom's peak as the
allocator sees it: fragmentation included, the CUDA context and NCCL's
buffers (allocated outside it) left out, as ``loom compare`` does
(planner/calibrate/compare.py predicted_memory_bytes).

What each row ran, as loom's inputs, with the ``torchtitan-2412`` stack
(torchtitan 9dec370 on the PyTorch of then: FlashAttention-2 through SDPA,
PyTorch's cross-entropy on fp32 logits): FSDP degree = ``fsdp`` (weights
sharded over it x CP), TP, CP; PP with 1F1B or Interleaved1F1B at 2 stages
per rank, each DP rank's local batch split into as many micro batches as
pipeline ranks (9dec370 parallelisms/pipelining_utils.py: ``n_microbatches``
defaults to the PP degree; generate_split_points: 2 stages per rank for
multi-stage schedules); float8 = torchao tensorwise, its weights gathered in
float8 where the run's config says so (train_configs/llama3_405b.toml at
9dec370: enable_fsdp_float8_all_gather); async TP = ``tp_comm_overlap``.
Tables 1 and 3 checkpoint per op (torchtitan's
selective_ac_option "op", loom's ``--recompute selective``). loom prices
fused kernels, what torch.compile gives: rows run without compile are
shown but left out of the summary. Nothing is fitted to a row.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from loom.planner.calibrate.compare import predicted_memory_bytes
from loom.planner.plan import evaluate
from loom.planner.specs.cluster import parse_cluster
from loom.planner.specs.job import Features, Job, stack_features
from loom.planner.specs.layout import OP_SAC, Layout
from loom.planner.specs.model import load_model

GiB = 2**30
GRAND_TETON = {"gpus_per_node": 8, "gpu": "H100-SXM5-96GB", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400, "power_limit_W": 500}


@dataclass(frozen=True)
class Row:
    table: str
    label: str
    model: str
    gpus: int
    fsdp: int
    tp: int
    pp: int
    cp: int
    seq: int
    local_batch: int
    recompute: str  # "full", or "op" for per-op selective checkpointing
    compiled: bool
    float8: bool
    async_tp: bool
    tokens_per_s_per_gpu: float
    memory_GiB: float
    vpp: int = 1
    float8_gather: bool = False


def _rows() -> list[Row]:
    rows = []
    t1 = [("FSDP", False, False, 5762, 82.4), ("FSDP + compile", True, False, 6667, 77.0), ("FSDP + compile + float8", True, True, 8532, 76.8)]
    for label, compiled, float8, tps, memory in t1:  # table 1: 8 GPUs, local batch 2, selective (per-op) AC
        rows.append(Row("1", label, "llama-3-8b", 8, 8, 1, 1, 1, 8192, 2, "op", compiled, float8, False, tps, memory))
    for fsdp, cp, seq, tps, memory in [(8, 1, 32768, 3890, 83.9), (4, 2, 65536, 2540, 84.2), (2, 4, 131072, 1071, 84.0), (1, 8, 262144, 548, 84.5)]:
        rows.append(Row("2", f"FSDP {fsdp} CP {cp}", "llama-3-8b", 8, fsdp, 1, 1, cp, seq, 1, "full", True, True, False, tps, memory))
    t3 = [("FSDP", False, False, 5605, 67.0), ("FSDP + compile", True, False, 6514, 62.0), ("FSDP + compile + float8", True, True, 8380, 61.8)]
    for label, compiled, float8, tps, memory in t3:  # table 3: 128 GPUs, local batch 2
        rows.append(Row("3", label, "llama-3-8b", 128, 128, 1, 1, 1, 8192, 2, "op", compiled, float8, False, tps, memory))
    for label, async_tp, tps, memory in [("2D", False, 829, 71.9), ("2D + AsyncTP", True, 876, 67.6)]:
        rows.append(Row("4", label, "llama-3-70b", 256, 32, 8, 1, 1, 8192, 16, "full", True, True, async_tp, tps, memory))
    for label, vpp, tps, memory in [("1F1B", 1, 100, 82.5), ("Interleaved 1F1B", 2, 128, 72.7)]:
        rows.append(Row("5", label, "llama-3-405b", 512, 8, 8, 8, 1, 8192, 32, "full", True, True, True, tps, memory, vpp, True))
    for fsdp, cp, seq, tps, memory in [(8, 1, 32768, 76, 75.3), (4, 2, 65536, 47, 75.9), (2, 4, 131072, 31, 77.1), (1, 8, 262144, 16, 84.9)]:
        rows.append(Row("6", f"FSDP {fsdp} CP {cp}", "llama-3-405b", 512, fsdp, 8, 8, cp, seq, 8, "full", True, True, True, tps, memory, 1, True))
    return rows


def predict(row: Row) -> tuple[float, float, bool, str]:
    """loom's tokens/s per GPU, peak reserved GiB, whether it fits, and the layout's label."""
    cluster = parse_cluster({**GRAND_TETON, "nodes": row.gpus // 8}, "grand-teton")
    dp = row.gpus // (row.tp * row.pp * row.cp)
    global_batch = row.local_batch * dp
    features = stack_features("torchtitan-2412", Features(tp_comm_overlap=row.async_tp, fp8_param_gather=row.float8_gather))
    job = Job(model=load_model(row.model), cluster=cluster, global_batch_size=global_batch, seq_length=row.seq,
              precision="fp8" if row.float8 else "bf16", framework="torchtitan", stack="torchtitan-2412", features=features)
    micro_batch = row.local_batch // row.pp
    layout = Layout(tp=row.tp, pp=row.pp, dp=dp, cp=row.cp, vpp=row.vpp, micro_batch_size=micro_batch, global_batch_size=global_batch,
                    sequence_parallel=row.tp > 1, recompute="full" if row.recompute == "full" else "selective",
                    recompute_modules=() if row.recompute == "full" else (OP_SAC,), fsdp=row.fsdp,
                    reshard_after_forward=row.pp == 1)
    plan = evaluate(job, layout)
    tokens = global_batch * row.seq / (plan.step_time_s * row.gpus)
    reserved = max(predicted_memory_bytes(stage.peak_bytes, stage.breakdown_bytes, reserved=True) for stage in plan.memory)
    return tokens, reserved / GiB, plan.fits, layout.label()


def main() -> None:
    print(f"{'table':<6}{'run':<26}{'layout':<34}{'tok/s/GPU':>10}{'loom':>8}{'error':>8}{'GiB':>7}{'loom':>7}{'error':>8}  fits  note")
    time_errors, memory_errors = [], []
    for row in _rows():
        tokens, memory, fits, label = predict(row)
        time_error = tokens / row.tokens_per_s_per_gpu - 1
        memory_error = memory / row.memory_GiB - 1
        note = "eager (loom prices compiled)" if not row.compiled else ""
        if not note:
            time_errors.append(time_error)
            memory_errors.append(memory_error)
        print(f"{row.table:<6}{row.label:<26}{label:<34}{row.tokens_per_s_per_gpu:>10,.0f}{tokens:>8,.0f}{time_error:>+8.1%}"
              f"{row.memory_GiB:>7.1f}{memory:>7.1f}{memory_error:>+8.1%}  {'yes' if fits else 'NO':<4}  {note}")
    print()
    print(f"rows loom expresses ({len(time_errors)}): tokens/s median |error| {statistics.median(abs(e) for e in time_errors):.1%}, "
          f"memory median |error| {statistics.median(abs(e) for e in memory_errors):.1%}")


if __name__ == "__main__":
    main()
