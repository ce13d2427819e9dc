"""Predict every published run in shared/validation/published_runs.yaml with
``loom evaluate`` and print predicted vs published step time and the error.

    python benchmarks/published_runs.py [--validation PATH] [--plot FILE]

Runs publish either a measured step time or TFLOP/s per GPU; the latter is
turned into a step time with the FLOP formula the row names. Rows leave some
fields unpublished; what this script assumes for them is stated in
``ERA_FEATURES`` and ``assumed_layout`` and printed with each row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import yaml
from typer.testing import CliRunner

from loom.cli.app import app

VALIDATION = Path(__file__).resolve().parents[2] / "shared" / "validation" / "published_runs.yaml"
GPT3_VOCAB = 50257  # MLPerf rows leave vocab null; GPT-3's tokenizer has 50257 entries

# What each group of runs ran, from its publication (not fitted):
#  - SC'21 (2021) and Korthikanti et al. (2022) predate flash attention and ran
#    the DP all-reduce after the backward pass, TP collectives un-overlapped.
#  - MLPerf v3.1 (NeMo, 2023) and the Megatron-Core README table run Transformer
#    Engine's fused attention with DP, TP (userbuffers) and PP overlap.
ERA_FEATURES = {
    "sc21": dict(flash_attention=False, overlap_grad_reduce=False, overlap_param_gather=False, tp_comm_overlap=False),
    "ra": dict(flash_attention=False, overlap_grad_reduce=False, overlap_param_gather=False, tp_comm_overlap=False),
    "mlperf31": dict(flash_attention=True, overlap_grad_reduce=True, overlap_param_gather=True, tp_comm_overlap=True),
    "mcore": dict(flash_attention=True, overlap_grad_reduce=True, overlap_param_gather=True, tp_comm_overlap=True),
}


def published_step_time_s(row: dict) -> float:
    """The measured step time, or one derived from TFLOP/s with the row's formula."""
    if row.get("step_time_s"):
        return row["step_time_s"]
    B, s, L, h, V = row["gbs"], row["seq"], row["layers"], row["hidden"], row["vocab"]
    if row["flops_formula"] == "megatron_hw_full_recompute":
        flops = 96 * B * s * L * h**2 * (1 + s / (6 * h) + V / (16 * L * h))
    else:
        flops = 72 * B * s * L * h**2 * (1 + s / (6 * h) + V / (12 * L * h))
    return flops / (row["tflops_per_gpu"] * 1e12 * row["gpus"])


def assumed_layout(row: dict) -> dict:
    """The row's layout as ``loom evaluate`` flags; unpublished fields get the
    framework default of the run's era (noted in the output)."""
    era = row["id"].split("-")[0]
    modern = era in ("mlperf31", "mcore")
    return {
        "tp": row["tp"], "pp": row["pp"], "dp": row["dp"], "cp": 1,
        "vpp": row.get("vpp") or 1,
        "mbs": row.get("mbs") or 1,
        "recompute": row.get("recompute") or "none",
        "sequence_parallel": row.get("sequence_parallel", modern and row["tp"] > 1),
        "distributed_optimizer": row.get("distributed_optimizer", modern),
    }


def write_inputs(row: dict, clusters: dict, folder: Path) -> Path:
    """A model config.json, a cluster YAML and a job YAML for one row."""
    c = clusters[row["cluster"]]
    model = {
        "model_type": "gpt2", "n_embd": row["hidden"], "n_layer": row["layers"], "n_head": row["heads"],
        "n_positions": row["seq"], "vocab_size": row["vocab"] or GPT3_VOCAB, "tie_word_embeddings": True,
    }
    (folder / "config.json").write_text(json.dumps(model))
    cluster = {
        "name": row["cluster"], "nodes": -(-row["gpus"] // c["gpus_per_node"]), "gpus_per_node": c["gpus_per_node"],
        "gpu": c["gpu"], "nvlink_GBps": c["nvlink_GBps"], "nics_per_node": c["nics_per_node"], "nic_Gbps": c["nic_Gbps"],
    }
    job = {
        "model": str(folder / "config.json"), "cluster": cluster, "global_batch_size": row["gbs"],
        "seq_length": row["seq"], "precision": row["precision"], "features": ERA_FEATURES[row["id"].split("-")[0]],
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def evaluate_row(row: dict, clusters: dict, runner: CliRunner) -> dict:
    """Run ``loom evaluate --json`` on the row and return its best plan."""
    layout = assumed_layout(row)
    with tempfile.TemporaryDirectory() as tmp:
        job = write_inputs(row, clusters, Path(tmp))
        args = ["evaluate", str(job), "--json", "--tp", layout["tp"], "--pp", layout["pp"], "--dp", layout["dp"],
                "--vpp", layout["vpp"], "--mbs", layout["mbs"], "--recompute", layout["recompute"],
                "--sequence-parallel" if layout["sequence_parallel"] else "--no-sequence-parallel",
                "--distributed-optimizer" if layout["distributed_optimizer"] else "--no-distributed-optimizer"]
        result = runner.invoke(app, [str(a) for a in args])
    if result.exit_code != 0:
        raise RuntimeError(f"{row['id']}: loom evaluate exited {result.exit_code}: {result.output}")
    return json.loads(result.stdout)["plans"][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--validation", type=Path, default=VALIDATION)
    parser.add_argument("--plot", type=Path, help="also draw predicted vs published (needs matplotlib)")
    args = parser.parse_args()
    data = yaml.safe_load(args.validation.read_text())
    runner = CliRunner()
    rows = []
    print(f"{'run':<16}{'layout':<34}{'published s':>12}{'predicted s':>12}{'error':>8}  fits")
    for row in data["runs"]:
        plan = evaluate_row(row, data["clusters"], runner)
        published, predicted = published_step_time_s(row), plan["predicted"]["step_time_s"]
        error = predicted / published - 1
        rows.append((row["id"], published, predicted, error))
        fits = plan["memory"]["headroom"] >= 0
        print(f"{row['id']:<16}{plan['label']:<34}{published:>12.3f}{predicted:>12.3f}{error:>+8.1%}  {'yes' if fits else 'NO'}")
    errors = [abs(r[3]) for r in rows]
    worst = max(rows, key=lambda r: abs(r[3]))
    print(f"\n{len(rows)} runs: median |error| {statistics.median(errors):.1%}, mean {statistics.mean(errors):.1%}, "
          f"worst {worst[0]} {worst[3]:+.1%}")
    if args.plot:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 6))
        ax.loglog([r[1] for r in rows], [r[2] for r in rows], "o")
        lo, hi = min(r[1] for r in rows) / 1.5, max(r[1] for r in rows) * 1.5
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_xlabel("published step time (s)")
        ax.set_ylabel("loom predicted step time (s)")
        fig.savefig(args.plot, dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
