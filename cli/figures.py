"""Figures for ``loom explain``: the simulated schedule as a Gantt chart and
the predicted step time of the candidate layouts. matplotlib draws them
(the ``plot`` extra); ``.png`` and ``.svg`` are written by matplotlib, and
``.html`` is a self-contained page around the SVG.

A schedule of thousands of micro batches would be a wash of sub-pixel bars
(and take minutes to draw one patch at a time): the timeline draws bars as one
collection per stage and kind, and a long schedule as two windows, its start
and its end, bounded in ops per stage (``timeline_windows``)."""

from __future__ import annotations

import io
from pathlib import Path

from rich.markup import escape

from loom.cli.common import err
from loom.planner.output.files import write_file
from loom.planner.specs.errors import SpecError
from loom.planner.schedule.simulate import COMPUTE_KINDS, Event, Simulation

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


# Each stage's row shows at most this many compute ops (F, B, W) per window.
# The figure's axes are about 1,300 px wide (12 in at 120 dpi): two full
# windows leave about 5 px per op, the narrowest a bar still reads as one op;
# and the 70B example's interleaved warm-up (86 forwards on stage 0) fits in
# one window with its first steady ops.
MAX_OPS_PER_WINDOW = 128
# Ops of steady state each window shows beyond the longest warm-up (and
# cool-down): eight forward-backward pairs, enough to see the pattern repeat.
STEADY_OPS_SHOWN = 16
# Neither window is drawn narrower than this share of the wider one, so a
# short warm-up next to a long exposed reduce stays legible.
MIN_WINDOW_WIDTH_SHARE = 1 / 3


def timeline_windows(simulation: Simulation) -> tuple[tuple[float, float], ...]:
    """The spans of the step, (start_s, end_s) in seconds, that the timeline
    draws. The whole step when no stage runs more than two windows' ops;
    otherwise the start of the step (the warm-up and the first steady ops)
    and its end (the last steady ops, the cool-down, the gradient reduce and
    the optimizer), each holding at most ``ops_per_window`` compute ops of
    any stage: min(MAX_OPS_PER_WINDOW, longest warm-up or cool-down +
    STEADY_OPS_SHOWN)."""
    rows = _compute_rows(simulation)
    per_window = ops_per_window(rows)
    step_s = simulation.step_time_s
    if all(len(row) <= 2 * per_window for row in rows):
        return ((0.0, step_s),)
    # No row starts more than per_window ops before first_end, nor ends more than per_window after last_start.
    first_end_s = min(row[per_window].start_s for row in rows if len(row) > per_window)
    last_start_s = max(row[-per_window - 1].end_s for row in rows if len(row) > per_window)
    return ((0.0, first_end_s), (last_start_s, step_s))


def ops_per_window(rows: list[list[Event]]) -> int:
    """Compute ops per stage a timeline window holds, for ``rows`` (each
    stage's compute events in start order): enough for the longest warm-up
    (ops before a stage's first B) or cool-down (after its last F) and
    STEADY_OPS_SHOWN more, at most MAX_OPS_PER_WINDOW."""
    def edge(row: list[Event]) -> int:
        kinds = [event.kind for event in row]
        warmup = kinds.index("B") if "B" in kinds else len(kinds)
        cooldown = kinds[::-1].index("F") if "F" in kinds else len(kinds)
        return max(warmup, cooldown)

    return min(MAX_OPS_PER_WINDOW, max(map(edge, rows), default=0) + STEADY_OPS_SHOWN)


def _compute_rows(simulation: Simulation) -> list[list[Event]]:
    """Each stage's compute events (F, B, W), in start order."""
    rows: list[list[Event]] = [[] for _ in simulation.peak_in_flight]
    for event in simulation.events:
        if event.kind in COMPUTE_KINDS:
            rows[event.stage].append(event)
    return rows


def timeline_figure(simulation: Simulation, title: str):
    """One row per pipeline stage (stage 0 on top); each event a bar from its
    start to its end (seconds), coloured by kind, over a grey idle bar. Bars
    of one kind on one stage are one ``broken_barh`` collection (gid: the
    kind; idle rows have gid "idle"). A long schedule is drawn in two
    windows (``timeline_windows``), one axes each, the title saying what was
    left out; at most 2 x ops_per_window compute ops per stage (and a send
    each) are drawn however many micro batches the step runs."""
    plt = _pyplot()
    stages = len(simulation.peak_in_flight)
    windows = timeline_windows(simulation)
    widths_s = [end_s - start_s for start_s, end_s in windows]
    ratios = [max(width_s, MIN_WINDOW_WIDTH_SHARE * max(widths_s)) for width_s in widths_s]
    fig, axes = plt.subplots(1, len(windows), sharey=True, figsize=(12, 0.6 * stages + 2), squeeze=False, layout="constrained",
                             gridspec_kw={"width_ratios": ratios})
    drawn = 0
    for ax, (start_s, end_s) in zip(axes[0], windows):
        shown = simulation.events if len(windows) == 1 else [e for e in simulation.events if e.start_s < end_s and e.end_s > start_s]
        drawn += sum(event.kind in COMPUTE_KINDS for event in shown)
        _draw_window(ax, shown, stages, start_s, end_s)
    first, last = axes[0][0], axes[0][-1]
    first.set_yticks(range(stages), [f"stage {s}" for s in range(stages)])
    first.invert_yaxis()
    if len(windows) > 1:
        first.spines["right"].set_visible(False)
        last.spines["left"].set_visible(False)
        last.tick_params(axis="y", left=False)
        total = sum(event.kind in COMPUTE_KINDS for event in simulation.events)
        title += (f"\nshowing {windows[0][1]:.2f} s from the start and {windows[1][1] - windows[1][0]:.2f} s to the end of the "
                  f"{simulation.step_time_s:.2f} s step; {total - drawn:,} of {total:,} compute ops in between not drawn")
    for ax in axes[0]:
        ax.set_xlabel("seconds into the step")
    fig.suptitle(title)
    kinds = [kind for kind in COLOURS if any(event.kind == kind for event in simulation.events)]
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLOURS[k]) for k in kinds] + [plt.Rectangle((0, 0), 1, 1, color=IDLE_COLOUR)]
    fig.legend(handles, [LABELS[k] for k in kinds] + ["idle"], loc="outside lower center", ncol=len(kinds) + 1)
    return fig


def _draw_window(ax, events, stages: int, start_s: float, end_s: float) -> None:
    """``events`` on ``ax`` from ``start_s`` to ``end_s``: an idle bar per
    stage, then one collection per kind and stage (compute under communication)."""
    for s in range(stages):
        ax.broken_barh([(start_s, end_s - start_s)], (s - COMPUTE_HEIGHT / 2, COMPUTE_HEIGHT), facecolors=IDLE_COLOUR, gid="idle")
    spans: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for event in events:
        spans.setdefault((event.kind, event.stage), []).append((event.start_s, event.end_s - event.start_s))
    for (kind, stage), ranges in sorted(spans.items(), key=lambda item: (list(COLOURS).index(item[0][0]), item[0][1])):
        compute = kind in (*COMPUTE_KINDS, "optimizer")
        height = COMPUTE_HEIGHT if compute else COMM_HEIGHT
        centre = stage + (0 if compute else COMPUTE_HEIGHT / 2)
        ax.broken_barh(ranges, (centre - height / 2, height), facecolors=COLOURS[kind], edgecolors="white" if compute else "none",
                       linewidth=0.3, gid=kind)
    ax.set_xlim(start_s, end_s)


# Candidates chart: the x axis spans the step times with these margins (shares
# of their spread): a little on the left so the fastest bar shows, more on the
# right for the value labels.
LEFT_MARGIN_SHARE, RIGHT_MARGIN_SHARE = 0.1, 0.35
# Candidates of one search differ by a few per cent; when all are equal the
# axis spans this share of the value instead.
FLAT_SPREAD_SHARE = 0.02
BEST_COLOUR = "#2E8B57"  # green: no kind of work uses it
# Inches per candidate: ~30 candidates stay readable at 9 pt on a 10-in page.
CANDIDATE_ROW_IN = 0.3


def candidates_figure(labels: list[str], step_times_s: list[float], title: str):
    """Predicted step time (seconds) of each candidate layout, in the given
    order (best first from a report), one horizontal bar each labelled with
    its value and how much slower than the fastest it is; the fastest is
    marked (its colour, "best", a dotted line).
    The x axis covers the values' range with a margin, not from 0: bars
    then show differences of a few per cent."""
    plt = _pyplot()
    count = len(labels)
    best = min(range(count), key=step_times_s.__getitem__)
    fig, ax = plt.subplots(figsize=(10, CANDIDATE_ROW_IN * count + 1.6), layout="constrained")
    bars = ax.barh(range(count), step_times_s, color=[BEST_COLOUR if i == best else COLOURS["F"] for i in range(count)], gid="candidate")
    low_s, high_s = min(step_times_s), max(step_times_s)
    spread_s = high_s - low_s or FLAT_SPREAD_SHARE * high_s
    ax.set_xlim(max(0.0, low_s - LEFT_MARGIN_SHARE * spread_s), high_s + RIGHT_MARGIN_SHARE * spread_s)
    decimals = _distinct_decimals(step_times_s)
    best_s = step_times_s[best]
    values = [f"{t:.{decimals}f} s " + ("best" if i == best else f"+{t / best_s - 1:.1%}") for i, t in enumerate(step_times_s)]
    ax.bar_label(bars, values, padding=3, fontsize=9, gid="value")
    ax.axvline(best_s, color=BEST_COLOUR, linestyle=":", linewidth=1, gid="best")
    ax.set_yticks(range(count), [f"{i + 1}. {label}" for i, label in enumerate(labels)], fontsize=9)
    ax.get_yticklabels()[best].set_fontweight("bold")
    ax.invert_yaxis()
    ax.set_xlabel(f"predicted step time (s); the axis starts at {ax.get_xlim()[0]:.{decimals}f} s")
    ax.set_title(title)
    return fig


def _distinct_decimals(values: list[float]) -> int:
    """Decimals (3 to 6) at which distinct ``values`` print distinct."""
    for decimals in range(3, 6):
        if len({f"{v:.{decimals}f}" for v in values}) == len(set(values)):
            return decimals
    return 6


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
    err.print(f"wrote {escape(str(path))}")
