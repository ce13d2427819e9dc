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
  line is also printed after the run's first iteration (resumed runs
  included) *without* resetting the interval timer, so the next line
  averages from that iteration too. So when the first line is not at a
  multiple of the interval (or the interval is 1), or the timestamps carry
  microseconds (core_v0.16's), two lines hold the warm-up, else one
  (``warmup_logs``). Each line's ``global batch size`` is kept with its
  interval (a batch-size ramp-up changes it). The interval is the argument dump's ``log_interval``,
  else the commonest gap between lines. Every field ends in ``|``: an
  iteration line without it is cut short, left out when it is the log's
  last line (a run killed mid-write), else bad input;
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
  or ``times across ranks (ms):`` then ``  name:`` and ``     rank  R: t``
  lines (``all``; the slowest rank is taken), printed after each iteration
  line and attached to it (a block ends at the next header or iteration
  line: other ranks' lines may interleave);
- rank 0's ``Theoretical memory footprints: weight and optimizer=A MB,
  activation=B MB, total=C MB`` (megatron/training/theoretical_memory_usage.py,
  core_v0.5+; MB there is 1024 x 1024 bytes): Megatron's own estimate;
- the argument dump of ``_print_args`` (megatron/training/arguments.py):
  ``  name ....... value`` lines between ``--- arguments ---`` and
  ``--- end of arguments ---``, which say the layout the run used.

Launchers' labels ending in a colon (torchrun's ``[default0]:``, ``srun -l``'s
``63:``, padded to the widest task id: ``  7:``, or both: ``  7: [default0]:``)
may precede any line. Every other line is skipped. An iteration line whose
fields do not parse is bad input naming the line.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter

from loom.planner.specs.errors import SpecError
from loom.profiles.run_logs.record import MiB, Interval, RankMemory, RunLog, number

PREFIX = r"^(?:\s*[^\s:]*:)*"  # launchers' labels, stacked: "[default0]:", "63:", srun -l's padded "  7:", "  7: [default0]:"
ITERATION = re.compile(r"\biteration\s+(\d+)\s*/\s*(\d+)\s*\|(.*)$")
CORE_0_16_TIMESTAMP = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}\] iteration")  # strftime('%Y-%m-%d %H:%M:%S.%f')
MEMORY = re.compile(r"\[Rank (\d+)\] \(after (\d+) iterations\) memory \(MB\)((?:\s*\|\s*[a-z ]+:\s*\S+)+)")
TIMERS = re.compile(r"(?:\(min, max\) time|\bmax time|\btimes) across ranks \(ms\):")
TIMER = re.compile(PREFIX + r"\s{2,}([\w-]+) \.*: (?:\(([\d.]+), ([\d.]+)\)|([\d.]+))\s*$")
TIMER_NAME = re.compile(PREFIX + r"\s{1,3}([\w-]+):\s*$")  # --timing-log-option all: the name, then one line per rank
TIMER_RANK = re.compile(PREFIX + r"\s+rank\s+\d+: ([\d.]+)\s*$")
THEORETICAL = re.compile(r"Theoretical memory footprints: weight and optimizer=([\d.]+) MB(?:, activation=([\d.]+) MB, total=([\d.]+) MB)?")
ARGS_START = re.compile(r"-+ arguments -+")
ARGS_END = re.compile(r"-+ end of arguments -+")
ARGUMENT = re.compile(PREFIX + r"\s{1,3}(\w+) \.* ?(.*?)\s*$")  # 48-character names or longer print no dots
MEMORY_FIELDS = {"max allocated": "max_allocated_bytes", "max reserved": "max_reserved_bytes"}


def looks_like(lines: list[str]) -> bool:
    """Whether ``lines`` are a Megatron-LM log (an iteration line, a memory
    report, or the argument dump of a run that stopped before logging)."""
    return any(ITERATION.search(line) or MEMORY.search(line) or ARGS_START.search(line) for line in lines)


def _fields(text: str) -> dict[str, str]:
    """``' key: value | key: value |'`` as a dict."""
    fields = {}
    for part in text.split("|"):
        key, sep, value = part.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def _intervals(lines: list[tuple[int, int, float, int | None]], log_interval: int | None, core_0_16: bool) -> tuple[list[Interval], int]:
    """The logged intervals of ``(iteration, line, seconds per iteration,
    global batch)`` lines, and how many of them hold the warm-up (module
    docstring)."""
    gaps = Counter(b[0] - a[0] for a, b in zip(lines, lines[1:]))
    interval = log_interval or (gaps.most_common(1)[0][0] if gaps else lines[0][0] if lines else 1)
    first_iteration_line = bool(lines) and (core_0_16 or interval == 1 or lines[0][0] % interval != 0)
    intervals, previous = [], None
    for index, (iteration, line, step_s, batch) in enumerate(lines):
        if previous is None:
            first = iteration if first_iteration_line else max(1, iteration - interval + 1)
        elif index == 1 and first_iteration_line:
            first = intervals[0].first  # core_v0.16: the first-iteration line did not reset the timer
        else:
            first = previous + 1
        intervals.append(Interval(first=first, last=iteration, line=line, step_time_s=step_s, global_batch_size=batch))
        previous = iteration
    return intervals, 2 if first_iteration_line else 1


def read(lines: list[str], source: str) -> RunLog:
    """The run a Megatron-LM log describes (module docstring: what is read).

    Raises SpecError naming ``source`` and the line of an unreadable figure,
    or of an iteration that goes back (two runs in one log)."""
    iterations: list[tuple[int, int, float, int | None]] = []
    memory: dict[int, RankMemory] = {}
    timer_blocks: list[tuple[int, dict[str, float]]] = []  # (the iteration line it follows, its timers)
    arguments: dict[str, str] = {}
    estimate = None
    core_0_16 = False
    in_timers = in_args = False
    timer_name = None
    for index, line in enumerate(lines):
        line_number = index + 1
        if in_args:
            if ARGS_END.search(line):
                in_args = False
            elif match := ARGUMENT.match(line):
                arguments[match.group(1)] = match.group(2)
            continue
        if ARGS_START.search(line):
            in_args = True
            continue
        if TIMERS.search(line):
            in_timers, timer_name = True, None
            timer_blocks.append((len(iterations) - 1, {}))
            continue
        if in_timers and not ITERATION.search(line):
            block = timer_blocks[-1][1]
            if match := TIMER.match(line):
                value = match.group(3) or match.group(4)  # the slowest rank's time
                block[match.group(1)] = number(value, source, line_number, f"timer {match.group(1)}") / 1000.0
            elif match := TIMER_NAME.match(line):
                timer_name = match.group(1)
            elif timer_name and (match := TIMER_RANK.match(line)):
                block[timer_name] = max(block.get(timer_name, 0.0), number(match.group(1), source, line_number, f"timer {timer_name}") / 1000.0)
            if match:
                continue
        if match := ITERATION.search(line):
            in_timers = False
            iteration, total = int(match.group(1)), int(match.group(2))
            previous = iterations[-1][0] if iterations else 0
            if iteration < 1 or iteration <= previous or iteration > total:
                raise SpecError(source, f"line {line_number}", f"an iteration after {previous} and at most the run's {total} (one run per log)",
                                iteration)
            if not line.rstrip().endswith("|"):
                if index == len(lines) - 1:
                    break  # cut short as the run was killed
                raise SpecError(source, f"line {line_number}", "an iteration line whose fields end in '|' (is it cut short?)", line.strip())
            core_0_16 = core_0_16 or bool(CORE_0_16_TIMESTAMP.search(line))
            fields = _fields(match.group(3))
            elapsed = fields.get("elapsed time per iteration (ms)")
            if elapsed is None:
                raise SpecError(source, f"line {line_number}", "an 'elapsed time per iteration (ms): X' field in the iteration line", line.strip())
            step_s = number(elapsed, source, line_number, "elapsed time per iteration (ms)") / 1000.0
            if step_s <= 0:
                raise SpecError(source, f"line {line_number}", "an elapsed time per iteration above 0 ms", elapsed)
            batch = fields.get("global batch size")
            iterations.append((iteration, line_number, step_s, int(number(batch, source, line_number, "global batch size")) if batch else None))
            continue
        if match := THEORETICAL.search(line):
            if match.group(3):  # v0.7-v0.14 print only the weights without SP and selective recompute: no total
                estimate = number(match.group(3), source, line_number, "the theoretical memory footprint") * MiB
            continue
        if match := MEMORY.search(line):
            fields = _fields(match.group(3))
            values = {name: number(fields[key], source, line_number, key) * MiB for key, name in MEMORY_FIELDS.items() if key in fields}
            if "max_allocated_bytes" not in values:
                raise SpecError(source, f"line {line_number}", "a memory report with 'max allocated: X' (MB)", line.strip())
            rank = int(match.group(1))
            memory[rank] = RankMemory(rank=rank, line=line_number, **values)  # a later report of a rank includes the optimizer state
    log_interval = arguments.get("log_interval", "").strip()
    intervals, warmup = _intervals(iterations, int(log_interval) if log_interval.isdigit() and int(log_interval) > 0 else None, core_0_16)
    steady_timers = [block for index, block in timer_blocks if index >= warmup]
    timers = {name: statistics.median(block[name] for block in steady_timers if name in block)
              for name in sorted({name for block in steady_timers for name in block})}
    return RunLog(path=source, format="megatron", intervals=tuple(intervals), memory=tuple(sorted(memory.values(), key=lambda m: m.rank)),
                  timers_s=timers, arguments=arguments, warmup_logs=warmup, framework_estimate_bytes=estimate)
