"""Import nccl-tests logs (``loom profile nccl-tests``).

nccl-tests (github.com/NVIDIA/nccl-tests) prints the same table for every
``*_perf`` binary (src/util.cu ``writeResultHeader``; src/common.cu in older
versions): ``#`` header lines (the run's settings, one ``#  Rank ...`` line per
GPU, the column names), then one row per message size::

    size count type redop root | time algbw busbw #wrong | time algbw busbw #wrong
                                 out-of-place              in-place

with time in microseconds and bandwidths in GB/s (1e9 bytes/s), and finally
``# Avg bus bandwidth : X``, the mean busbw of every printed cell. busbw is
algbw times the operation's factor, e.g. 2(n-1)/n for all-reduce and 1 for
send/recv (doc/PERFORMANCE.md). Columns are found by name, so the
per-iteration columns of ``-I`` and the timestamps of ``-S`` do not shift
them. ``#wrong`` is ``N/A`` where nothing was checked (in-place send/recv).

The profile (``kind: nccl-tests``, ``schema_version`` 1) holds one entry per
log under ``runs``; the pydantic models below are its single definition and
``nccl_tests.schema.json`` is generated from them (``python -m
loom.profiles.nccl_tests``; a test keeps it in sync).

The same models check a log as it is imported and a profile as it is read
back (a cluster file's ``nccl_tests:``): times finite and positive,
bandwidths finite and non-negative (small messages print 0.00), no cell
whose ``#wrong`` is above 0 (nccl-tests' check of the result failed, so the
timing is of a broken run), and a run on two or more GPUs must show a bus
bandwidth above 0 at its largest message, which is what calibrates the
links. A log that reports out-of-bounds values is refused as well.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal

import pydantic

from loom.planner.specs.errors import SpecError
from loom.planner.specs.files import StrictModel, validate

SCHEMA_VERSION = 1
SCHEMA_FILE = Path(__file__).with_name("nccl_tests.schema.json")

# The binaries nccl-tests builds (src/Makefile BIN_FILES_LIST), longest names first.
BINARY = re.compile(r"(all_reduce|all_gather|alltoallv|alltoall|broadcast|reduce_scatter|reduce|scatter|gather|sendrecv|hypercube)_perf")
PROGRAM = re.compile(r"#\s*Collective test starting:\s*(\S+)")
VERSION = re.compile(r"#\s*nccl-tests version\s+(\S+)")
DEVICE = re.compile(r"#\s+Rank\s+(\d+)(?:\s+Group\s+\d+)?\s+Pid\s+\d+\s+on\s+(\S+)\s+device\s+(\d+)\s+\[[^\]]*\]\s+(.*\S)")
AVERAGE = re.compile(r"#\s*Avg bus bandwidth\s*:\s*(\S+)")
OUT_OF_BOUNDS = re.compile(r"#\s*Out of bounds values\s*:\s*(\d+)")
TIME_COLUMNS = ("time", "cputime")  # cputime with -C 1


Microseconds = Annotated[float, pydantic.Field(gt=0, allow_inf_nan=False)]
GBps = Annotated[float, pydantic.Field(ge=0, allow_inf_nan=False)]  # printed to 2 decimals: small messages read 0.00
Index = Annotated[int, pydantic.Field(ge=0)]


def _nothing_wrong(wrong: int) -> int:
    if wrong != 0:
        raise ValueError("0: nccl-tests found wrong values in the result, so the timing is of a broken run")
    return wrong


class Cell(StrictModel):
    """One placement (out-of-place or in-place) of one row."""

    time_us: Microseconds
    algbw_GBps: GBps
    busbw_GBps: GBps
    wrong: Annotated[int, pydantic.AfterValidator(_nothing_wrong)] | None = pydantic.Field(
        description="values the result check found wrong: 0 (a row with any is refused), or null where nccl-tests printed N/A (not checked)")


# nccl-tests' bus factors (doc/PERFORMANCE.md) are at most 2 (all-reduce's
# 2(n-1)/n), so busbw never exceeds twice algbw, both printed to two decimals.
MAX_BUS_FACTOR = 2.0
PRINTED_GBps = 0.01


class Row(StrictModel):
    size_bytes: Index
    count: Index
    type: str
    redop: str
    root: Annotated[int, pydantic.Field(ge=-1)]  # -1: the operation has no root
    out_of_place: Cell
    in_place: Cell

    @pydantic.model_validator(mode="after")
    def _bandwidths_agree(self) -> Row:
        """busbw at most twice algbw, as nccl-tests computes them: a row
        that says otherwise was edited or comes from something else. (algbw
        itself is not checked against size / time: hypercube's counts
        (n-1)/n of the size, and with -C 1 the time column is CPU time.)"""
        for name, cell in (("out_of_place", self.out_of_place), ("in_place", self.in_place)):
            if cell.busbw_GBps > MAX_BUS_FACTOR * cell.algbw_GBps + PRINTED_GBps:
                raise ValueError(f"{name}: busbw at most {MAX_BUS_FACTOR:g} x algbw = {MAX_BUS_FACTOR * cell.algbw_GBps:.2f} GB/s "
                                 f"(nccl-tests' bus factors, doc/PERFORMANCE.md; got {cell.busbw_GBps})")
        return self


class Gpu(StrictModel):
    rank: Index
    host: str
    local_gpu: Index
    device: str


class NcclTestsRun(StrictModel):
    """One log."""

    source: str  # the log's file name
    op: str  # the binary without _perf: all_reduce, sendrecv, ...
    nccl_tests_version: str | None  # printed since v2.18; None before
    gpus: list[Gpu]
    rows: list[Row] = pydantic.Field(min_length=1)
    avg_busbw_GBps: GBps

    @pydantic.field_validator("rows")
    @classmethod
    def _data_moved(cls, rows: list[Row], info: pydantic.ValidationInfo) -> list[Row]:
        largest = max(rows, key=lambda row: row.size_bytes)
        if len(info.data.get("gpus", ())) >= 2 and largest.out_of_place.busbw_GBps <= 0:
            raise ValueError(f"a bus bandwidth above 0 at the largest message ({largest.size_bytes:,} B), as two or more GPUs "
                             "move data (was maxBytes too small?)")
        return rows


class NcclTestsDocument(StrictModel):
    schema_version: Literal[1]
    kind: Literal["nccl-tests"]
    runs: list[NcclTestsRun] = pydantic.Field(min_length=1)


def read_nccl_tests_log(path: str | Path) -> NcclTestsRun:
    """The run one nccl-tests log file reports (``parse_nccl_tests_log``).
    Raises SpecError naming the file (and the line) when it is missing or
    its numbers are malformed or impossible."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(str(path), "<file>", "an existing nccl-tests log")
    return parse_nccl_tests_log(path.read_text(errors="replace"), str(path))


def parse_nccl_tests_log(text: str, source: str) -> NcclTestsRun:
    """The run that ``text`` (the whole stdout of one ``*_perf`` binary) reports.

    The operation comes from the ``# Collective test starting`` line (v2.17
    on), or else from the file name (``sendrecv_perf.log``).
    Lines that are neither headers nor rows (NCCL_DEBUG output) are skipped.
    Raises SpecError naming ``source``, and the line of a bad row: no rows,
    no average, out-of-bounds values, a number that is not one, NaN,
    infinite or negative, a non-zero ``#wrong`` (module docstring)."""
    columns, rows, gpus = None, [], []
    program = version = average = None
    for number, line in enumerate(text.splitlines(), 1):
        tokens = line.split()
        if not tokens:
            continue
        if tokens[0] == "#" and tokens[1:3] == ["size", "count"]:
            columns = _Columns(tokens[1:], source, number)
        elif line.startswith("#"):
            if match := PROGRAM.match(line):
                program = match.group(1)
            elif match := VERSION.match(line):
                version = match.group(1)
            elif match := DEVICE.match(line):
                gpus.append(Gpu(rank=int(match.group(1)), host=match.group(2), local_gpu=int(match.group(3)), device=match.group(4)))
            elif match := AVERAGE.match(line):
                average = _number(match.group(1), float, source, "Avg bus bandwidth")
            elif (match := OUT_OF_BOUNDS.match(line)) and int(match.group(1)):
                raise SpecError(source, "Out of bounds values", "0: the run reported wrong results, so its timings are not trusted", int(match.group(1)))
        elif columns is not None and tokens[0].isdigit():
            rows.append(columns.row(tokens, number))
    if not rows:
        raise SpecError(source, "rows", "at least one result row under the '#  size  count  type  redop  root  time  algbw  busbw ...' header")
    if average is None:
        raise SpecError(source, "Avg bus bandwidth", "a '# Avg bus bandwidth : X' line (is the log complete?)")
    run = dict(source=Path(source).name, op=_op(program, source), nccl_tests_version=version, gpus=gpus, rows=rows, avg_busbw_GBps=average)
    return validate(NcclTestsRun, run, source)


def nccl_tests_document(runs: list[NcclTestsRun]) -> dict:
    return NcclTestsDocument(schema_version=SCHEMA_VERSION, kind="nccl-tests", runs=runs).model_dump(mode="json")


def nccl_tests_json(runs: list[NcclTestsRun]) -> str:
    return json.dumps(nccl_tests_document(runs), indent=2) + "\n"


class _Columns:
    """Where each value sits in a row, from the column-name header line."""

    def __init__(self, names: list[str], source: str, number: int):
        self.source = source
        starts = [i for i, name in enumerate(names) if name in TIME_COLUMNS]
        if names[:5] != ["size", "count", "type", "redop", "root"] or len(starts) != 2 or not all(
            names[start + 1 : start + 4] == ["algbw", "busbw", "#wrong"] for start in starts
        ):
            raise SpecError(source, f"line {number}", "the nccl-tests column header: size count type redop root, then time algbw busbw #wrong "
                            "out-of-place and in-place", " ".join(names))
        self.starts = starts

    def row(self, tokens: list[str], number: int) -> Row:
        field = f"line {number}"
        if len(tokens) < self.starts[1] + 4:
            raise SpecError(self.source, field, f"a result row of at least {self.starts[1] + 4} columns", " ".join(tokens))
        out_of_place, in_place = (self._cell(tokens[start : start + 4], field) for start in self.starts)
        row = dict(size_bytes=_number(tokens[0], int, self.source, field), count=_number(tokens[1], int, self.source, field),
                   type=tokens[2], redop=tokens[3], root=_number(tokens[4], int, self.source, field),
                   out_of_place=out_of_place, in_place=in_place)
        return validate(Row, row, self.source, prefix=f"{field} (size {tokens[0]} B)")

    def _cell(self, values: list[str], field: str) -> dict:
        time_us, algbw, busbw = (_number(value, float, self.source, field) for value in values[:3])
        wrong = None if values[3] == "N/A" else _number(values[3], float, self.source, field)  # printed with %g
        return dict(time_us=time_us, algbw_GBps=algbw, busbw_GBps=busbw, wrong=wrong)


def _number(text: str, kind: type, source: str, field: str):
    try:
        return kind(text)
    except ValueError:
        raise SpecError(source, field, f"a number ({kind.__name__})", text) from None


def _op(program: str | None, source: str) -> str:
    for name in (program, Path(source).name):
        if name and (match := BINARY.search(name)):
            return match.group(1)
    raise SpecError(source, "op", "a '# Collective test starting: <op>_perf' line, or the binary's name in the file name "
                    "(e.g. all_reduce_perf.log)", program)


def json_schema() -> str:
    return json.dumps(NcclTestsDocument.model_json_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    SCHEMA_FILE.write_text(json_schema())
