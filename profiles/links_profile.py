"""The links profile file: what ``loom profile links`` writes and the planner reads.

One JSON document per cluster measurement (``kind: links``, ``schema_version``
1). Row ``i`` of each matrix is ``gpus[i]``, the GPU that global rank ``i`` ran
on; each pair is measured once and stored both ways, so the matrices are
symmetric, and the diagonal is ``null`` (a GPU has no link to itself). The
pydantic models below are the file's single definition; ``links.schema.json``
beside this module is generated from them (``python -m
loom.profiles.links_profile`` rewrites it; a test keeps it in sync).

In memory (``LinksProfile``) the diagonal becomes ``inf`` for bandwidth and
``0`` for latency: a GPU talks to itself instantly, which is what the
planner's group pricing needs (a group of one GPU never limits anything).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pydantic

from loom.planner.specs.errors import SpecError
from loom.planner.specs.files import StrictModel, read_json, validate

SCHEMA_VERSION = 1
SCHEMA_FILE = Path(__file__).with_name("links.schema.json")

Positive = Annotated[float, pydantic.Field(gt=0, allow_inf_nan=False)]
Index = Annotated[int, pydantic.Field(ge=0)]


class GpuEntry(StrictModel):
    rank: Index
    host: str = pydantic.Field(min_length=1, description="socket.gethostname() of the rank's process")
    local_gpu: Index = pydantic.Field(description="CUDA device index on the host (the local rank on CPU)")


class AllReduceEntry(StrictModel):
    group_size: Annotated[int, pydantic.Field(ge=2)]
    ranks: list[Index] = pydantic.Field(description="the group's global ranks")
    message_bytes: Annotated[int, pydantic.Field(gt=0)]
    time_s: Positive = pydantic.Field(description="median time of one all-reduce")
    algbw_GBps: Positive = pydantic.Field(description="message_bytes / time_s / 1e9")
    busbw_GBps: Positive = pydantic.Field(description="algbw_GBps * 2(n-1)/n (nccl-tests doc/PERFORMANCE.md)")


Matrix = list[list[Positive | None]]


class LinksDocument(StrictModel):
    """The JSON file, field for field."""

    schema_version: Literal[1]
    kind: Literal["links"]
    backend: str = pydantic.Field(description="torch.distributed backend: nccl or gloo")
    device: str = pydantic.Field(description="CUDA device name of rank 0, or cpu")
    torch_version: str
    gpus: list[GpuEntry] = pydantic.Field(min_length=2, description="row i of the matrices is gpus[i] (global rank i)")
    message_bytes: Annotated[int, pydantic.Field(gt=0)] = pydantic.Field(description="bandwidth message")
    latency_message_bytes: Annotated[int, pydantic.Field(gt=0)]
    repeats: Annotated[int, pydantic.Field(gt=0)] = pydantic.Field(description="timed repeats per measurement; the median is kept")
    warmup: Index = pydantic.Field(description="untimed repeats before them")
    bandwidth_GBps: Matrix = pydantic.Field(description="one-way point-to-point bandwidth, 1e9 bytes/s")
    latency_s: Matrix = pydantic.Field(description="half the round trip of a latency_message_bytes message")
    rounds: list[list[tuple[Index, Index]]] = pydantic.Field(description="the tournament schedule: pairs measured together")
    all_reduce: list[AllReduceEntry]


@dataclass(frozen=True)
class AllReduce:
    """All-reduce over one group of consecutive ranks."""

    group_size: int
    ranks: tuple[int, ...]
    message_bytes: int
    time_s: float
    algbw_GBps: float
    busbw_GBps: float


@dataclass(frozen=True, eq=False)  # eq=False: numpy arrays have no single truth value
class LinksProfile:
    """A measured links profile; index ``i`` is global rank ``i``.

    ``bandwidth_GBps`` has ``inf`` on the diagonal and ``latency_s`` has
    ``0``; both are read-only."""

    backend: str
    device: str
    torch_version: str
    hosts: tuple[str, ...]
    local_gpus: tuple[int, ...]
    message_bytes: int
    latency_message_bytes: int
    repeats: int
    warmup: int
    bandwidth_GBps: np.ndarray
    latency_s: np.ndarray
    rounds: tuple[tuple[tuple[int, int], ...], ...]
    all_reduce: tuple[AllReduce, ...]

    def __post_init__(self) -> None:
        for matrix in (self.bandwidth_GBps, self.latency_s):
            matrix.setflags(write=False)


def links_document(profile: LinksProfile) -> dict:
    """The JSON document of ``profile`` (diagonals become ``null``)."""

    def rows(matrix: np.ndarray) -> list[list[float | None]]:
        return [[None if i == j else float(value) for j, value in enumerate(row)] for i, row in enumerate(matrix)]

    document = LinksDocument(
        schema_version=SCHEMA_VERSION,
        kind="links",
        backend=profile.backend,
        device=profile.device,
        torch_version=profile.torch_version,
        gpus=[GpuEntry(rank=i, host=host, local_gpu=gpu) for i, (host, gpu) in enumerate(zip(profile.hosts, profile.local_gpus))],
        message_bytes=profile.message_bytes,
        latency_message_bytes=profile.latency_message_bytes,
        repeats=profile.repeats,
        warmup=profile.warmup,
        bandwidth_GBps=rows(profile.bandwidth_GBps),
        latency_s=rows(profile.latency_s),
        rounds=[list(pairs) for pairs in profile.rounds],
        all_reduce=[AllReduceEntry(**{**vars(entry), "ranks": list(entry.ranks)}) for entry in profile.all_reduce],
    )
    return document.model_dump(mode="json")


def links_json(profile: LinksProfile) -> str:
    return json.dumps(links_document(profile), indent=2) + "\n"


def parse_links_document(data: dict, source: str) -> LinksProfile:
    """Check ``data`` (a parsed links JSON file) and return its profile.

    Raises SpecError naming ``source``, the field and what was expected: on
    top of the types, the GPUs must be listed in rank order, each once, and
    both matrices must be n x n, symmetric, ``null`` on the diagonal and
    positive elsewhere."""
    if not isinstance(data, dict):
        raise SpecError(source, "<top level>", "a JSON object")
    if data.get("kind", "links") != "links":
        raise SpecError(source, "kind", "links (this file is another kind of profile)", data.get("kind"))
    doc = validate(LinksDocument, data, source)
    n = len(doc.gpus)
    for i, gpu in enumerate(doc.gpus):
        if gpu.rank != i:
            raise SpecError(source, f"gpus.{i}.rank", f"{i}: gpus are listed in rank order", gpu.rank)
    gpus = [(gpu.host, gpu.local_gpu) for gpu in doc.gpus]
    if len(set(gpus)) != n:
        twice = next(gpu for gpu in gpus if gpus.count(gpu) > 1)
        raise SpecError(source, "gpus", f"each GPU once; {twice[0]} GPU {twice[1]} is listed twice")
    for entry_index, entry in enumerate(doc.all_reduce):
        if len(entry.ranks) != entry.group_size or max(entry.ranks) >= n:
            raise SpecError(source, f"all_reduce.{entry_index}.ranks", f"group_size = {entry.group_size} ranks below {n}", entry.ranks)
    return LinksProfile(
        backend=doc.backend,
        device=doc.device,
        torch_version=doc.torch_version,
        hosts=tuple(host for host, _ in gpus),
        local_gpus=tuple(gpu for _, gpu in gpus),
        message_bytes=doc.message_bytes,
        latency_message_bytes=doc.latency_message_bytes,
        repeats=doc.repeats,
        warmup=doc.warmup,
        bandwidth_GBps=_matrix(doc.bandwidth_GBps, "bandwidth_GBps", n, source, diagonal=np.inf),
        latency_s=_matrix(doc.latency_s, "latency_s", n, source, diagonal=0.0),
        rounds=tuple(tuple(pairs) for pairs in doc.rounds),
        all_reduce=tuple(AllReduce(**{**entry.model_dump(), "ranks": tuple(entry.ranks)}) for entry in doc.all_reduce),
    )


def load_links_profile(path: str | Path) -> LinksProfile:
    """Read a links profile JSON file (see ``parse_links_document``)."""
    path = Path(path)
    return parse_links_document(read_json(path, "links profile (loom profile links --out FILE)"), str(path))


def _matrix(rows: list[list[float | None]], field: str, n: int, source: str, diagonal: float) -> np.ndarray:
    """``rows`` as an n x n array with ``diagonal`` on it, or a SpecError naming the first bad cell."""
    if len(rows) != n:
        raise SpecError(source, field, f"{n} rows, one per entry of gpus", len(rows))
    for i, row in enumerate(rows):
        if len(row) != n:
            raise SpecError(source, f"{field}.{i}", f"{n} entries, one per entry of gpus", len(row))
    matrix = np.array(rows, dtype=float)  # null -> nan
    missing = np.argwhere(np.isnan(matrix) & ~np.eye(n, dtype=bool))
    if len(missing):
        i, j = missing[0]
        raise SpecError(source, f"{field}.{i}.{j}", "a positive number (only the diagonal is null)", None)
    present = np.argwhere(~np.isnan(np.diag(matrix)))
    if len(present):
        i = present[0][0]
        raise SpecError(source, f"{field}.{i}.{i}", "null: a GPU has no link to itself", rows[i][i])
    np.fill_diagonal(matrix, diagonal)
    asymmetric = np.argwhere(matrix != matrix.T)
    if len(asymmetric):
        i, j = asymmetric[0]
        raise SpecError(source, f"{field}.{i}.{j}", f"{rows[j][i]!r}, equal to {field}.{j}.{i}: each pair is measured once and stored both ways", rows[i][j])
    return matrix


def json_schema() -> str:
    return json.dumps(LinksDocument.model_json_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    SCHEMA_FILE.write_text(json_schema())
