"""Time ``loom plan`` end to end (process start to JSON written) on large
clusters: Llama-3 70B on 1,024 H100s and GPT-3 175B on 4,096 A100s.

    python benchmarks/plan_speed.py [--repeats 3]

Prints, per job, the layouts enumerated and feasible, the search's own wall
time and the whole command's wall time (median of the repeats).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
JOBS = ["llama3-70b-h100-1024.yaml", "gpt3-175b-a100-4096.yaml"]


def time_plan(job: Path) -> tuple[float, float, dict]:
    """The command's wall time, the search's (which loom plan prints on
    stderr: the report leaves it out to stay reproducible) and the report."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "loom.cli", "plan", str(job), "--json"], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    searched = re.search(r"searched .* in ([0-9.]+) s", done.stderr)
    return wall, float(searched.group(1)) if searched else float("nan"), json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{'job':<30}{'GPUs':>6}{'layouts':>9}{'feasible':>9}{'search s':>10}{'command s':>11}  best layout")
    for name in JOBS:
        runs = [time_plan(EXAMPLES / name) for _ in range(args.repeats)]
        wall = statistics.median(seconds for seconds, _, _ in runs)
        searching = statistics.median(seconds for _, seconds, _ in runs)
        report = runs[0][2]
        search = report["search"]
        print(f"{name:<30}{report['gpus']:>6}{search['candidates']:>9}{search['feasible']:>9}"
              f"{searching:>10.2f}{wall:>11.2f}  {report['plans'][0]['label']}")


if __name__ == "__main__":
    main()
