"""Launch files read back the way the launchers read them.

A placement is a bijection global rank -> (host, GPU) (ARCHITECTURE.md,
"Realising a placement"). For seeded placements that permute the node order
and the GPU order inside some nodes, every launch file loom writes is run:

- ``train.sh`` once per host with a recording ``torchrun`` on PATH, and once
  for real with torch's own ``torchrun`` (two nodes on this machine, workers
  that report RANK, LOCAL_RANK and CUDA_VISIBLE_DEVICES);
- ``slurm.sbatch`` under a stand-in ``srun`` that runs its command once per
  node of the allocation, in SLURM's node order rather than the plan's;
- ``launch.sh`` with a recording ``deepspeed``, whose arguments then go through
  DeepSpeed's own runner (hostfile, ``--include``, pdsh command) and
  ``launch.py`` (ranks, CUDA_VISIBLE_DEVICES, per-rank commands), and those
  per-rank commands are executed.

Each gives rank -> (host, GPU), which must equal the placement; then
megatron-core's ``RankGenerator`` (and DeepSpeed's topologies) must form, from
those launched ranks, the very groups of GPUs that loom's ``rank_groups``
priced. Placements a per-node launcher cannot realise are refused.
"""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
from megatron.core.parallel_state import RankGenerator, default_embedding_ranks

from loom.planner.specs.cluster import parse_cluster
from loom.planner.output.files import write_file_set
from loom.planner.output.launch import launch_files
from loom.planner.specs.job import Job
from loom.planner.specs.layout import Layout
from loom.planner.specs.model import load_model
from loom.planner.specs.stages import Placement, uniform_stages
from loom.planner.specs.layout import rank_groups

HOSTS = ["gpu-a01", "gpu-a02", "gpu-b07", "gpu-c11"]


def cluster(nodes: int, gpus_per_node: int = 8):
    spec = {"nodes": nodes, "gpus_per_node": gpus_per_node, "gpu": "H100", "nvlink_GBps": 450,
            "nics_per_node": gpus_per_node, "nic_Gbps": 400, "hosts": HOSTS[:nodes]}
    return parse_cluster(spec, "placement-launch")


def job(model: str, nodes: int, gbs: int, seq: int = 4096, framework: str = "megatron", gpus_per_node: int = 8) -> Job:
    return Job(model=load_model(model), cluster=cluster(nodes, gpus_per_node), global_batch_size=gbs, seq_length=seq,
               framework=framework)


# name -> (job, layout, GPUs each used host runs)
MEGATRON = {
    "tp2-cp2-dp2-pp2": (job("llama-3-8b", 2, 16, seq=8192),
                        Layout(tp=2, pp=2, dp=2, cp=2, micro_batch_size=1, global_batch_size=16, sequence_parallel=True), 8),
    "tp8-pp4": (job("llama-3-8b", 4, 16),
                Layout(tp=8, pp=4, dp=1, cp=1, micro_batch_size=1, global_batch_size=16, sequence_parallel=True), 8),
    "tp1-dp16": (job("llama-3-8b", 2, 64), Layout(tp=1, pp=1, dp=16, cp=1, micro_batch_size=1, global_batch_size=64), 8),
    "moe-tp2-ep4-pp2": (job("mixtral-8x7b", 2, 32),
                        Layout(tp=2, pp=2, dp=4, cp=1, ep=4, micro_batch_size=1, global_batch_size=32,
                               sequence_parallel=True), 8),
    # 4 of the 8 GPUs on 2 of the 3 hosts: a subset, and a host left out.
    "half-nodes-tp2-dp2-pp2": (job("llama-3-8b", 3, 16),
                               Layout(tp=2, pp=2, dp=2, cp=1, micro_batch_size=1, global_batch_size=16,
                                      sequence_parallel=True), 4),
}

DEEPSPEED = {
    "zero1-pp2-dp8": (job("llama-3-8b", 2, 64, framework="deepspeed"),
                      Layout(tp=1, pp=2, dp=8, cp=1, micro_batch_size=1, global_batch_size=64, zero_stage=1), 8),
    "zero3-dp16": (job("llama-3-8b", 2, 64, framework="deepspeed"),
                   Layout(tp=1, pp=1, dp=16, cp=1, micro_batch_size=1, global_batch_size=64, zero_stage=3, fsdp=16), 8),
    "moe-ep8-dp16": (job("mixtral-8x7b", 2, 64, framework="deepspeed"),
                     Layout(tp=1, pp=1, dp=16, cp=1, ep=8, micro_batch_size=1, global_batch_size=64, zero_stage=1), 8),
    "one-node-dp8": (job("llama-3-8b", 1, 32, framework="deepspeed"),
                     Layout(tp=1, pp=1, dp=8, cp=1, micro_batch_size=1, global_batch_size=32), 8),
    "subset-dp8": (job("llama-3-8b", 3, 32, framework="deepspeed"),
                   Layout(tp=1, pp=1, dp=8, cp=1, micro_batch_size=1, global_batch_size=32), 4),
}


def permuted_placement(job: Job, layout: Layout, per_host: int, seed: int) -> Placement:
    """Node blocks on the hosts in a shuffled order (not the cluster's); the
    first, third, ... node's local ranks on a shuffled choice of its GPUs, the
    others on an ascending choice (all GPUs: 0..n-1)."""
    rng = random.Random(seed)
    hosts, gpus_per_node = job.cluster.hosts, job.cluster.gpus_per_node
    used = layout.world_size // per_host
    order = hosts[:used]
    while len(hosts) > 1 and order == hosts[:used]:
        order = rng.sample(hosts, used)
    gpus = []
    for k, host in enumerate(order):
        chosen = sorted(rng.sample(range(gpus_per_node), per_host))
        if k % 2 == 0:
            while chosen == sorted(chosen) and per_host > 1:
                rng.shuffle(chosen)
        gpus += [(host, gpu) for gpu in chosen]
    return Placement(gpus=tuple(gpus))


def placements(cases: dict, seeds=(1, 2)):
    return [pytest.param(name, seed, id=f"{name}-seed{seed}") for name in cases for seed in seeds]


def files_of(case: tuple, seed: int) -> tuple[Job, Layout, Placement, dict[str, str]]:
    job, layout, per_host = case
    placement = permuted_placement(job, layout, per_host, seed)
    return job, layout, placement, launch_files(job, layout, uniform_stages(job.model, layout), placement)


def test_the_placements_are_not_trivial():
    """The test placements move nodes and reorder GPUs, and keep some nodes in order."""
    for case in (*MEGATRON.values(), *DEEPSPEED.values()):
        job, layout, per_host = case
        placement = permuted_placement(job, layout, per_host, seed=1)
        blocks = [placement.gpus[k : k + per_host] for k in range(0, layout.world_size, per_host)]
        orders = [[gpu for _, gpu in block] for block in blocks]
        assert any(order != sorted(order) for order in orders)
        if len(blocks) > 1:
            assert [block[0][0] for block in blocks] != job.cluster.hosts[: len(blocks)]
            assert any(order == sorted(order) for order in orders)


# --- loom's groups against the libraries' ---------------------------------------


def loom_groups(layout: Layout) -> dict[str, list[tuple[int, ...]]]:
    """loom's own enumeration of Megatron's groups (planner/specs/topology.py
    ``rank_groups``), as tuples of global ranks: what the placement solver priced."""
    return {name: [tuple(group) for group in groups.tolist()] for name, groups in rank_groups(layout).items()}


def megatron_groups(layout: Layout) -> dict[str, list[list[int]]]:
    """The same groups as megatron-core's initialize_model_parallel builds them:
    the decoder generator (ep=1) for tp/cp/dp-cp/pp and the embedding ranks of
    each pipeline, the expert generator (tp=etp, ep, dp=expert dp, cp=1) for MoE."""
    order = "tp-cp-ep-dp-pp"
    dense = RankGenerator(tp=layout.tp, ep=1, dp=layout.dp, pp=layout.pp, cp=layout.cp, order=order)
    groups = {name: dense.get_ranks(name) for name in ("tp", "cp", "dp-cp", "pp")}
    groups["embedding"] = [default_embedding_ranks(pipeline) for pipeline in groups["pp"]]
    if layout.ep > 1 or layout.etp > 1:
        experts = RankGenerator(tp=layout.etp, ep=layout.ep, dp=layout.expert_dp, pp=layout.pp, cp=1, order=order)
        groups.update(ep=experts.get_ranks("ep"), etp=experts.get_ranks("tp"), **{"expert-dp": experts.get_ranks("dp")})
    return groups


def assert_groups_land_as_priced(reference: dict[str, list[list[int]]], layout: Layout,
                                 launched: list[tuple[str, int]], placement: Placement) -> None:
    """Every group the library forms from the launched ranks is, GPU for GPU and
    in rank order, a group loom formed from the planned placement."""
    ours = loom_groups(layout)
    for name, groups in reference.items():
        theirs = {tuple(launched[rank] for rank in group) for group in groups}
        priced = {tuple(placement.gpus[rank] for rank in group) for group in ours[name]}
        assert theirs == priced, name


# --- train.sh with a recording torchrun ---------------------------------------------

RECORDER = """#!{python}
import json, os, sys, uuid
with open(os.path.join(os.environ["CAPTURE_DIR"], uuid.uuid4().hex + ".json"), "w") as out:
    json.dump({{"argv": sys.argv[1:], "env": dict(os.environ)}}, out)
"""

# Variables a developer's shell or a job platform may export, which the launch
# files must not depend on (they would otherwise move ranks).
AMBIENT = {"NODE_RANK": "0", "CUDA_VISIBLE_DEVICES": "7,6", "LOCAL_RANK": "3", "RANK": "5"}


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This process's environment with recorders first on PATH, LOOM_* and
    SLURM_* dropped and the ``AMBIENT`` decoys set."""
    bin_dir = tmp_path / "bin"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOM_", "SLURM", "MASTER_"))}
    env.update(AMBIENT, PATH=f"{bin_dir}:{env['PATH']}", CAPTURE_DIR=str(tmp_path / "capture"), **extra)
    return env


def install(tmp_path: Path, name: str, text: str) -> None:
    for folder in ("bin", "capture"):
        (tmp_path / folder).mkdir(exist_ok=True)
    path = tmp_path / "bin" / name
    path.write_text(text)
    path.chmod(0o755)


def captures(tmp_path: Path) -> list[dict]:
    found = [json.loads(path.read_text()) for path in sorted((tmp_path / "capture").glob("*.json"))]
    for path in (tmp_path / "capture").glob("*.json"):
        path.unlink()
    return found


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def torchrun_placement(runs: list[tuple[str, dict]], world_size: int) -> list[tuple[str, int]]:
    """rank -> (host, GPU) from recorded torchrun calls, as torchrun assigns
    them: node ``--node-rank`` k's local rank i is global rank k * nproc + i
    (static rendezvous; ``_assign_worker_ranks``, torch/distributed/elastic/
    agent/server/api.py), and runs on the i-th GPU of the CUDA_VISIBLE_DEVICES
    torchrun passes through (local_elastic_agent.py ``_set_local_rank_env``)."""
    gpus: dict[int, tuple[str, int]] = {}
    nodes = set()
    for host, got in runs:
        argv, env = got["argv"], got["env"]
        nnodes, nproc, node = (int(flag(argv, f)) for f in ("--nnodes", "--nproc-per-node", "--node-rank"))
        assert nnodes == len(runs) and node not in nodes
        nodes.add(node)
        visible = env.get("CUDA_VISIBLE_DEVICES")
        devices = [int(d) for d in visible.split(",")] if visible else list(range(nproc))
        assert len(devices) >= nproc
        for local in range(nproc):
            gpus[node * nproc + local] = (host, devices[local])
    assert sorted(gpus) == list(range(world_size))
    return [gpus[rank] for rank in range(world_size)]


def run_train_sh_per_host(tmp_path: Path, files: dict[str, str], hosts: list[str]) -> list[tuple[str, dict]]:
    install(tmp_path, "torchrun", RECORDER.format(python=sys.executable))
    (tmp_path / "train.sh").write_text(files["train.sh"])
    runs = []
    for host in hosts:
        subprocess.run(["bash", str(tmp_path / "train.sh")], env=clean_env(tmp_path, LOOM_HOST=host), check=True)
        [got] = captures(tmp_path)
        runs.append((host, got))
    return runs


@pytest.mark.parametrize("name, seed", placements(MEGATRON))
def test_train_sh_starts_every_rank_on_its_planned_gpu(tmp_path, name, seed):
    job, layout, placement, files = files_of(MEGATRON[name], seed)
    hosts = list(dict.fromkeys(host for host, _ in placement.gpus))
    runs = run_train_sh_per_host(tmp_path, files, sorted(hosts))  # any order of starting the nodes
    launched = torchrun_placement(runs, layout.world_size)
    assert launched == list(placement.gpus)
    for _, got in runs:
        argv = got["argv"]
        assert flag(argv, "--master-addr") == placement.gpus[0][0]  # rank 0's host serves the rendezvous
        assert int(flag(argv, "--tensor-model-parallel-size")) == layout.tp
        assert int(flag(argv, "--pipeline-model-parallel-size")) == layout.pp
        assert int(flag(argv, "--context-parallel-size")) == layout.cp
    assert_groups_land_as_priced(megatron_groups(layout), layout, launched, placement)


def test_train_sh_refuses_a_host_not_in_the_plan(tmp_path):
    _, _, _, files = files_of(MEGATRON["half-nodes-tp2-dp2-pp2"], 1)
    install(tmp_path, "torchrun", RECORDER.format(python=sys.executable))
    (tmp_path / "train.sh").write_text(files["train.sh"])
    unused = next(host for host in HOSTS[:3] if f"[{host}]=" not in files["train.sh"])
    done = subprocess.run(["bash", str(tmp_path / "train.sh")], env=clean_env(tmp_path, LOOM_HOST=unused),
                          capture_output=True, text=True)
    assert done.returncode != 0 and "is not in this plan" in done.stderr
    assert captures(tmp_path) == []


# --- train.sh under torch's real torchrun ---------------------------------------------

WORKER = """import json, os
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "CUDA_VISIBLE_DEVICES", "LOOM_HOST")
with open(os.path.join(os.environ["CAPTURE_DIR"], "rank%s.json" % os.environ["RANK"]), "w") as out:
    json.dump({key: os.environ.get(key) for key in keys}, out)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_real_torchrun_gives_the_ranks_the_recorder_assumes(tmp_path):
    """The recorder's rank arithmetic checked once against torchrun itself: two
    nodes on this machine (4 GPUs each, permuted), the node started second
    holding rank 0; each worker reports the RANK torchrun gave it."""
    job_, layout = job("llama-3-8b", 2, 16, gpus_per_node=4), Layout(
        tp=2, pp=2, dp=2, cp=1, micro_batch_size=1, global_batch_size=16, sequence_parallel=True)
    placement = permuted_placement(job_, layout, 4, seed=3)
    files = launch_files(job_, layout, uniform_stages(job_.model, layout), placement)
    (tmp_path / "megatron").mkdir()
    (tmp_path / "megatron" / "pretrain_gpt.py").write_text(WORKER)
    (tmp_path / "capture").mkdir()
    (tmp_path / "train.sh").write_text(files["train.sh"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOM_", "SLURM", "MASTER_", "TORCHELASTIC"))}
    env.update(AMBIENT, MEGATRON_LM_DIR=str(tmp_path / "megatron"), CAPTURE_DIR=str(tmp_path / "capture"),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen(["bash", str(tmp_path / "train.sh")], env={**env, "LOOM_HOST": host},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for host in HOSTS[:2]]
    for node in nodes:
        _, err = node.communicate(timeout=120)
        assert node.returncode == 0, err[-2000:]
    reports = {int(r["RANK"]): r for r in map(json.loads, (p.read_text() for p in (tmp_path / "capture").iterdir()))}
    assert sorted(reports) == list(range(layout.world_size))
    launched = [(r["LOOM_HOST"], int(r["CUDA_VISIBLE_DEVICES"].split(",")[int(r["LOCAL_RANK"])]))
                for r in (reports[rank] for rank in range(layout.world_size))]
    assert launched == list(placement.gpus)
    assert_groups_land_as_priced(megatron_groups(layout), layout, launched, placement)


# --- slurm.sbatch -------------------------------------------------------------------

FAKE_SRUN = """#!/usr/bin/env bash
# Stand-in srun: one task per node of the allocation, in SLURM's node order
# (SLURM_JOB_NODELIST), with the variables srun sets for a task.
while [[ "$1" == -* ]]; do shift; done
i=0
for host in ${SLURM_JOB_NODELIST//,/ }; do
    SLURMD_NODENAME="$host" SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" || exit $?
    i=$((i + 1))
done
"""


def sbatch_directives(script: str) -> dict[str, str]:
    """The sbatch's options; a flag without a value (--exclusive) maps to ''."""
    options = (line.removeprefix("#SBATCH --") for line in script.splitlines() if line.startswith("#SBATCH --"))
    return dict((*option.split("=", 1), "")[:2] for option in options)


@pytest.mark.parametrize("name, seed", placements(MEGATRON, seeds=(4,)))
def test_slurm_sbatch_starts_every_rank_on_its_planned_gpu(tmp_path, name, seed):
    """SLURM numbers the allocation's nodes in its own order (here sorted by
    name); the node ranks still come from the plan's host table."""
    job, layout, placement, files = files_of(MEGATRON[name], seed)
    hosts = list(dict.fromkeys(host for host, _ in placement.gpus))
    directives = sbatch_directives(files["slurm.sbatch"])
    assert set(directives["nodelist"].split(",")) == set(hosts)
    assert int(directives["nodes"]) == len(hosts) and directives["ntasks-per-node"] == "1"
    assert int(directives["gpus-per-node"]) == job.cluster.gpus_per_node  # GPU numbers are the node's own
    install(tmp_path, "torchrun", RECORDER.format(python=sys.executable))
    install(tmp_path, "srun", FAKE_SRUN)
    for name_, text in files.items():
        (tmp_path / name_).write_text(text)
    env = clean_env(tmp_path, SLURM_SUBMIT_DIR=str(tmp_path), SLURM_JOB_NODELIST=",".join(sorted(hosts)))
    subprocess.run(["bash", str(tmp_path / "slurm.sbatch")], env=env, check=True, cwd=tmp_path)
    runs = [(got["env"]["SLURMD_NODENAME"], got) for got in captures(tmp_path)]
    assert sorted(host for host, _ in runs) == sorted(hosts)
    assert {flag(got["argv"], "--master-addr") for _, got in runs} == {placement.gpus[0][0]}
    launched = torchrun_placement(runs, layout.world_size)
    assert launched == list(placement.gpus)
    assert_groups_land_as_priced(megatron_groups(layout), layout, launched, placement)


def test_slurm_sbatch_finds_train_sh_beside_the_script_it_was_submitted_as(tmp_path):
    """``sbatch out/slurm.sbatch`` from out's parent: SLURM runs a copy of the
    script, and scontrol's Command= says where the submitted one lies."""
    name, seed = placements(MEGATRON, seeds=(4,))[0].values
    job, layout, placement, files = files_of(MEGATRON[name], seed)
    hosts = list(dict.fromkeys(host for host, _ in placement.gpus))
    install(tmp_path, "torchrun", RECORDER.format(python=sys.executable))
    install(tmp_path, "srun", FAKE_SRUN)
    install(tmp_path, "scontrol", '#!/bin/bash\n[[ "$1 $2" == "show job" ]] && echo "   Command=out/slurm.sbatch WorkDir=x"\n')
    (tmp_path / "out").mkdir()
    for name_, text in files.items():
        (tmp_path / "out" / name_).write_text(text)
    env = clean_env(tmp_path, SLURM_SUBMIT_DIR=str(tmp_path), SLURM_JOB_ID="7", SLURM_JOB_NODELIST=",".join(sorted(hosts)))
    subprocess.run(["bash", str(tmp_path / "out" / "slurm.sbatch")], env=env, check=True, cwd=tmp_path)
    assert sorted(got["env"]["SLURMD_NODENAME"] for got in captures(tmp_path)) == sorted(hosts)


# --- DeepSpeed: launch.sh through DeepSpeed's runner and launch.py ----------------------

TRAIN_SCRIPT = """import json, os, sys
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "CUDA_VISIBLE_DEVICES", "CROSS_RANK", "LOOM_TEST_HOST")
report = {key: os.environ.get(key) for key in keys}
report["argv"] = sys.argv
with open(os.path.join(os.environ["CAPTURE_DIR"], "rank%s.json" % os.environ["RANK"]), "w") as out:
    json.dump(report, out)
"""


class Recorded:
    """A finished process that records what it was started with."""

    def __init__(self, log: list, cmd, env=None, **_):
        log.append((list(cmd), dict(env or {})))
        self.returncode, self.pid = 0, 0

    def poll(self):
        return 0

    def wait(self, *_):
        return 0


# ``signal`` for a DeepSpeed module run inside pytest: no handlers are installed.
NO_SIGNALS = types.SimpleNamespace(signal=lambda *a: None, SIGINT=signal.SIGINT, SIGTERM=signal.SIGTERM)


def recorder_module(log: list, real) -> types.SimpleNamespace:
    """``subprocess`` for a DeepSpeed module: Popen records; the ssh check passes."""
    return types.SimpleNamespace(Popen=lambda cmd, **kw: Recorded(log, cmd, **kw), check_call=lambda *a, **k: 0,
                                 check_output=real.check_output, CalledProcessError=real.CalledProcessError,
                                 DEVNULL=real.DEVNULL)


def deepspeed_runner_command(tmp_path: Path, files: dict[str, str]) -> list[str]:
    """Run launch.sh with a recording ``deepspeed``; then DeepSpeed's runner
    (deepspeed/launcher/runner.py main) on those arguments, with pdsh, its ssh
    check and the final Popen stood in: the command it would start."""
    from deepspeed.launcher import runner

    install(tmp_path, "deepspeed", RECORDER.format(python=sys.executable))
    out = tmp_path / "out"
    write_file_set(out, files)
    (tmp_path / "train.py").write_text(TRAIN_SCRIPT)
    subprocess.run(["bash", str(out / "launch.sh")], env=clean_env(tmp_path, TRAIN_SCRIPT=str(tmp_path / "train.py")),
                   check=True)
    [got] = captures(tmp_path)
    started: list = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "subprocess", recorder_module(started, subprocess))
        patch.setattr(runner, "signal", NO_SIGNALS)
        patch.setattr(runner.PDSHRunner, "backend_exists", lambda self: True)
        patch.setattr(runner, "DEEPSPEED_ENVIRONMENT_PATHS", [])
        runner.main(got["argv"])
    [(command, _)] = started
    return command


def launch_py_commands(launch_args: list[str]) -> list[tuple[list[str], dict]]:
    """DeepSpeed's launch.py main on one node, with the CUDA accelerator (this
    machine has none) and Popen stood in: each local rank's command and env."""
    from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator
    from deepspeed.launcher import launch

    started: list = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(launch, "subprocess", recorder_module(started, subprocess))
        patch.setattr(launch, "signal", NO_SIGNALS)
        patch.setattr(launch, "time", types.SimpleNamespace(sleep=lambda s: None))
        patch.setattr(launch, "get_accelerator", CUDA_Accelerator)
        patch.setattr(sys, "argv", ["launch.py", *launch_args])
        launch.main()
    return started


def deepspeed_placement(tmp_path: Path, files: dict[str, str], world_size: int) -> list[tuple[str, int]]:
    """rank -> (host, GPU) as DeepSpeed starts it. pdsh runs the launch command
    on each host of its ``-w`` list with ``%n`` replaced by the host's position
    in that list (pdsh: opt.c wcoll_arg_process pushes -w hosts in order, dsh.c
    gives thread i nodeid i, pipecmd.c substitutes %n); without pdsh (one host)
    it runs locally as node 0. Each rank's command is then executed for real,
    and the training script reports its RANK, LOCAL_RANK and the GPU list it
    sees; it takes the device of its local rank."""
    command = deepspeed_runner_command(tmp_path, files)
    first = command.index("deepspeed.launcher.launch") + 1
    hosts = command[command.index("-w") + 1].split(",") if command[0] == "pdsh" else [files["hostfile"].split()[0]]
    processes = []
    for position, host in enumerate(hosts):
        for cmd, env in launch_py_commands([arg.replace("%n", str(position)) for arg in command[first:]]):
            processes.append(subprocess.Popen(cmd, env={**env, "LOOM_TEST_HOST": host, "CAPTURE_DIR": str(tmp_path / "capture")},
                                              stderr=subprocess.PIPE, text=True))
    for process in processes:
        _, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
    reports = {int(r["RANK"]): r for r in map(json.loads, (p.read_text() for p in (tmp_path / "capture").iterdir()))}
    assert sorted(reports) == list(range(world_size))
    launched = []
    for rank in range(world_size):
        report = reports[rank]
        local = int(report["LOCAL_RANK"])
        assert f"--local_rank={local}" in report["argv"]  # what DeepSpeed scripts pass to set_device
        assert report["argv"][0] == str(tmp_path / "train.py")
        launched.append((report["LOOM_TEST_HOST"], int(report["CUDA_VISIBLE_DEVICES"].split(",")[local])))
    return launched


def deepspeed_groups(layout: Layout) -> dict[str, list[list[int]]]:
    """DeepSpeed's own groups: pipelines and data-parallel groups of the
    pipe-major ``PipeDataParallelTopology``, and the expert (data) parallel
    groups deepspeed/utils/groups.py builds for MoE layers."""
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology
    from deepspeed.utils.groups import _get_expert_parallel_ranks

    topology = PipeDataParallelTopology(num_pp=layout.pp, num_dp=layout.dp)
    groups = {"pp": topology.get_axis_comm_lists("pipe") or [[r] for r in range(layout.world_size)],
              "dp-cp": topology.get_axis_comm_lists("data") or [[r] for r in range(layout.world_size)]}
    if layout.ep > 1:
        ep, expert_dp = _get_expert_parallel_ranks(layout.world_size, 1, layout.ep, layout.pp)
        groups.update(ep=ep, **{"expert-dp": expert_dp})
    return groups


@pytest.mark.parametrize("name, seed", placements(DEEPSPEED, seeds=(1,)))  # ~1 s each: 16 processes
def test_deepspeed_starts_every_rank_on_its_planned_gpu(tmp_path, name, seed):
    job, layout, placement, files = files_of(DEEPSPEED[name], seed)
    per_host = DEEPSPEED[name][2]
    orders = [[gpu for _, gpu in placement.gpus[k : k + per_host]] for k in range(0, layout.world_size, per_host)]
    assert ("gpu_order.py" in files) == any(order != sorted(order) for order in orders)
    launched = deepspeed_placement(tmp_path, files, layout.world_size)
    assert launched == list(placement.gpus)
    assert_groups_land_as_priced(deepspeed_groups(layout), layout, launched, placement)


def test_without_gpu_order_deepspeed_would_sort_the_gpus(tmp_path):
    """Why gpu_order.py exists: the same files minus it (the training script
    started directly) run each host's local ranks on its GPUs in ascending order."""
    job, layout, placement, files = files_of(DEEPSPEED["zero3-dp16"], 1)
    assert "gpu_order.py" in files
    direct = {**files, "launch.sh": files["launch.sh"].replace('"$HERE/gpu_order.py" ', "")}
    del direct["gpu_order.py"]
    launched = deepspeed_placement(tmp_path, direct, layout.world_size)
    assert launched != list(placement.gpus)
    per_host = [launched[k : k + 8] for k in range(0, 16, 8)]
    assert all([g for _, g in block] == list(range(8)) for block in per_host)
    assert [block[0][0] for block in per_host] == [placement.gpus[0][0], placement.gpus[8][0]]


def test_gpu_order_refuses_a_node_given_other_gpus(tmp_path):
    """If the hostfile or --include was edited so that a node gets other GPUs
    than planned, gpu_order.py stops rather than run the wrong placement."""
    _, _, _, files = files_of(DEEPSPEED["subset-dp8"], 1)
    (tmp_path / "gpu_order.py").write_text(files["gpu_order.py"])
    env = {**os.environ, "CROSS_RANK": "0", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    done = subprocess.run([sys.executable, str(tmp_path / "gpu_order.py"), "--local_rank=0", "train.py"], env=env,
                          capture_output=True, text=True)
    assert done.returncode != 0 and "the launcher gave node 0" in done.stderr


def test_deepspeed_launch_py_misnumbers_local_ranks_when_nodes_differ_in_size():
    """Why hosts must run equally many ranks: launch.py takes local_rank =
    rank % (this node's processes), the position in the node only when all
    nodes are alike. Node b of {a: 2 GPUs, b: 4 GPUs} runs ranks 2..5."""
    world = base64.urlsafe_b64encode(json.dumps({"a": [0, 1], "b": [0, 1, 2, 3]}).encode()).decode()
    started = launch_py_commands([f"--world_info={world}", "--node_rank=1", "train.py"])
    assert [int(env["RANK"]) for _, env in started] == [2, 3, 4, 5]
    assert [int(env["LOCAL_RANK"]) for _, env in started] == [2, 3, 0, 1]  # not 0, 1, 2, 3


# --- placements a per-node launcher cannot realise ----------------------------------------


def broken(kind: str, job: Job, layout: Layout, placement: Placement) -> Placement:
    gpus = list(placement.gpus)
    if kind == "non-contiguous host":  # swap one rank of the first node with one of the second
        gpus[1], gpus[-1] = gpus[-1], gpus[1]
    elif kind == "gpu used twice":
        gpus[1] = gpus[0]
    elif kind == "uneven hosts":  # the second node's first rank moves to a spare GPU of the first
        host = gpus[0][0]
        spare = next(g for g in range(job.cluster.gpus_per_node) if (host, g) not in gpus)
        gpus[layout.world_size // len({h for h, _ in gpus})] = (host, spare)
    elif kind == "unknown host":
        gpus = [("elsewhere" if h == gpus[-1][0] else h, g) for h, g in gpus]
    elif kind == "gpu out of range":
        gpus[0] = (gpus[0][0], job.cluster.gpus_per_node)
    elif kind == "too few ranks":
        gpus = gpus[: len(gpus) // 2]
    return Placement(gpus=tuple(gpus))


REASONS = {
    "non-contiguous host": "not contiguous",
    "gpu used twice": "twice",
    "uneven hosts": "different numbers of ranks",
    "unknown host": "does not have",
    "gpu out of range": "has GPUs 0..",
    "too few ranks": r"placement has \d+ ranks",
}


@pytest.mark.parametrize("case", [MEGATRON["half-nodes-tp2-dp2-pp2"], DEEPSPEED["subset-dp8"]], ids=["megatron", "deepspeed"])
@pytest.mark.parametrize("kind", sorted(REASONS))
def test_unrealisable_placements_are_refused_and_nothing_is_written(tmp_path, case, kind):
    job, layout, per_host = case
    placement = broken(kind, job, layout, permuted_placement(job, layout, per_host, seed=1))
    assert placement != permuted_placement(job, layout, per_host, seed=1)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=REASONS[kind]):
        write_file_set(out, launch_files(job, layout, uniform_stages(job.model, layout), placement))
    assert not out.exists()
