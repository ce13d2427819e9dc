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

from typer.testing import CliRunner

from loom.cli.app import app
from loom.profiles.published import VALIDATION, assumed_layout, load_validation, published_step_time_s, write_inputs


def run_loom(row: dict, clusters: dict, runner: CliRunner, command: list[str]) -> dict:
    """Run ``loom <command> JOB --json`` on the row's inputs; its first plan."""
    with tempfile.TemporaryDirectory() as tmp:
        job = write_inputs(row, clusters, Path(tmp))
        result = runner.invoke(app, [command[0], str(job), "--json", *map(str, command[1:])])
    if result.exit_code != 0:
        raise RuntimeError(f"{row['id']}: loom {command[0]} exited {result.exit_code}: {result.output}")
    return json.loads(result.stdout)["plans"][0]


def evaluate_flags(row: dict) -> list:
    layout = assumed_layout(row)
    return ["--tp", layout["tp"], "--pp", layout["pp"], "--dp", layout["dp"], "--vpp", layout["vpp"], "--mbs", layout["mbs"],
            "--recompute", layout["recompute"],
            "--sequence-parallel" if layout["sequence_parallel"] else "--no-sequence-parallel",
            "--distributed-optimizer" if layout["distributed_optimizer"] else "--no-distributed-optimizer"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--validation", type=Path, default=VALIDATION)
    parser.add_argument("--plot", type=Path, help="also draw predicted vs published (needs matplotlib)")
    args = parser.parse_args()
    data = load_validation(args.validation)
    runner = CliRunner()
    rows = []
    print(f"{'run':<16}{'layout':<28}{'published s':>12}{'predicted s':>12}{'error':>8}  fits"
          f"   {'loom plan best':<34}{'its s':>8}{'gain':>7}")
    for row in data["runs"]:
        plan = run_loom(row, data["clusters"], runner, ["evaluate", *evaluate_flags(row)])
        best = run_loom(row, data["clusters"], runner, ["plan", "--top-k", 1])
        published, predicted = published_step_time_s(row), plan["predicted"]["step_time_s"]
        error = predicted / published - 1
        best_s = best["predicted"]["step_time_s"]
        rows.append((row["id"], published, predicted, error, best_s <= predicted * (1 + 1e-9)))
        fits = "yes" if plan["memory"]["headroom"] >= 0 else "NO"
        print(f"{row['id']:<16}{plan['label']:<28}{published:>12.3f}{predicted:>12.3f}{error:>+8.1%}  {fits:<4}"
              f"  {best['label']:<34}{best_s:>8.3f}{predicted / best_s - 1:>+7.1%}")
    errors = [abs(r[3]) for r in rows]
    worst = max(rows, key=lambda r: abs(r[3]))
    print(f"\n{len(rows)} runs: median |error| {statistics.median(errors):.1%}, mean {statistics.mean(errors):.1%}, "
          f"worst {worst[0]} {worst[3]:+.1%}")
    missed = [r[0] for r in rows if not r[4]]
    print(f"loom plan's best is predicted no slower than the published layout on {len(rows) - len(missed)} of {len(rows)} runs"
          + (f"; slower on {', '.join(missed)}" if missed else ""))
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
