"""Megatron-LM training logs (``pretrain_gpt.py``'s stdout), 2023-2026.

Lines read (each found anywhere in a line, so launcher prefixes such as
torchrun's ``[default0]:`` or a timestamp are fine):

- the iteration line of ``training_log`` (megatron/training/training.py;
  megatron/training.py before core_r0.6): ``' iteration {:8d}/{:8d} |'`` then
  ``' key: value |'`` fields, among them ``elapsed time per iteration (ms)``
  (the mean over the ``--log-interval`` iterations since the previous line),
  ``throughput per GPU (TFLOP/s/GPU)`` (with ``--log-throughput``) and
  ``global batch size``. Until core_v0.15 the first line comes at the first
  multiple of the interval and averages in the start-up; from core_v0.16 a
  line is also printed after iteration 1 *without* resetting the interval
  timer, so the next line averages from iteration 1 too: when the first line
  is of iteration 1, two lines hold the warm-up (``warmup_logs``);
- the per-rank memory report of ``report_memory`` (megatron/training/utils.py):
  ``[Rank R] (after N iterations) memory (MB) | allocated: A | max allocated: B
  | reserved: C | max reserved: D``, in MiB (1024 x 1024 bytes), printed once,
  after the first logged interval (core_v0.16+: also after the second), by
  each rank whose data-parallel rank is 0; its values are raw floats until
  core_v0.15, ``:.2f`` after;
- the timers of ``Timers.log`` (megatron/core/timers.py) that
  ``--timing-log-level`` switches on, per iteration in ms (normalised by the
  log interval): ``(min, max) time across ranks (ms):`` then
  ``    name ........: (min, max)`` lines (``--timing-log-option minmax``,
  the default), or ``max time across ranks (ms):`` then ``    name ....: max``
  (core_v0.16+ logs the header through ``logging``: ``INFO:megatron.core.timers:``),
  printed after each iteration line and attached to it;
- rank 0's ``Theoretical memory footprints: weight and optimizer=A MB,
  activation=B MB, total=C MB`` (megatron/training/theoretical_memory_usage.py,
  core_v0.5+; MB there is 1024 x 1024 bytes): Megatron's own estimate;
- the argument dump of ``_print_args`` (megatron/training/arguments.py):
  ``  name ....... value`` lines between ``--- arguments ---`` and
  ``--- end of arguments ---``, which say the layout the run used.

Every other line is skipped. An iteration line whose fields do not parse is
bad input naming the line.
"""

from __future__ import annotations

import re
import statistics

from loom.planner.specs.errors import SpecError
from loom.profiles.run_logs.record import MiB, Interval, RankMemory, RunLog, number

ITERATION = re.compile(r"\biteration\s+(\d+)\s*/\s*(\d+)\s*\|(.*)$")
MEMORY = re.compile(r"\[Rank (\d+)\] \(after (\d+) iterations\) memory \(MB\)((?:\s*\|\s*[a-z ]+:\s*\S+)+)")
TIMERS_MINMAX = re.compile(r"\(min, max\) time across ranks \(ms\):")
TIMERS_MAX = re.compile(r"\bmax time across ranks \(ms\):")
TIMER = re.compile(r"^(?:.*?\]:)?\s{2,}([\w-]+) \.*: (?:\(([\d.]+), ([\d.]+)\)|([\d.]+))\s*$")
THEORETICAL = re.compile(r"Theoretical memory footprints: weight and optimizer=([\d.]+) MB(?:, activation=([\d.]+) MB, total=([\d.]+) MB)?")
ARGS_START = re.compile(r"-+ arguments -+")
ARGS_END = re.compile(r"-+ end of arguments -+")
ARGUMENT = re.compile(r"^(?:.*?\]:)?\s{2}(\w+) \.* ?(.*?)\s*$")  # 48-character names or longer print no dots
MEMORY_FIELDS = {"allocated": "allocated_bytes", "max allocated": "max_allocated_bytes", "reserved": "reserved_bytes",
                 "max reserved": "max_reserved_bytes"}


def looks_like(lines: list[str]) -> bool:
    """Whether ``lines`` are a Megatron-LM log (an iteration line or a memory report)."""
    return any(ITERATION.search(line) or MEMORY.search(line) for line in lines)


def _fields(text: str) -> dict[str, str]:
    """``' key: value | key: value |'`` as a dict."""
    fields = {}
    for part in text.split("|"):
        key, sep, value = part.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def read(lines: list[str], source: str) -> RunLog:
    """The run a Megatron-LM log describes (module docstring: what is read).

    Raises SpecError naming ``source`` and the line of an unreadable figure."""
    intervals: list[Interval] = []
    memory: dict[int, RankMemory] = {}
    timer_blocks: list[tuple[int, dict[str, float]]] = []  # (the iteration line it follows, its timers)
    arguments: dict[str, str] = {}
    estimate = None
    in_timers = in_args = False
    previous = 0
    for index, line in enumerate(lines):
        number_ = index + 1
        if in_args:
            if ARGS_END.search(line):
                in_args = False
            elif match := ARGUMENT.match(line):
                arguments[match.group(1)] = match.group(2)
            continue
        if ARGS_START.search(line):
            in_args = True
            continue
        if in_timers:
            if match := TIMER.match(line):
                value = match.group(3) or match.group(4)  # the slowest rank's time
                timer_blocks[-1][1][match.group(1)] = number(value, source, number_, f"timer {match.group(1)}") / 1000.0
                continue
            in_timers = False
        if TIMERS_MINMAX.search(line) or TIMERS_MAX.search(line):
            in_timers = True
            timer_blocks.append((len(intervals) - 1, {}))
            continue
        if match := ITERATION.search(line):
            iteration, total = int(match.group(1)), int(match.group(2))
            if iteration < 1 or iteration <= previous or iteration > total:
                raise SpecError(source, f"line {number_}", f"an iteration after {previous} and at most the run's {total}", iteration)
            fields = _fields(match.group(3))
            elapsed = fields.get("elapsed time per iteration (ms)")
            if elapsed is None:
                raise SpecError(source, f"line {number_}", "an 'elapsed time per iteration (ms): X' field in the iteration line", line.strip())
            throughput = fields.get("throughput per GPU (TFLOP/s/GPU)")
            step_s = number(elapsed, source, number_, "elapsed time per iteration (ms)") / 1000.0
            if step_s <= 0:
                raise SpecError(source, f"line {number_}", "an elapsed time per iteration above 0 ms", elapsed)
            intervals.append(Interval(first=previous + 1, last=iteration, line=number_, step_time_s=step_s,
                                      tflops_per_gpu=None if throughput is None else number(throughput, source, number_, "throughput per GPU")))
            previous = iteration
            continue
        if match := THEORETICAL.search(line):
            if match.group(3):  # v0.7-v0.14 print only the weights without SP and selective recompute: no total
                estimate = number(match.group(3), source, number_, "the theoretical memory footprint") * MiB
            continue
        if match := MEMORY.search(line):
            fields = _fields(match.group(3))
            values = {name: number(fields[key], source, number_, key) * MiB for key, name in MEMORY_FIELDS.items() if key in fields}
            if "max_allocated_bytes" not in values:
                raise SpecError(source, f"line {number_}", "a memory report with 'max allocated: X' (MB)", line.strip())
            rank = int(match.group(1))
            memory[rank] = RankMemory(rank=rank, line=number_, **values)  # a later report of a rank includes the optimizer state
    warmup = 2 if intervals and intervals[0].last == 1 else 1
    steady_timers = [block for index, block in timer_blocks if index >= warmup]
    timers: dict[str, float] = {}
    for name in {name for block in steady_timers for name in block}:
        timers[name] = statistics.median(block[name] for block in steady_timers if name in block)
    return RunLog(path=source, format="megatron", intervals=tuple(intervals), memory=tuple(sorted(memory.values(), key=lambda m: m.rank)),
                  timers_s=dict(sorted(timers.items())), arguments=arguments, warmup_logs=warmup, framework_estimate_bytes=estimate)
