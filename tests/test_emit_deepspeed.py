"""The DeepSpeed launch files, checked by DeepSpeed itself: ``DeepSpeedConfig``
accepts ds_config.json for the plan's DP size, the runner's own hostfile and
``--include`` parsing gives back the placement, and PipelineModule's "type:"
partitioning gives loom's stages. Also the atomic, deterministic writer."""

from __future__ import annotations

import json
import shlex
import subprocess
from collections import OrderedDict

import pytest
from deepspeed.launcher.runner import fetch_hostfile, parse_resource_filter
from deepspeed.runtime import config as ds_config_module
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.pipe.topology import PipeDataParallelTopology
from deepspeed.runtime.utils import partition_balanced

from loom.planner.specs.cluster import parse_cluster
from loom.planner.output.files import MANIFEST, write_file_set
from loom.planner.output.launch import launch_files
from loom.planner.specs.job import Job
from loom.planner.specs.layout import Layout
from loom.planner.specs.model import load_model
from loom.planner.specs.rules import layout_problems
from loom.planner.specs.stages import Placement, default_placement, default_stages, front_loaded_stage_sizes, uniform_stages


def make_cluster(nodes: int, hosts: list[str] | None = None, named: bool = True):
    """A cluster of H100 nodes, named node000... unless ``hosts`` names them
    otherwise or ``named`` is False (then the launch files take whichever nodes they are given)."""
    spec = {"nodes": nodes, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}
    names = hosts or [f"node{i:03d}" for i in range(nodes)]
    return parse_cluster({**spec, **({"hosts": names} if named else {})}, "test")


LLAMA = load_model("llama-3-8b")

CASES = {
    "zero1-pipeline-full-recompute": (
        Job(model=LLAMA, cluster=make_cluster(2), global_batch_size=256, seq_length=4096, framework="deepspeed"),
        Layout(tp=1, pp=4, dp=4, cp=1, micro_batch_size=2, global_batch_size=256, zero_stage=1, recompute="full"),
    ),
    "zero1-uneven-pipeline": (  # 32 layers on 3 stages: 11, 11, 10
        Job(model=LLAMA, cluster=make_cluster(3), global_batch_size=240, seq_length=4096, framework="deepspeed"),
        Layout(tp=1, pp=3, dp=8, cp=1, micro_batch_size=1, global_batch_size=240, zero_stage=1),
    ),
    "zero3-fp16": (
        Job(model=LLAMA, cluster=make_cluster(2), global_batch_size=128, seq_length=2048, precision="fp16",
            framework="deepspeed"),
        Layout(tp=1, pp=1, dp=16, cp=1, micro_batch_size=4, global_batch_size=128, zero_stage=3, fsdp=16),
    ),
    "zero2-offload": (
        Job(model=LLAMA, cluster=make_cluster(1), global_batch_size=32, seq_length=2048, framework="deepspeed"),
        Layout(tp=1, pp=1, dp=8, cp=1, micro_batch_size=1, global_batch_size=32, zero_stage=2, optimizer_offload=True),
    ),
    "zero0-one-node": (
        Job(model=LLAMA, cluster=make_cluster(1), global_batch_size=32, seq_length=2048, framework="deepspeed"),
        Layout(tp=1, pp=1, dp=8, cp=1, micro_batch_size=1, global_batch_size=32),
    ),
}


def files_for(name: str, placement: Placement | None = None) -> tuple[Job, Layout, dict[str, str]]:
    job, layout = CASES[name]
    placement = placement or default_placement(job.cluster, layout.world_size)
    return job, layout, launch_files(job, layout, default_stages(job.model, layout, job.framework), placement)


class DataParallelMpu:
    """The model-parallel unit DeepSpeedConfig asks for the data-parallel size."""

    def __init__(self, dp: int):
        self.dp = dp

    def get_data_parallel_world_size(self) -> int:
        return self.dp


@pytest.mark.parametrize("name", sorted(CASES))
def test_ds_config_loads_in_deepspeed(name, monkeypatch):
    job, layout, files = files_for(name)
    # DeepSpeedConfig reads the mpu only once dist.get_rank() works; a real
    # process group would JIT-build DeepSpeed's CPU comm op, so stand in rank 0.
    monkeypatch.setattr(ds_config_module.dist, "get_rank", lambda: 0)
    config = DeepSpeedConfig(json.loads(files["ds_config.json"]), mpu=DataParallelMpu(layout.dp))
    assert config.world_size == layout.dp
    assert config.train_batch_size == layout.global_batch_size
    assert config.train_micro_batch_size_per_gpu == layout.micro_batch_size
    assert config.gradient_accumulation_steps == layout.global_batch_size // (layout.micro_batch_size * layout.dp)
    assert config.zero_optimization_stage == layout.zero_stage
    assert config.bfloat16_config.enabled == (job.precision == "bf16")
    assert config.float16_config.enabled == (job.precision == "fp16")
    assert config.optimizer_name == "adam"
    assert ("activation_checkpointing" in json.loads(files["ds_config.json"])) == (layout.recompute == "full")
    # DeepSpeed's own reading of the offload section (DeepSpeedZeroOffloadOptimizerConfig).
    offloaded = config.zero_config.offload_optimizer is not None and config.zero_config.offload_optimizer.device == "cpu"
    assert offloaded == layout.optimizer_offload


def test_ds_config_with_the_wrong_dp_is_rejected(monkeypatch):
    """The check above has teeth: DeepSpeed itself refuses a mismatched DP size."""
    _, layout, files = files_for("zero3-fp16")
    monkeypatch.setattr(ds_config_module.dist, "get_rank", lambda: 0)
    with pytest.raises(AssertionError, match="train_batch_size"):
        DeepSpeedConfig(json.loads(files["ds_config.json"]), mpu=DataParallelMpu(layout.dp // 2))


def launched_placement(files: dict[str, str], tmp_path) -> list[tuple[str, int]]:
    """rank -> (host, GPU) as the DeepSpeed runner and launcher assign them:
    hosts in hostfile order, --include narrowing and ordering each host's GPUs,
    ranks numbered host by host (deepspeed/launcher/launch.py)."""
    (tmp_path / "hostfile").write_text(files["hostfile"])
    resources = fetch_hostfile(str(tmp_path / "hostfile"))
    script = files["launch.sh"].replace("\\\n", " ")  # join continued lines
    command = shlex.split(next(line for line in script.splitlines() if line.startswith("exec deepspeed")))
    include = command[command.index("--include") + 1] if "--include" in command else ""
    pool = OrderedDict((host, list(range(slots))) for host, slots in resources.items())
    active = parse_resource_filter(pool, include_str=include)
    return [(host, gpu) for host, gpus in active.items() for gpu in gpus]


def test_hostfile_and_launch_realise_the_default_placement(tmp_path):
    job, layout, files = files_for("zero3-fp16")
    assert files["hostfile"].splitlines() == ["node000 slots=8", "node001 slots=8"]
    assert "--include" not in files["launch.sh"]
    assert launched_placement(files, tmp_path) == list(default_placement(job.cluster, layout.world_size).gpus)


def run_launch_sh(files: dict[str, str], tmp_path, given: list[str]) -> subprocess.CompletedProcess:
    """Run launch.sh on the nodes ``given`` (LOOM_HOSTS) with a deepspeed that
    prints its arguments and then the hostfile it was handed."""
    (tmp_path / "launch.sh").write_text(files["launch.sh"])
    fake = tmp_path / "bin" / "deepspeed"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text('#!/bin/bash\necho "$@"\ncat "$2"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "TRAIN_SCRIPT": "train.py", "LOOM_HOSTS": " ".join(given), "TMPDIR": str(tmp_path)}
    return subprocess.run(["bash", str(tmp_path / "launch.sh")], env=env, capture_output=True, text=True)


def test_without_host_names_launch_sh_writes_the_hostfile_from_the_nodes_it_is_given(tmp_path):
    """A cluster with no hosts: no static hostfile; launch.sh takes the nodes
    from LOOM_HOSTS (or SLURM's allocation), refuses too few, and writes the
    hostfile from them in node-rank order (the job's node i stands for the
    cluster's node i), narrowed to the planned GPUs."""
    job = Job(model=LLAMA, cluster=make_cluster(2, named=False), global_batch_size=128, seq_length=2048, framework="deepspeed")
    layout = Layout(tp=1, pp=1, dp=8, cp=1, micro_batch_size=4, global_batch_size=128, zero_stage=1)
    placement = Placement(gpus=tuple([("node001", g) for g in (1, 3, 5, 7)] + [("node000", g) for g in (0, 2, 4, 6)]))
    files = launch_files(job, layout, uniform_stages(job.model, layout), placement)
    assert "hostfile" not in files
    result = run_launch_sh(files, tmp_path, ["gpu-7", "gpu-3"])
    assert result.returncode == 0, result.stderr
    command, *hostfile = result.stdout.splitlines()
    assert hostfile == ["gpu-3 slots=8", "gpu-7 slots=8"]
    assert "--master_addr gpu-3 " in command and "--include gpu-3:1,3,5,7@gpu-7:0,2,4,6" in command
    too_few = run_launch_sh(files, tmp_path, ["gpu-7"])
    assert too_few.returncode == 2 and "the plan runs on 2 nodes, got 1" in too_few.stderr


def test_a_one_node_plan_without_host_names_launches_on_this_machine(tmp_path):
    """No LOOM_HOSTS and no SLURM allocation: a one-node plan runs here (localhost); a two-node one still asks."""
    job = Job(model=LLAMA, cluster=make_cluster(1, named=False), global_batch_size=32, seq_length=2048, framework="deepspeed")
    layout = Layout(tp=1, pp=1, dp=8, cp=1, micro_batch_size=1, global_batch_size=32, zero_stage=1)
    files = launch_files(job, layout, uniform_stages(job.model, layout), default_placement(job.cluster, layout.world_size))
    result = run_launch_sh(files, tmp_path, [])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == ["localhost slots=8"]
    two = Job(model=LLAMA, cluster=make_cluster(2, named=False), global_batch_size=128, seq_length=2048, framework="deepspeed")
    wide = Layout(tp=1, pp=1, dp=16, cp=1, micro_batch_size=1, global_batch_size=128, zero_stage=1)
    files = launch_files(two, wide, uniform_stages(two.model, wide), default_placement(two.cluster, wide.world_size))
    assert "set LOOM_HOSTS" in run_launch_sh(files, tmp_path, []).stderr


def permuted_hosts_job() -> tuple[Job, Layout]:
    job = Job(model=LLAMA, cluster=make_cluster(2, hosts=["a", "b"]), global_batch_size=128, seq_length=2048,
              framework="deepspeed")
    return job, Layout(tp=1, pp=1, dp=8, cp=1, micro_batch_size=4, global_batch_size=128, zero_stage=1)


def test_include_realises_host_order_and_a_gpu_subset(tmp_path):
    job, layout = permuted_hosts_job()
    placement = Placement(gpus=tuple([("b", g) for g in (1, 3, 5, 7)] + [("a", g) for g in (0, 2, 4, 6)]))
    files = launch_files(job, layout, uniform_stages(job.model, layout), placement)
    assert files["hostfile"].splitlines() == ["b slots=8", "a slots=8"]
    assert "--master_addr b " in files["launch.sh"]
    assert launched_placement(files, tmp_path) == list(placement.gpus)


def test_a_gpu_order_the_runner_would_sort_is_set_by_gpu_order_py():
    """The runner sorts a host's GPUs, so a placement in another order gets
    gpu_order.py, started in place of the training script with each node's
    GPU list (tests/test_placement_launch.py runs it under DeepSpeed's launcher)."""
    job, layout = permuted_hosts_job()
    placement = Placement(gpus=tuple([("b", g) for g in (3, 2, 1, 0)] + [("a", g) for g in range(4)]))
    files = launch_files(job, layout, uniform_stages(job.model, layout), placement)
    assert '"$HERE/gpu_order.py" "$TRAIN_SCRIPT" --deepspeed' in files["launch.sh"]
    assert "--include b:0,1,2,3@a:0,1,2,3" in files["launch.sh"]
    namespace: dict = {}
    exec(compile(files["gpu_order.py"], "gpu_order.py", "exec"), namespace)
    assert namespace["GPUS_OF_NODE"] == ["3,2,1,0", "0,1,2,3"]
    assert "gpu_order.py" not in files_for("zero3-fp16")[2]


@pytest.mark.parametrize("name", ["zero1-pipeline-full-recompute", "zero1-uneven-pipeline"])
def test_pipeline_snippet_partitions_like_loom_stages(name):
    job, layout, files = files_for(name)
    stages = default_stages(job.model, layout, job.framework)
    snippet = files["pipeline_snippet.py"]
    namespace: dict = {}
    exec(compile(snippet, "pipeline_snippet.py", "exec"), namespace)  # valid Python, imports deepspeed.pipe
    assert namespace["PIPELINE_STAGES"] == layout.pp
    assert namespace["ACTIVATION_CHECKPOINT_INTERVAL"] == (1 if layout.recompute == "full" else 0)
    # "type:REGEX" balances a 0/1 weight per layer spec (module.py _partition_layers):
    # [embedding, decoder layers..., head].
    weights = [0] + [1] * job.model.num_layers + [0]
    bounds = partition_balanced(weights=weights, num_parts=layout.pp)
    per_stage = [sum(weights[bounds[s] : bounds[s + 1]]) for s in range(layout.pp)]
    assert per_stage == [stage.num_layers for stage in stages]
    # DeepSpeed's pipe-major rank order gives each stage loom's ranks.
    topology = PipeDataParallelTopology(num_pp=layout.pp, num_dp=layout.dp)
    assert [tuple(topology.get_axis_list("pipe", s)) for s in range(layout.pp)] == [tuple(stage.ranks) for stage in stages]


@pytest.mark.parametrize("num_layers, stages", [(layers, pp) for layers in range(1, 34) for pp in range(1, min(layers, 8) + 1)]
                         + [(61, 8), (94, 8), (126, 16)])
def test_front_loaded_sizes_are_deepspeeds_count_balanced_partition(num_layers, stages):
    weights = [0] + [1] * num_layers + [0]  # [embedding, decoder layers..., head], as the snippet builds them
    bounds = partition_balanced(weights=weights, num_parts=stages)
    assert list(front_loaded_stage_sizes(num_layers, stages)) == [sum(weights[bounds[s]:bounds[s + 1]]) for s in range(stages)]


def test_uneven_deepspeed_pipelines_are_priced_and_searched():
    """Layers that pp does not divide: priced on DeepSpeed's own split, and the search tries them."""
    from loom.planner.plan import evaluate
    from loom.planner.search.layouts import candidate_layouts

    job, layout = CASES["zero1-uneven-pipeline"]
    assert not layout_problems(job, layout)
    plan = evaluate(job, layout)
    assert [stage.num_layers for stage in plan.stages] == [11, 11, 10]
    assert plan.memory[0].peak_bytes > plan.memory[2].peak_bytes  # one more layer and the most micro batches in flight
    assert any(candidate.pp == 3 for candidate in candidate_layouts(job))


def test_no_pipeline_snippet_without_a_pipeline():
    _, _, files = files_for("zero0-one-node")
    assert set(files) == {"ds_config.json", "hostfile", "launch.sh"}


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"tp": 2, "dp": 2}, "TP, CP"),
        ({"zero_stage": 2}, "ZeRO stage 2 with a pipeline"),
        ({"recompute": "selective"}, "selective"),
    ],
)
def test_layouts_deepspeed_cannot_run_are_refused(change, reason):
    job, layout = CASES["zero1-pipeline-full-recompute"]
    bad = Layout(**{**layout.as_dict(), **change})
    with pytest.raises(ValueError, match=reason):
        launch_files(job, bad, uniform_stages(job.model, bad), default_placement(job.cluster, bad.world_size))


def test_launch_script_is_valid_bash():
    _, _, files = files_for("zero1-pipeline-full-recompute")
    subprocess.run(["bash", "-n"], input=files["launch.sh"], text=True, check=True)


# --- writing -------------------------------------------------------------------


def test_write_file_set_is_deterministic_and_leaves_no_temp_dir(tmp_path):
    for run in ("first", "second"):
        _, _, files = files_for("zero1-pipeline-full-recompute")
        write_file_set(tmp_path / run, files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first", "second"]
    names = sorted(p.name for p in (tmp_path / "first").iterdir() if p.name != MANIFEST)
    assert names == sorted(files)
    for name in names:
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes()
    assert (tmp_path / "first" / "launch.sh").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "first" / "ds_config.json").stat().st_mode & 0o777 == 0o644


def test_write_file_set_replaces_the_whole_set(tmp_path):
    """A new set replaces an earlier one whole: a file only the old set had
    (a Megatron train.sh under a DeepSpeed plan) does not survive."""
    out = tmp_path / "out"
    write_file_set(out, {"train.sh": "old\n", "slurm.sbatch": "old\n"})
    write_file_set(out, {"train.sh": "new\n"})
    assert (out / "train.sh").read_text() == "new\n"
    assert not (out / "slurm.sbatch").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_write_file_set_refuses_a_folder_it_did_not_write(tmp_path):
    from loom.planner.specs.errors import SpecError

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    with pytest.raises(SpecError, match="notes.txt"):
        write_file_set(out, {"train.sh": "new\n"})
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_write_file_set_refuses_paths_outside_out_dir(tmp_path):
    with pytest.raises(ValueError):
        write_file_set(tmp_path / "out", {"../escape.sh": "x"})


@pytest.mark.parametrize("change, flag", [({"tp": 2, "dp": 2}, "tp"), ({"cp": 2, "dp": 2}, "cp")])
def test_the_rules_name_the_dimension_deepspeed_lacks(change, flag):
    job, layout = CASES["zero1-pipeline-full-recompute"]
    problems = layout_problems(job, Layout(**{**layout.as_dict(), **change}))
    assert [field for field, _, _ in problems if field in ("tp", "cp")] == [flag]


def test_zero_1_and_2_hold_deepspeeds_gradient_reduce_buckets(monkeypatch):
    """With contiguous_gradients and overlap_comm (as ds_config.json writes)
    DeepSpeed ZeRO-1/2 allocates two reduce_bucket_size buffers in the
    gradients' dtype (stage_1_and_2.py setup_buckets): 2 x 5e8 x 2 B per GPU."""
    from loom.planner.cost.sharding import ZERO_REDUCE_BUCKET_PARAMS
    from loom.planner.plan import evaluate
    from loom.planner.specs.job import Features

    monkeypatch.setattr(ds_config_module.dist, "get_rank", lambda: 0)
    for stage in (1, 2):
        for overlap in (True, False):
            job = Job(model=load_model("llama-3-8b"), cluster=make_cluster(2), global_batch_size=64, seq_length=4096, framework="deepspeed",
                      features=Features(overlap_grad_reduce=overlap))
            layout = Layout(tp=1, pp=1, dp=16, cp=1, micro_batch_size=1, global_batch_size=64, zero_stage=stage)
            plan = evaluate(job, layout)
            config = json.loads(launch_files(job, layout, list(plan.stages), plan.placement)["ds_config.json"])
            ours = DeepSpeedConfig(config, mpu=type("Mpu", (), {"get_data_parallel_world_size": lambda self: 16})()).zero_config
            assert ours.contiguous_gradients and ours.overlap_comm == overlap and ours.reduce_bucket_size == ZERO_REDUCE_BUCKET_PARAMS
            buffers = plan.peak_memory.breakdown_bytes["sharding_buffers"]
            assert buffers == (2 if overlap else 1) * ours.reduce_bucket_size * 2
