"""Figures for ``loom explain``: the simulated schedule as a Gantt chart and
the predicted step time of the candidate layouts. matplotlib draws them
(the ``plot`` extra); ``.png`` and ``.svg`` are written by matplotlib, and
``.html`` is a self-contained page around the SVG."""

from __future__ import annotations

import io
from pathlib import Path

from loom.planner.output.files import write_file
from loom.planner.specs.errors import SpecError
from loom.planner.schedule.simulate import Simulation

# One colour per kind of work; idle time is the grey row behind them.
COLOURS = {
    "F": "#4C72B0",  # forward
    "B": "#DD8452",  # backward (input gradient, and weight gradient unless split)
    "W": "#55A868",  # weight gradient (zero-bubble schedules)
    "send": "#8C8C8C",  # pipeline send/recv
    "dp": "#8172B3",  # data-parallel gradient reduce
    "optimizer": "#C44E52",
}
IDLE_COLOUR = "#EEEEEE"
LABELS = {"F": "forward", "B": "backward", "W": "weight grad", "send": "send/recv", "dp": "DP reduce", "optimizer": "optimizer"}
# Communication runs beside compute: drawn as a thinner bar under the row's centre.
COMPUTE_HEIGHT, COMM_HEIGHT = 0.7, 0.25


def require_matplotlib(flag: str) -> None:
    """matplotlib draws the figures; without it, bad input naming ``flag``
    and how to install it."""
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        raise SpecError(flag, flag.lstrip("-"), "matplotlib installed to draw it: pip install 'loom-planner[plot]'") from None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def timeline_figure(simulation: Simulation, title: str):
    """One row per pipeline stage (stage 0 on top); each event is a bar from
    its start to its end, coloured by kind, over a grey bar spanning the step."""
    plt = _pyplot()
    stages = len(simulation.peak_in_flight)
    fig, ax = plt.subplots(figsize=(12, 0.6 * stages + 1.5))
    for s in range(stages):
        ax.barh(s, simulation.step_time_s, left=0, height=COMPUTE_HEIGHT, color=IDLE_COLOUR, gid="idle")
    for event in simulation.events:
        compute = event.kind in ("F", "B", "W", "optimizer")
        ax.barh(
            event.stage + (0 if compute else COMPUTE_HEIGHT / 2),
            event.end_s - event.start_s,
            left=event.start_s,
            height=COMPUTE_HEIGHT if compute else COMM_HEIGHT,
            color=COLOURS[event.kind],
            edgecolor="white" if compute else None,
            linewidth=0.3,
            gid=event.kind,
        )
    ax.set_yticks(range(stages), [f"stage {s}" for s in range(stages)])
    ax.invert_yaxis()
    ax.set_xlim(0, simulation.step_time_s)
    ax.set_xlabel("seconds into the step")
    ax.set_title(title)
    kinds = [kind for kind in COLOURS if any(event.kind == kind for event in simulation.events)]
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLOURS[k]) for k in kinds] + [plt.Rectangle((0, 0), 1, 1, color=IDLE_COLOUR)]
    ax.legend(handles, [LABELS[k] for k in kinds] + ["idle"], loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=len(kinds) + 1)
    fig.tight_layout()
    return fig


def candidates_figure(labels: list[str], step_times_s: list[float], title: str):
    """Predicted step time of each candidate layout, best on top."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(labels) + 1.2))
    ax.barh(range(len(labels)), step_times_s, color=COLOURS["F"])
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("predicted step time (s)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def save(fig, path: Path, flag: str) -> None:
    """Write ``fig`` as PNG, SVG or a self-contained HTML page, by suffix,
    never half-written (output/files.py write_file)."""
    suffix = path.suffix.lower()

    def fill(temporary: Path) -> None:
        if suffix in (".png", ".svg"):
            fig.savefig(temporary, format=suffix[1:], dpi=120)
        else:
            svg = io.StringIO()
            fig.savefig(svg, format="svg")
            temporary.write_text(f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>loom</title></head>\n<body>\n{svg.getvalue()}\n</body></html>\n")

    try:
        write_file(path, fill, flag)
    finally:
        _pyplot().close(fig)
