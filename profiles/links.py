"""Measure the links between every pair of GPUs (``loom profile links``).

Runs in every process of a distributed launch, one process per GPU: torchrun
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) or SLURM's srun (``SLURM_PROCID``,
``SLURM_NTASKS``, ``SLURM_LOCALID``, plus ``MASTER_ADDR``/``MASTER_PORT``).
It uses NCCL when CUDA is available and gloo on CPU. torch is an optional
extra, so it is imported inside the functions that need it: this module (and
the planner, which reads profiles through ``load_links_profile``) imports
without it.

What is measured, each the median of ``repeats`` timings after ``warmup``
untimed ones:

- for every pair of ranks, a ping-pong: latency is half the round trip of a
  small message; bandwidth is the message size over half the round trip of a
  large one (one direction at a time, as pipeline send/recv uses a link);
- all-reduce over the consecutive ranks ``0..g-1`` for g = 2, 4, 8, ... and
  the whole world, reported as nccl-tests does: algbw = bytes / time and
  busbw = algbw * 2(n-1)/n (nccl-tests doc/PERFORMANCE.md, "AllReduce").

Pairs are scheduled as a round-robin tournament (``round_robin_rounds``):
the pairs of one round share no GPU and run at the same time, so n GPUs take
n - 1 rounds (n with a bye when n is odd) instead of n(n-1)/2 pair
measurements. Pairs of one round may still share a node's NICs or PCIe
switches; on rail-optimised clusters every GPU has its own NIC, so they
rarely contend.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from loom.planner.specs.errors import SpecError
from loom.profiles.links_profile import AllReduce, LinksProfile, load_links_profile

__all__ = ["Launch", "LinkSettings", "LinksProfile", "launch_from_env", "load_links_profile", "measure_links", "round_robin_rounds", "all_reduce_group_sizes"]

MiB = 1 << 20
GPU_MESSAGE_BYTES = 64 * MiB  # large enough to reach NVLink's and the NICs' plateau
CPU_MESSAGE_BYTES = 8 * MiB  # gloo over TCP plateaus far earlier
FLOAT32_BYTES = 4  # messages are float32 tensors, as the gradients all-reduce would be

HOW_TO_LAUNCH = (
    "variables set by a launcher that starts one process per GPU, e.g. "
    "`torchrun --nproc-per-node 8 -m loom.cli profile links --out links.json` on each node "
    "(with --nnodes and --rdzv-endpoint for several nodes), or under SLURM "
    "`srun --ntasks-per-node 8 loom profile links --out links.json` with MASTER_ADDR and MASTER_PORT exported"
)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Launch:
    """Where this process sits in the launch."""

    rank: int
    world_size: int
    local_rank: int


@dataclass(frozen=True)
class LinkSettings:
    message_bytes: int | None = None  # None: GPU_MESSAGE_BYTES with CUDA, CPU_MESSAGE_BYTES on CPU
    latency_message_bytes: int = 8
    repeats: int = 10
    warmup: int = 2
    max_group_size: int | None = None  # None: all-reduce up to the whole world


def launch_from_env(env: Mapping[str, str] = os.environ) -> Launch:
    """Rank, world size and local rank from torchrun's or srun's environment.

    Raises SpecError when the process was not started by either, or when the
    rendezvous address (``MASTER_ADDR``, ``MASTER_PORT``) is missing."""
    for names in (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        if names[0] in env and names[1] in env:
            break
    else:
        raise SpecError("environment", "RANK/WORLD_SIZE", HOW_TO_LAUNCH)
    try:
        rank, world_size, local_rank = (int(env.get(name, "0")) for name in names)
    except ValueError:
        raise SpecError("environment", "/".join(names), "integers", [env.get(name) for name in names]) from None
    if world_size < 2 or not 0 <= rank < world_size:
        raise SpecError("environment", names[1], f"at least 2 processes, with {names[0]} below it: there are no links to measure otherwise", world_size)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not env.get(name):
            raise SpecError("environment", name, "the rendezvous address of rank 0 (torchrun sets it; under srun export "
                            "MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1) MASTER_PORT=29500)")
    return Launch(rank, world_size, local_rank)


def round_robin_rounds(n: int) -> list[list[tuple[int, int]]]:
    """Every pair of ``0..n-1`` exactly once, in rounds of disjoint pairs.

    The circle method: player ``m - 1`` (m = n rounded up to even) stays put
    while the others rotate; in round r it meets r, and r + k meets r - k
    (mod m - 1). With n odd, ``m - 1`` is a dummy and its partner sits out.
    Pairs are (low, high), sorted within a round."""
    m = n + n % 2
    rounds = []
    for r in range(m - 1):
        pairs = [(r, m - 1)] + [((r + k) % (m - 1), (r - k) % (m - 1)) for k in range(1, m // 2)]
        rounds.append(sorted((min(a, b), max(a, b)) for a, b in pairs if max(a, b) < n))
    return rounds


def all_reduce_group_sizes(world_size: int, max_group_size: int | None = None) -> list[int]:
    """2, 4, 8, ... up to the world size, and the world itself when it is not a power of two."""
    limit = world_size if max_group_size is None else min(world_size, max_group_size)
    sizes = [1 << k for k in range(1, limit.bit_length())]
    return sizes + ([limit] if limit not in sizes else [])


def measure_links(launch: Launch, settings: LinkSettings = LinkSettings(), progress: Progress | None = None) -> LinksProfile | None:
    """Measure every pair and the all-reduce groups; every rank must call it.

    Rank 0 returns the profile; the other ranks return None. ``progress(done,
    total)`` is called after each tournament round and each all-reduce group."""
    torch, dist = _torch()
    cuda = torch.cuda.is_available()
    message_bytes = settings.message_bytes or (GPU_MESSAGE_BYTES if cuda else CPU_MESSAGE_BYTES)
    _check(settings, message_bytes)
    device, local_gpu = _device(torch, launch)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, init_method="env://", rank=launch.rank, world_size=launch.world_size)
    try:
        bench = _Bench(torch, dist, device, settings.warmup, settings.repeats)
        gpus: list = [None] * launch.world_size
        dist.all_gather_object(gpus, (socket.gethostname(), local_gpu))
        rounds = round_robin_rounds(launch.world_size)
        sizes = all_reduce_group_sizes(launch.world_size, settings.max_group_size)
        report = progress or (lambda done, total: None)
        measured = []
        for done, pairs in enumerate(rounds, 1):
            measured += bench.pairs(launch.rank, pairs, message_bytes, settings.latency_message_bytes)
            dist.barrier()  # the next round starts when every pair of this one is done
            report(done, len(rounds) + len(sizes))
        all_reduce = []
        for done, size in enumerate(sizes, len(rounds) + 1):
            all_reduce.append(bench.all_reduce(launch.rank, size, message_bytes))
            report(done, len(rounds) + len(sizes))
        gathered: list = [None] * launch.world_size
        dist.all_gather_object(gathered, measured)
    finally:
        dist.destroy_process_group()
    if launch.rank != 0:
        return None
    n = launch.world_size
    bandwidth_GBps, latency_s = np.full((2, n, n), np.nan)
    for a, b, pair_GBps, pair_s in (pair for of_rank in gathered for pair in of_rank):
        bandwidth_GBps[a, b] = bandwidth_GBps[b, a] = pair_GBps
        latency_s[a, b] = latency_s[b, a] = pair_s
    np.fill_diagonal(bandwidth_GBps, np.inf)
    np.fill_diagonal(latency_s, 0.0)
    return LinksProfile(
        backend=backend,
        device=torch.cuda.get_device_name(device) if cuda else "cpu",
        torch_version=torch.__version__,
        hosts=tuple(host for host, _ in gpus),
        local_gpus=tuple(gpu for _, gpu in gpus),
        message_bytes=message_bytes,
        latency_message_bytes=settings.latency_message_bytes,
        repeats=settings.repeats,
        warmup=settings.warmup,
        bandwidth_GBps=bandwidth_GBps,
        latency_s=latency_s,
        rounds=tuple(tuple(pairs) for pairs in rounds),
        all_reduce=tuple(all_reduce),  # rank 0 is in every group, so none is None
    )


def _device(torch, launch: Launch):
    """This process's torch device and its GPU number on the node (the local rank on CPU)."""
    if not torch.cuda.is_available():
        return torch.device("cpu"), launch.local_rank
    index = 0 if torch.cuda.device_count() == 1 else launch.local_rank  # srun may bind one visible GPU per task
    torch.cuda.set_device(index)
    return torch.device("cuda", index), physical_gpu(index)


def physical_gpu(index: int, env: Mapping[str, str] = os.environ) -> int:
    """The node's number for CUDA device ``index`` (what nvidia-smi and
    CUDA_VISIBLE_DEVICES in loom's launch files call it): with
    ``CUDA_VISIBLE_DEVICES=3,1`` device 0 is GPU 3. Entries given as UUIDs
    cannot be mapped without NVML and keep the visible index."""
    visible = [entry.strip() for entry in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if entry.strip()]
    if index < len(visible) and visible[index].isdigit():
        return int(visible[index])
    return index


class _Bench:
    """Timed point-to-point and all-reduce operations on one rank."""

    def __init__(self, torch, dist, device, warmup: int, repeats: int):
        self.torch, self.dist, self.device = torch, dist, device
        self.warmup, self.repeats = warmup, repeats

    def _median_s(self, operation: Callable[[], None]) -> float:
        """Median wall time of ``operation`` as the host sees it (launch
        overheads included); on CUDA the host waits for the device on both
        sides, since NCCL calls return before the transfer ends."""
        synchronize = self.torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        for _ in range(self.warmup):
            operation()
        samples = []
        for _ in range(self.repeats):
            synchronize()
            start = time.perf_counter()
            operation()
            synchronize()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    def _buffer(self, nbytes: int):
        # zeros: repeated in-place all-reduce sums stay finite whatever the group size
        return self.torch.zeros(nbytes // FLOAT32_BYTES, dtype=self.torch.float32, device=self.device)

    def pairs(self, rank: int, pairs: list[tuple[int, int]], message_bytes: int, latency_message_bytes: int) -> list[tuple[int, int, float, float]]:
        """This rank's pair of the round, if any, as (low, high, GB/s, latency s);
        only the low rank reports it, timing the round trips it starts."""
        peer = next((b if a == rank else a for a, b in pairs if rank in (a, b)), None)
        if peer is None:
            return []
        starts = rank < peer
        latency_s = self._median_s(self._ping_pong(self._buffer(latency_message_bytes), peer, starts)) / 2
        one_way_s = self._median_s(self._ping_pong(self._buffer(message_bytes), peer, starts)) / 2
        return [(rank, peer, message_bytes / one_way_s / 1e9, latency_s)] if starts else []

    def _ping_pong(self, buffer, peer: int, starts: bool) -> Callable[[], None]:
        send, recv = self.dist.send, self.dist.recv
        if starts:
            return lambda: (send(buffer, peer), recv(buffer, peer))
        return lambda: (recv(buffer, peer), send(buffer, peer))

    def all_reduce(self, rank: int, size: int, message_bytes: int) -> AllReduce | None:
        """All-reduce over ranks 0..size-1, timed on rank 0 (a member of every group)."""
        ranks = list(range(size))
        group = self.dist.new_group(ranks)  # collective: every rank creates every group
        if rank not in ranks:
            return None
        buffer = self._buffer(message_bytes)
        time_s = self._median_s(lambda: self.dist.all_reduce(buffer, group=group))
        algbw_GBps = message_bytes / time_s / 1e9
        return AllReduce(size, tuple(ranks), message_bytes, time_s, algbw_GBps, algbw_GBps * 2 * (size - 1) / size)


def _check(settings: LinkSettings, message_bytes: int) -> None:
    for field, value in (("message_bytes", message_bytes), ("latency_message_bytes", settings.latency_message_bytes)):
        if value <= 0 or value % FLOAT32_BYTES:
            raise SpecError("settings", field, f"a positive multiple of {FLOAT32_BYTES} bytes (messages are float32)", value)
    if settings.repeats < 1 or settings.warmup < 0:
        raise SpecError("settings", "repeats/warmup", "repeats >= 1 and warmup >= 0", (settings.repeats, settings.warmup))
    if settings.max_group_size is not None and settings.max_group_size < 2:
        raise SpecError("settings", "max_group_size", "at least 2", settings.max_group_size)


def _torch():
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        raise SpecError("environment", "torch", "PyTorch installed (pip install torch): the link profiler runs on torch.distributed") from None
    return torch, dist
