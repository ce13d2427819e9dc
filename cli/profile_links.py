"""``loom profile links`` (measure every GPU pair under torchrun or srun) and
``loom profile nccl-tests`` (import nccl-tests logs). Both write a profile
JSON atomically; bad input exits 2 with the file and field named."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.markup import escape
from rich.progress import Progress

from loom.cli.common import check_output, err, run
from loom.cli.profile_layers import RepeatsOpt, WarmupOpt
from loom.planner.output.files import write_text_file
from loom.profiles.links import LinkSettings, launch_from_env, measure_links
from loom.profiles.links_profile import links_json
from loom.profiles.nccl_tests import nccl_tests_json, read_nccl_tests_log

OutOpt = Annotated[Path, typer.Option("--out", help="Profile JSON to write.")]
# nccl-tests sweeps up to 8 GiB on 80 GB GPUs; past a few GiB bandwidth is flat.
MAX_MESSAGE_BYTES = 1 << 32


def links(
    out: OutOpt,
    message_bytes: Annotated[Optional[int], typer.Option(min=4, max=MAX_MESSAGE_BYTES, help="Bandwidth message size (default: 64 MiB on GPUs, 8 MiB on CPU).", show_default=False)] = None,
    repeats: RepeatsOpt = 10,
    warmup: WarmupOpt = 2,
    max_group_size: Annotated[Optional[int], typer.Option(min=2, help="Largest all-reduce group (default: the world).", show_default=False)] = None,
) -> None:
    """Measure every GPU pair's send/recv bandwidth and latency, and all-reduce bus bandwidth per group size.

    Run it under torchrun or srun, one process per GPU."""

    def action() -> None:
        check_output(out, folder=False)  # on every rank: all stop alike, none waits for the others
        launch = launch_from_env()
        settings = LinkSettings(message_bytes=message_bytes, repeats=repeats, warmup=warmup, max_group_size=max_group_size)
        with Progress(console=err, transient=True, disable=launch.rank != 0 or not err.is_terminal) as bar:
            task = bar.add_task("measuring links (tournament rounds, then all-reduce groups)", total=None)
            profile = measure_links(launch, settings, progress=lambda done, total: bar.update(task, completed=done, total=total))
        if profile is None:  # not rank 0
            return
        write_text_file(out, links_json(profile), "--out")
        pairs = profile.bandwidth_GBps[~np.eye(len(profile.hosts), dtype=bool)]
        err.print(f"wrote {escape(str(out))}: {len(profile.hosts)} GPUs ({profile.backend}), {len(profile.rounds)} rounds; "
                  f"pair bandwidth min {pairs.min():.3g} / median {np.median(pairs):.3g} / max {pairs.max():.3g} GB/s")

    run(action)


def nccl_tests(
    logs: Annotated[list[Path], typer.Argument(help="nccl-tests output, e.g. all_reduce_perf or sendrecv_perf logs.", show_default=False)],
    out: OutOpt,
) -> None:
    """Import nccl-tests logs (any *_perf binary) into one profile JSON."""

    def action() -> None:
        check_output(out, folder=False)
        runs = [read_nccl_tests_log(path) for path in logs]
        write_text_file(out, nccl_tests_json(runs), "--out")
        for log in runs:
            err.print(f"{escape(log.source)}: {log.op}, {len(log.gpus)} GPUs, {len(log.rows)} sizes, avg busbw {log.avg_busbw_GBps:g} GB/s")
        err.print(f"wrote {escape(str(out))}")

    run(action)
