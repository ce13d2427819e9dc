"""Measured vs analytical per-layer time and memory on this machine: profile a
small Llama-style model's layers on the CPU (``loom profile layers``'s code),
calibrate the analytical time model to this CPU the way ``loom profile gemm``
calibrates it to a GPU, and compare.

    python benchmarks/layer_profile.py [--seq 512 1024] [--tp 1 2] [--repeats 5] [--plot layers.png]

The analytical model (planner/cost/compute.py) prices a layer as GEMMs at a
fitted efficiency curve, flash attention at a sustained fraction of peak and
memory-bound kernels at the memory bandwidth. On a GPU the peak comes from
the catalogue and ``loom profile gemm`` fits ``gemm_efficiency`` and
``k_overhead`` to the model's own GEMMs. A CPU has no catalogue entry, so this
benchmark stands in one: peak = the fastest GEMM measured here, memory
bandwidth = a large copy, attention efficiency = causal SDPA forward +
backward at the model's shape over that peak. What is left between the
columns is what the analytical decomposition misses on this device.
"""

from __future__ import annotations

import argparse
import time

import torch

from loom.planner.cost.efficiency import HBM_EFFICIENCY
from loom.planner.specs.model import model_from_hf_config
from loom.profiles.catalogue import GPU
from loom.profiles.gemm import fit_curve, measure_gemm, model_gemms
from loom.profiles.layers import measure
from loom.profiles.torch_blocks import RankShape

SMALL_LLAMA = {
    "model_type": "llama", "hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 4,
    "num_hidden_layers": 8, "vocab_size": 32000, "max_position_embeddings": 4096, "rope_theta": 500000.0,
}
CPU = torch.device("cpu")


def copy_GBps(megabytes: int = 256, repeats: int = 5) -> float:
    """Read + write bandwidth of a large copy."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() / best / 1e9


def attention_tflops(model, seq: int, repeats: int) -> float:
    """Causal SDPA forward + backward at one rank's shape (tp 1), in FLOP/s
    counted as the time model counts them (the masked half skipped)."""
    heads, groups, d = model.num_attention_heads, model.num_query_groups, model.head_dim
    q = torch.randn(1, heads, seq, d, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, groups, seq, d, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out.backward(torch.ones_like(out))
        best = min(best, time.perf_counter() - start)
    flops = 2.0 * seq * seq * heads * 2 * d / 2 * (1 + 2.5)
    return flops / best / 1e12


def this_cpu(model, tps, seqs, repeats) -> tuple[GPU, dict]:
    """A catalogue-style entry for this CPU, fitted like loom profile gemm."""
    points = [measure_gemm(m, n, k, "bf16", CPU, repeats, 1) for m, n, k in model_gemms(model, tps, seqs)]
    peak = max(point.tflops for point in points)
    probe = GPU(name="this-cpu", memory_bytes=0, hbm_GBps=1.0, sms=1, peak_tflops={"bf16": peak}, gemm_efficiency={"bf16": 1.0}, attention_efficiency=1.0)
    fit = fit_curve(points, probe, "bf16")
    bandwidth = copy_GBps()
    attention = attention_tflops(model, max(seqs), repeats)
    gpu = GPU(name="this-cpu", memory_bytes=0, hbm_GBps=bandwidth / HBM_EFFICIENCY, sms=1, peak_tflops={"bf16": peak},
              gemm_efficiency={"bf16": fit.gemm_efficiency}, attention_efficiency=attention / peak, gemm_k_overhead=fit.k_overhead)
    facts = dict(gemms=len(points), peak_tflops=peak, gemm_efficiency=fit.gemm_efficiency, k_overhead=fit.k_overhead,
                 rms_log_error=fit.rms_log_error, copy_GBps=bandwidth, attention_tflops=attention)
    return gpu, facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--plot", help="draw measured vs analytical times to this image")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = model_from_hf_config(SMALL_LLAMA, "small-llama", "benchmarks/layer_profile.py")
    print(f"{model.name}: hidden {model.hidden_size}, {model.num_attention_heads} heads ({model.num_query_groups} KV), "
          f"ffn {model.ffn_hidden_size}, vocab {model.vocab_size}; bf16 on CPU ({torch.get_num_threads()} threads, torch {torch.__version__})")
    gpu, facts = this_cpu(model, tuple(args.tp), tuple(args.seq), args.repeats)
    print(f"calibration: {facts['gemms']} GEMMs, fastest {facts['peak_tflops']:.3f} TFLOP/s (taken as peak); fitted gemm_efficiency "
          f"{facts['gemm_efficiency']:.3f}, k_overhead {facts['k_overhead']:g} (rms log error {facts['rms_log_error']:.3f}); "
          f"copy {facts['copy_GBps']:.1f} GB/s; causal SDPA fwd+bwd {facts['attention_tflops']:.3f} TFLOP/s\n")
    header = f"{'kind':<10}{'tp':>3}{'seq':>6} | {'fwd ms':>8}{'model':>8}{'ratio':>7} | {'bwd ms':>8}{'model':>8}{'ratio':>7} | {'saved MiB':>10}{'estimate':>10}"
    print(header)
    print("-" * len(header))
    rows = []
    for kind in ("dense", "embedding", "head"):
        for tp in args.tp:
            for seq in args.seq:
                shape = RankShape(model, tp, 1, seq, sequence_parallel=tp > 1)
                entry = measure(kind, shape, "bf16", CPU, args.repeats, 1, gpu)
                fwd, bwd = entry.estimated_forward_s, entry.estimated_backward_s
                rows.append((f"{kind} tp{tp} s{seq}", entry.forward.median_s, fwd, entry.backward.median_s, bwd))
                print(f"{kind:<10}{tp:>3}{seq:>6} | {entry.forward.median_s * 1e3:>8.2f}{fwd * 1e3:>8.2f}{entry.forward.median_s / fwd:>7.2f} | "
                      f"{entry.backward.median_s * 1e3:>8.2f}{bwd * 1e3:>8.2f}{entry.backward.median_s / bwd:>7.2f} | "
                      f"{entry.saved_bytes['none'] / 2**20:>10.3f}{entry.estimated_saved_bytes['none'] / 2**20:>10.3f}")
    if args.plot:
        draw(rows, args.plot)


def draw(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for axis, (name, measured, modelled) in zip(axes, (("forward", 1, 2), ("backward", 3, 4))):
        labels = [row[0] for row in rows]
        positions = range(len(rows))
        axis.barh([p - 0.2 for p in positions], [row[measured] * 1e3 for row in rows], 0.4, label="measured")
        axis.barh([p + 0.2 for p in positions], [row[modelled] * 1e3 for row in rows], 0.4, label="analytical (CPU-calibrated)")
        axis.set_yticks(list(positions), labels)
        axis.set_xscale("log")
        axis.set_xlabel(f"{name} ms")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
