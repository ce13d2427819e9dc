"""What one training run reported, whatever printed it: ``RunLog``.

Every reader (megatron.py, torchtitan.py, deepspeed.py, chrome_trace.py)
returns one. Times are per optimizer step (iteration), memory is bytes per
GPU, and each figure keeps the line it came from so a comparison can cite it.

Steady state: the first logged interval of a run holds its first iteration,
which pays for CUDA context and NCCL communicator set-up, the caching
allocator's first cudaMallocs and any compilation (torch.compile, Triton
autotuning), so the logged intervals that hold it (``RunLog.warmup_logs``,
``WARMUP_LOGS`` unless a reader knows better) are skipped before taking the
median. A run that logged nothing after them has no steady state.
"""

from __future__ import annotations

import gzip
import statistics
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from loom.planner.specs.errors import SpecError

# Logged intervals skipped as warm-up (see the module docstring).
WARMUP_LOGS = 1
# The largest log or trace read (bytes): a month of Megatron iteration lines is ~100 MB.
MAX_LOG_BYTES = 512 * 2**20
MiB = 2**20
GiB = 2**30


@dataclass(frozen=True)
class Interval:
    """One logged interval: iterations ``first``..``last`` (inclusive), and
    what the log printed for them (None: not printed). ``line`` is the
    1-based line number of the log line."""

    first: int
    last: int
    line: int
    step_time_s: float | None = None  # seconds per iteration, averaged over the interval
    tokens_per_s_per_gpu: float | None = None
    samples_per_s: float | None = None  # global samples (sequences) per second
    global_batch_size: int | None = None  # as the line printed it (Megatron's "global batch size")


@dataclass(frozen=True)
class RankMemory:
    """One rank's peak memory in bytes (None: not printed): PyTorch's
    caching-allocator statistics torch.cuda.max_memory_allocated and
    max_memory_reserved."""

    rank: int
    line: int
    max_allocated_bytes: float | None = None
    max_reserved_bytes: float | None = None

    @property
    def peak_bytes(self) -> float:
        """The peak to compare: max reserved (what runs out first: the caching
        allocator holds freed blocks for reuse), else max allocated."""
        return self.max_reserved_bytes if self.reserved else self.max_allocated_bytes or 0.0

    @property
    def reserved(self) -> bool:
        """Whether ``peak_bytes`` is max reserved."""
        return self.max_reserved_bytes is not None


def peak_report(peaks: list[tuple[float, int]], rank: int, reserved: bool) -> tuple[RankMemory, ...]:
    """The largest of a log's ``(bytes, line)`` peaks as rank ``rank``'s report."""
    if not peaks:
        return ()
    peak, line = max(peaks)
    return (RankMemory(rank=rank, line=line, **{"max_reserved_bytes" if reserved else "max_allocated_bytes": peak}),)


@dataclass(frozen=True)
class RunLog:
    """A run as its log or trace reported it.

    ``timers_s``: named phases of a steady-state step in seconds (Megatron's
    timers, DeepSpeed's wall-clock breakdown, or a trace's kernel classes:
    see each reader); ``arguments``: the configuration the run printed
    (Megatron's argument dump), for checking it against a plan;
    ``parameters``: the model's parameter count where the log printed it."""

    path: str
    format: str  # megatron | torchtitan | deepspeed | chrome-trace
    intervals: tuple[Interval, ...] = ()
    memory: tuple[RankMemory, ...] = ()
    timers_s: dict[str, float] = field(default_factory=dict)
    exposed_s: dict[str, float] = field(default_factory=dict)  # a trace's collectives not hidden behind compute kernels
    arguments: dict[str, str] = field(default_factory=dict)
    parameters: int | None = None
    rank: int | None = None  # the rank a trace was taken on
    framework_estimate_bytes: float | None = None  # the framework's own memory estimate (Megatron's theoretical footprint)
    warmup_logs: int = WARMUP_LOGS  # leading intervals that hold the warm-up
    pipelined: bool | None = None  # whether the run had pipeline stages, where its log's format says (DeepSpeed's engines)

    @property
    def steady(self) -> tuple[Interval, ...]:
        """The intervals after the warm-up ones."""
        return self.intervals[self.warmup_logs:]

    @property
    def warmup_iterations(self) -> int:
        """Iterations left out as warm-up, counted from the first the log covers."""
        skipped = self.intervals[:self.warmup_logs]
        return skipped[-1].last - self.intervals[0].first + 1 if skipped else 0

    def step_time_s(self, tokens_per_step_per_gpu: float | None = None, samples_per_step: float | None = None) -> float:
        """Median seconds per steady-state iteration. A log that printed only
        a rate needs the step's size to turn it into a time: tokens per GPU
        (torchtitan's tps) or global samples (DeepSpeed's samples/s).

        Raises SpecError naming the log when no steady-state interval has a time."""
        times = []
        for interval in self.steady:
            if interval.step_time_s is not None:
                times.append(interval.step_time_s)
            elif interval.tokens_per_s_per_gpu and tokens_per_step_per_gpu:
                times.append(tokens_per_step_per_gpu / interval.tokens_per_s_per_gpu)
            elif interval.samples_per_s and samples_per_step:
                times.append(samples_per_step / interval.samples_per_s)
        if not self.intervals:
            raise SpecError(self.path, "iterations", "logged iterations (this run logged none: did it stop before its first logged "
                            "interval?)")
        if not times:
            warmup = f" after the {self.warmup_logs} that hold the warm-up" if self.warmup_logs else ""
            raise SpecError(self.path, "iterations", f"a logged interval with a step time or rate{warmup}; run more iterations",
                            f"{len(self.intervals)} logged")
        return statistics.median(times)

    @property
    def peak_memory(self) -> RankMemory | None:
        """The rank whose peak (``RankMemory.peak_bytes``) is largest."""
        return max(self.memory, key=lambda m: m.peak_bytes) if self.memory else None


def read_text(path: Path, what: str) -> str:
    """A log or trace file's text (gunzipped when it ends in .gz);
    undecodable bytes become U+FFFD (a log is read line by line, and one
    mangled byte spoils only its line).

    Raises SpecError naming ``path``: missing, a folder, unreadable, too large, not gzip or empty."""
    if path.is_dir():
        raise SpecError(str(path), "<file>", f"a {what}, not a folder")
    if not path.is_file():
        raise SpecError(str(path), "<file>", f"an existing {what}")
    size = path.stat().st_size
    if size > MAX_LOG_BYTES:
        raise SpecError(str(path), "<file>", f"a {what} of at most {MAX_LOG_BYTES // MiB} MiB", f"{size:,} bytes")
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as file:
                data = file.read(MAX_LOG_BYTES + 1)
            if len(data) > MAX_LOG_BYTES:
                raise SpecError(str(path), "<file>", f"a {what} of at most {MAX_LOG_BYTES // MiB} MiB unzipped")
        else:
            data = path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error):
        raise SpecError(str(path), "<file>", f"a gzip-compressed {what} (the name ends in .gz)") from None
    except OSError as error:
        raise SpecError(str(path), "<file>", f"a readable {what} ({error.strerror or error})") from None
    text = data.decode("utf-8", errors="replace")
    if not text.strip():
        raise SpecError(str(path), "<file>", f"a {what}", "an empty file")
    return text


def log_text(path: Path, what: str) -> list[str]:
    """The lines of a log file (``read_text``)."""
    return read_text(path, what).splitlines()


def number(text: str, source: str, line: int, what: str) -> float:
    """A finite, non-negative number printed in a log (thousands separators allowed).

    Raises SpecError naming the line."""
    try:
        value = float(text.replace(",", ""))
    except ValueError:
        raise SpecError(source, f"line {line}", f"a number for {what}", text) from None
    if not (value >= 0 and value != float("inf")):
        raise SpecError(source, f"line {line}", f"a finite number >= 0 for {what}", text)
    return value
