"""Time ``loom plan`` end to end (process start to JSON written) from 1,024
to 65,536 GPUs, and show what it answers on clusters and batches of awkward
sizes.

    python benchmarks/plan_speed.py [--repeats 1]

Jobs: the bundled examples (Llama-3 70B on 1,024 H100, GPT-3 175B on 4,096
A100); Llama-3 405B at global batch 2,048, seq 8,192 on 1,024, 4,096, 16,384
and 65,536 H100; DeepSeek-V3 at global batch 4,096, seq 4,096 on 1,024 H100
(issue #15's cases). Per job: the layouts enumerated and those that fit, the
search's own wall time, the whole command's (median of the repeats), the
command's time per layout as a ratio to the first 405B job's (measured in
the same run: flat means the cost does not grow with the GPU count), and
the size of plan.json. Then the awkward cases: GPT-3 175B on 712 A100 (89
nodes) and Llama-3 8B on 1,344 B200 at global batch 3,091, with the plans'
idle GPUs and the nearby batch sizes suggested.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
H100 = {"gpus_per_node": 8, "gpu": "H100-SXM5-80GB", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}
A100 = {"gpus_per_node": 8, "gpu": "A100-SXM4-80GB", "nvlink_GBps": 300, "nics_per_node": 8, "nic_Gbps": 200}
B200 = {"gpus_per_node": 8, "gpu": "B200", "nvlink_GBps": 900, "nics_per_node": 8, "nic_Gbps": 400}

# (name, model, node kind, nodes, global batch, seq)
SCALING = [
    ("llama-3-405b", H100, 128, 2048, 8192),
    ("llama-3-405b", H100, 512, 2048, 8192),
    ("llama-3-405b", H100, 2048, 2048, 8192),
    ("llama-3-405b", H100, 8192, 2048, 8192),
    ("deepseek-v3", H100, 128, 4096, 4096),
]
AWKWARD = [
    ("gpt3-175b", A100, 89, 1536, 2048),
    ("llama-3-8b", B200, 168, 3091, 8192),
]


def write_job(folder: Path, model: str, node: dict, nodes: int, batch: int, seq: int) -> Path:
    name = f"{model}-{nodes * node['gpus_per_node']}"
    (folder / f"{name}-cluster.yaml").write_text(yaml.safe_dump({"name": f"{node['gpu']}-{nodes}", "nodes": nodes, **node}))
    job = folder / f"{name}.yaml"
    job.write_text(yaml.safe_dump({"model": model, "cluster": f"{name}-cluster.yaml", "global_batch_size": batch, "seq_length": seq}))
    return job


def time_plan(job: Path) -> tuple[float, float, dict, int]:
    """The command's wall time, the search's (which loom plan prints on
    stderr: the report leaves it out to stay reproducible), the report and
    its size in bytes."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "loom.cli", "plan", str(job), "--json"], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    searched = re.search(r"searched .* in ([0-9.]+) s", done.stderr)
    return wall, float(searched.group(1)) if searched else float("nan"), json.loads(done.stdout), len(done.stdout.encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        jobs = [EXAMPLES / "llama3-70b-h100-1024.yaml", EXAMPLES / "gpt3-175b-a100-4096.yaml"]
        jobs += [write_job(folder, *case) for case in SCALING]
        print(f"{'job':<30}{'GPUs':>7}{'layouts':>9}{'fit':>8}{'search s':>10}{'command s':>11}{'ms/layout':>11}{'ratio':>7}"
              f"{'plan.json':>11}  best layout")
        baseline = None
        for job in jobs:
            runs = [time_plan(job) for _ in range(args.repeats)]
            wall = statistics.median(run[0] for run in runs)
            searching = statistics.median(run[1] for run in runs)
            report, size = runs[0][2], runs[0][3]
            search = report["search"]
            per_layout_ms = 1000 * wall / search["candidates"]
            if job.name.startswith("llama-3-405b") and baseline is None:
                baseline = per_layout_ms
            ratio = f"{per_layout_ms / baseline:.2f}" if baseline and job.name.startswith("llama-3-405b") else ""
            print(f"{job.stem:<30}{report['gpus']:>7}{search['candidates']:>9}{search['feasible']:>8}{searching:>10.2f}{wall:>11.2f}"
                  f"{per_layout_ms:>11.3f}{ratio:>7}{size / 2**20:>9.2f}MB  {report['plans'][0]['label']}")

        print()
        for case in AWKWARD:
            job = write_job(folder, *case)
            wall, _, report, _ = time_plan(job)
            best = report["plans"][0]
            print(f"{case[0]} on {report['gpus']} {case[1]['gpu']}, global batch {case[3]} ({wall:.1f} s): {best['label']}, "
                  f"{best['predicted']['step_time_s']:.3f} s, {best['predicted']['tokens_per_s']:,.0f} tokens/s, {best['idle_gpus']} GPUs idle")
            for nearby in report["search"]["nearby_global_batch_sizes"]:
                print(f"  global batch {nearby['global_batch_size']}: {nearby['label']}, {nearby['tokens_per_s']:,.0f} tokens/s ({nearby['gain']:+.1%})")


if __name__ == "__main__":
    main()
