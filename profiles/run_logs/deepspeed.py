"""DeepSpeed training logs (the engine's stdout, rank 0).

Lines read (any prefix, such as ``log_dist``'s ``[Rank 0]``, is fine):

- ``ThroughputTimer.stop`` (deepspeed/utils/timer.py), every
  ``steps_per_print`` optimizer steps: ``epoch=E/micro_step=M/global_step=G,
  RunningAvgSamplesPerSec=R, CurrSamplesPerSec=C, MemAllocated=A GB,
  MaxMemAllocated=B GB``. ``C`` is ``train_batch_size`` (the global batch,
  engine.py passes ``self.train_batch_size()``) over the seconds of step G;
  the memory figures are torch.cuda.memory_allocated / max_memory_allocated
  in GiB (divided by 1024**3), rounded to 0.01. Steps up to the timer's own
  ``start_step`` (2: it leaves them out of its running average) are warm-up;
  a step whose rate printed as inf or nan (a step shorter than the timer's
  epsilon) is skipped; a line without its last field (``MaxMemAllocated=
  X GB``) is cut short: left out when it is the log's last line (a run
  killed mid-write), else bad input;
- with ``wall_clock_breakdown``, ``Timers.log`` (deepspeed/utils/timer.py):
  ``time (ms) | fwd: X | bwd: Y | bwd_inner: Z | bwd_allreduce: W | step: V``
  after every optimizer step (``DeepSpeedEngine.step``: the global timers,
  each summed over the step's micro batches and reset; the ``*_microstep``
  lines are per micro batch and are skipped); the first
  ``THROUGHPUT_START_STEP`` steps' are warm-up.
"""

from __future__ import annotations

import re
import statistics

from loom.planner.specs.errors import SpecError
from loom.profiles.run_logs.record import GiB, Interval, RunLog, number, peak_report

THROUGHPUT = re.compile(r"epoch=(\d+)/micro_step=(\d+)/global_step=(\d+),(.*)$")
KEY_VALUE = re.compile(r"(\w+)=([^,\s]+)")
THROUGHPUT_START_STEP = 2  # ThroughputTimer(start_step=2): steps it leaves out as warm-up
TIMERS = re.compile(r"\btime \(ms\)((?:\s*\|\s*\w+:\s*\S+)+)")


def looks_like(lines: list[str]) -> bool:
    """Whether ``lines`` are a DeepSpeed log (a ThroughputTimer line)."""
    return any(THROUGHPUT.search(line) for line in lines)


def read(lines: list[str], source: str) -> RunLog:
    """The run a DeepSpeed log describes (module docstring: what is read).

    Raises SpecError naming ``source`` and the line of an unreadable figure."""
    intervals: list[Interval] = []
    peaks: list[tuple[float, int]] = []
    blocks: list[dict[str, float]] = []
    previous = 0
    for index, line in enumerate(lines):
        line_number = index + 1
        if match := THROUGHPUT.search(line):
            step = int(match.group(3))
            if step <= previous:
                raise SpecError(source, f"line {line_number}", f"a global step after {previous}", step)
            fields = dict(KEY_VALUE.findall(match.group(4)))
            if not fields.get("MaxMemAllocated", "").endswith("GB"):
                if index == len(lines) - 1:
                    break  # cut short as the run was killed
                raise SpecError(source, f"line {line_number}", "a throughput line ending in 'MaxMemAllocated=X GB' (is it cut short?)",
                                line.strip())
            if "CurrSamplesPerSec" not in fields:
                raise SpecError(source, f"line {line_number}", "a 'CurrSamplesPerSec=X' field", line.strip())
            peaks.append((number(fields["MaxMemAllocated"].removesuffix("GB"), source, line_number, "MaxMemAllocated") * GiB, line_number))
            previous = step
            if fields["CurrSamplesPerSec"].lower().lstrip("+-") in ("inf", "nan"):
                continue
            rate = number(fields["CurrSamplesPerSec"], source, line_number, "CurrSamplesPerSec")
            if rate <= 0:
                raise SpecError(source, f"line {line_number}", "CurrSamplesPerSec above 0", fields["CurrSamplesPerSec"])
            intervals.append(Interval(first=step, last=step, line=line_number, samples_per_s=rate))
            continue
        if (match := TIMERS.search(line)) and "_microstep" not in line:
            block = {}
            for part in match.group(1).split("|"):
                name, sep, value = part.partition(":")
                if sep:
                    block[name.strip()] = number(value.strip(), source, line_number, f"timer {name.strip()}") / 1000.0
            blocks.append(block)
    steady = blocks[THROUGHPUT_START_STEP:] or blocks
    timers = {name: statistics.median(block[name] for block in steady if name in block) for name in sorted({n for b in steady for n in b})}
    warmup = sum(interval.last <= THROUGHPUT_START_STEP for interval in intervals)
    return RunLog(path=source, format="deepspeed", intervals=tuple(intervals), memory=peak_report(peaks, 0, reserved=False), timers_s=timers,
                  warmup_logs=warmup)
