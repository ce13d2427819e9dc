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

A pipeline (``PipelineEngine``, deepspeed/runtime/pipe/engine.py) never stops
the throughput timer (its ``train_batch`` skips ``DeepSpeedEngine.step``);
``train_batch`` prints instead, every ``steps_per_print`` steps: ``steps: G
loss: L [name: value ...] iter time (s): T samples/sec: S``, T the mean over
the steps since the last line (the train_batch timer, reset at each line), S
``train_batch_size`` / T. The first line holds the run's first step
(warm-up). Its wall-clock timers (the global ones and ``pipe_send_output``,
``pipe_send_grad``, ``pipe_recv_input``, ``pipe_recv_grad``) are logged at
those steps only, each summed since the last line: divided here by the steps
between lines; the first of each is warm-up. It prints no memory figure.
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
PIPELINE_STEP = re.compile(r"\bsteps: (\d+) loss: ")
PIPELINE_RATE = re.compile(r"\biter time \(s\): (\S+) samples/sec: (\S+)")
PIPELINE_PRINT_ROUNDING = 0.0005  # both figures print with 3 decimals: each is within this of its value (s, samples/s)


def looks_like(lines: list[str]) -> bool:
    """Whether ``lines`` are a DeepSpeed log (a ThroughputTimer line, or a
    PipelineEngine's ``steps: ...`` line)."""
    return any(THROUGHPUT.search(line) or PIPELINE_STEP.search(line) for line in lines)


def read(lines: list[str], source: str) -> RunLog:
    """The run a DeepSpeed log describes (module docstring: what is read).

    Raises SpecError naming ``source`` and the line of an unreadable figure."""
    if not any(THROUGHPUT.search(line) for line in lines):
        return _read_pipeline(lines, source)
    intervals: list[Interval] = []
    peaks: list[tuple[float, int]] = []
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
            if _unmeasured(fields["CurrSamplesPerSec"]):
                continue
            rate = _positive(fields["CurrSamplesPerSec"], source, line_number, "CurrSamplesPerSec")
            intervals.append(Interval(first=step, last=step, line=line_number, samples_per_s=rate))
    warmup = sum(interval.last <= THROUGHPUT_START_STEP for interval in intervals)
    return RunLog(path=source, format="deepspeed", intervals=tuple(intervals), memory=peak_report(peaks, 0, reserved=False),
                  timers_s=_timers(lines, source, skip=THROUGHPUT_START_STEP, steps_per_value=1), warmup_logs=warmup, pipelined=False)


def _read_pipeline(lines: list[str], source: str) -> RunLog:
    """A PipelineEngine's log (module docstring): one interval per ``steps:``
    line, from the step after the previous line's to its own, timed by its
    samples/sec (exact to 3 decimals; the 3-decimal iter time is not, for
    short steps), with the global batch the two figures together fix."""
    intervals: list[Interval] = []
    previous = 0
    for index, line in enumerate(lines):
        if not (step_match := PIPELINE_STEP.search(line)):
            continue
        line_number, step = index + 1, int(step_match.group(1))
        if not (match := PIPELINE_RATE.search(line, step_match.end())):
            if index == len(lines) - 1:
                break  # cut short as the run was killed
            raise SpecError(source, f"line {line_number}", "a pipeline line ending in 'iter time (s): T samples/sec: S' (is it cut short?)",
                            line.strip())
        if step <= previous:
            raise SpecError(source, f"line {line_number}", f"a step after {previous}", step)
        first, previous = previous + 1, step
        if _unmeasured(match.group(1)) or _unmeasured(match.group(2)):
            continue
        iteration_s = number(match.group(1), source, line_number, "iter time (s)")
        rate = _positive(match.group(2), source, line_number, "samples/sec")
        batch = rate * iteration_s
        known = (rate + iteration_s) * PIPELINE_PRINT_ROUNDING < 0.5  # the product is within half a sample of the batch
        intervals.append(Interval(first=first, last=step, line=line_number, samples_per_s=rate,
                                  global_batch_size=round(batch) if known and batch >= 1 else None))
    spacing = intervals[-1].last - intervals[-1].first + 1 if intervals else 1
    return RunLog(path=source, format="deepspeed", intervals=tuple(intervals), timers_s=_timers(lines, source, skip=1, steps_per_value=spacing),
                  pipelined=True)


def _unmeasured(text: str) -> bool:
    """A rate or time printed as inf or nan (a step shorter than the timer resolves)."""
    return text.lower().lstrip("+-") in ("inf", "nan")


def _positive(text: str, source: str, line_number: int, what: str) -> float:
    value = number(text, source, line_number, what)
    if value <= 0:
        raise SpecError(source, f"line {line_number}", f"{what} above 0", text)
    return value


def _timers(lines: list[str], source: str, skip: int, steps_per_value: int) -> dict[str, float]:
    """Each wall-clock timer's median in seconds per step, its first ``skip``
    values (warm-up) left out, each value covering ``steps_per_value`` steps;
    the per-micro-batch ``*_microstep`` timers are not read."""
    values: dict[str, list[float]] = {}
    for index, line in enumerate(lines):
        if (match := TIMERS.search(line)) and "_microstep" not in line:
            for part in match.group(1).split("|"):
                name, sep, value = part.partition(":")
                if sep:
                    values.setdefault(name.strip(), []).append(number(value.strip(), source, index + 1, f"timer {name.strip()}") / 1000.0)
    return {name: statistics.median(series[skip:] or series) / steps_per_value for name, series in sorted(values.items())}
