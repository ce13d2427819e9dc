"""Specs: the model catalogue and HF config.json reader, the GPU catalogue,
cluster files with per-node overrides, and the solver stack loading cleanly
(highspy beside ortools, ARCHITECTURE.md's known trap)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from loom.cli.app import app
from loom.planner.specs.cluster import load_cluster, parse_cluster
from loom.planner.specs.errors import SpecError
from loom.planner.specs.job import load_job
from loom.planner.specs.model import load_model, model_from_hf_config
from loom.profiles.catalogue import find_gpu, gpu_names, model_names

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# --- the model catalogue --------------------------------------------------------

# Publicly stated parameter counts (model cards / papers), in billions.
PUBLISHED_PARAMS_B = {
    "llama-2-7b": 6.74,
    "llama-2-70b": 68.98,
    "llama-3-8b": 8.03,
    "llama-3-70b": 70.55,
    "llama-3-405b": 405.85,  # Llama 3.1 405B
    "mistral-7b": 7.24,
    "qwen2.5-72b": 72.7,
    "gpt3-175b": 174.6,
    "gpt-neox-20b": 20.55,
}


def test_catalogue_has_the_models_the_issue_asks_for():
    assert set(PUBLISHED_PARAMS_B) <= set(model_names())


@pytest.mark.parametrize("name", model_names())
def test_every_catalogue_model_loads(name):
    model = load_model(name)
    assert model.num_layers > 0 and model.vocab_size > 0
    assert model.hidden_size % model.num_attention_heads == 0
    assert model.num_attention_heads % model.num_query_groups == 0
    assert model.total_params() > 0


@pytest.mark.parametrize("name, billions", sorted(PUBLISHED_PARAMS_B.items()))
def test_parameter_count_matches_published_size(name, billions):
    assert load_model(name).total_params() / 1e9 == pytest.approx(billions, rel=0.02)


def test_catalogue_names_are_case_insensitive():
    assert load_model("Llama-3-8B").total_params() == load_model("llama-3-8b").total_params()


# --- config.json per family ----------------------------------------------------------

SMALL = {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 8, "intermediate_size": 688,
         "vocab_size": 1000, "max_position_embeddings": 4096}
FAMILY_CONFIGS = {
    "llama": {"model_type": "llama", **SMALL, "num_key_value_heads": 2, "rope_theta": 500000.0, "rms_norm_eps": 1e-5},
    "mistral": {"model_type": "mistral", **SMALL, "num_key_value_heads": 4, "tie_word_embeddings": False, "rms_norm_eps": 1e-5},
    "qwen2": {"model_type": "qwen2", **SMALL, "num_key_value_heads": 2, "tie_word_embeddings": True, "rms_norm_eps": 1e-6},
    "gpt2": {"model_type": "gpt2", "n_layer": 4, "n_embd": 256, "n_head": 8, "n_inner": None, "n_positions": 1024,
             "vocab_size": 1000},
    "gpt_neox": {"model_type": "gpt_neox", **SMALL, "intermediate_size": 1024, "tie_word_embeddings": False},
}
# family -> (gated_mlp, tied_embeddings, linear_bias, qkv_bias, query groups, normalization, learned positions)
EXPECTED = {
    "llama": (True, False, False, False, 2, "RMSNorm", False),
    "mistral": (True, False, False, False, 4, "RMSNorm", False),
    "qwen2": (True, True, False, True, 2, "RMSNorm", False),
    "gpt2": (False, True, True, False, 8, "LayerNorm", True),
    "gpt_neox": (False, False, True, False, 8, "LayerNorm", False),
}


def write_config(directory: Path, config: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_config_json_per_family(tmp_path, family):
    model = load_model(str(write_config(tmp_path / f"tiny-{family}", FAMILY_CONFIGS[family])))
    gated, tied, bias, qkv_bias, groups, norm, learned = EXPECTED[family]
    assert model.gated_mlp is gated
    assert model.tied_embeddings is tied
    assert model.linear_bias is bias
    assert model.qkv_bias is qkv_bias
    assert model.num_query_groups == groups
    assert model.normalization == norm
    assert model.learned_position_embeddings is learned
    assert (model.num_layers, model.hidden_size, model.num_attention_heads, model.vocab_size) == (4, 256, 8, 1000)
    assert model.name == f"tiny-{family}", "a config.json is named after its folder"


def test_gpt2_defaults_ffn_to_four_times_hidden(tmp_path):
    model = load_model(str(write_config(tmp_path / "g", FAMILY_CONFIGS["gpt2"])))
    assert model.ffn_hidden_size == 4 * 256
    assert model.max_position_embeddings == 1024


# Small public checkpoints whose exact parameter counts are published: a check
# of the per-family counting (biases, tied heads, GQA, learned positions).
PUBLIC_SMALL = {
    # GPT-2 small: 124,439,808 parameters (tied LM head, learned positions, biases).
    "gpt2": ({"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024,
              "vocab_size": 50257}, 124_439_808),
    # Pythia-160M (GPT-NeoX): 162,322,944 parameters (Biderman et al. 2023, table 1).
    "gpt_neox": ({"model_type": "gpt_neox", "num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12,
                  "intermediate_size": 3072, "vocab_size": 50304, "max_position_embeddings": 2048,
                  "tie_word_embeddings": False}, 162_322_944),
    # Qwen2.5-0.5B: 0.49B (494,032,768) with tied embeddings, QKV biases, GQA 14/2.
    "qwen2": ({"model_type": "qwen2", "num_hidden_layers": 24, "hidden_size": 896, "num_attention_heads": 14,
               "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936,
               "max_position_embeddings": 32768, "tie_word_embeddings": True, "rms_norm_eps": 1e-6}, 494_032_768),
    # TinyLlama-1.1B: 1,100,048,384 parameters (GQA 32/4, untied).
    "llama": ({"model_type": "llama", "num_hidden_layers": 22, "hidden_size": 2048, "num_attention_heads": 32,
               "num_key_value_heads": 4, "intermediate_size": 5632, "vocab_size": 32000,
               "max_position_embeddings": 2048, "rms_norm_eps": 1e-5}, 1_100_048_384),
}


@pytest.mark.parametrize("family", sorted(PUBLIC_SMALL))
def test_small_public_models_count_exactly(family):
    config, params = PUBLIC_SMALL[family]
    assert model_from_hf_config(config, name=family, source="test").total_params() == pytest.approx(params, rel=1e-3)


def test_explicit_head_dim_is_honoured():
    """Mistral-NeMo 12B sets head_dim 128 although hidden/heads = 5120/32 = 160
    (so do Gemma and Qwen3); its published size is 12.25B parameters."""
    config = {"model_type": "mistral", "hidden_size": 5120, "num_attention_heads": 32, "num_key_value_heads": 8,
              "head_dim": 128, "intermediate_size": 14336, "num_hidden_layers": 40, "vocab_size": 131072,
              "max_position_embeddings": 1024000, "tie_word_embeddings": False, "rms_norm_eps": 1e-5}
    model = model_from_hf_config(config, name="mistral-nemo", source="test")
    assert model.head_dim == 128
    assert model.total_params() / 1e9 == pytest.approx(12.25, rel=0.02)


@pytest.mark.parametrize("config, field", [
    ({**FAMILY_CONFIGS["llama"], "model_type": "t5"}, "model_type"),
    ({**FAMILY_CONFIGS["llama"], "num_attention_heads": 7}, "num_attention_heads"),  # 256 % 7
    ({**FAMILY_CONFIGS["llama"], "num_key_value_heads": 3}, "num_key_value_heads"),  # 8 % 3
    ({**FAMILY_CONFIGS["llama"], "num_hidden_layers": 0}, "num_hidden_layers"),
    ({**FAMILY_CONFIGS["llama"], "vocab_size": "big"}, "vocab_size"),
])
def test_bad_config_json_names_the_field(tmp_path, config, field):
    path = write_config(tmp_path / "bad", config)
    with pytest.raises(SpecError) as info:
        load_model(str(path))
    assert info.value.field == field and info.value.source == str(path)


def test_model_config_path_from_the_cli(tmp_path):
    config = write_config(tmp_path / "tiny-llama", FAMILY_CONFIGS["llama"])
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(
        {"nodes": 1, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"model": "llama-3-8b", "cluster": "cluster.yaml", "global_batch_size": 32,
                                   "seq_length": 1024}))
    result = CliRunner().invoke(app, ["plan", str(job), "--model", str(config), "--json", "--top-k", 3])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model"] == "tiny-llama"
    for plan in report["plans"]:
        assert sum(stage["layers"] for stage in plan["stages"]) == 4
        assert 2 % plan["parallel"]["tp"] == 0, "TP must divide the 2 key/value heads of the config"

    # The same path given in the job file works too.
    job.write_text(yaml.safe_dump({"model": str(config), "cluster": "cluster.yaml", "global_batch_size": 32,
                                   "seq_length": 1024}))
    result = CliRunner().invoke(app, ["plan", str(job), "--json", "--top-k", 1])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"] == "tiny-llama"


# --- the GPU catalogue --------------------------------------------------------------

# Each GPU the issue names, by a few of the names people write.
GPU_ALIASES = {
    "A100 40GB": ["A100-SXM4-40GB", "A100-40GB", "a100-40gb"],
    "A100 80GB": ["A100-SXM4-80GB", "A100-80GB", "A100"],
    "H100 SXM": ["H100-SXM5-80GB", "H100-SXM", "H100", "h100"],
    "H200": ["H200-SXM-141GB", "H200", "h200"],
    "B200": ["B200-SXM-180GB", "B200", "b200"],
    "MI300X": ["MI300X-192GB", "MI300X", "mi300x"],
    "L40S": ["L40S-48GB", "L40S", "l40s"],
}


@pytest.mark.parametrize("gpu", sorted(GPU_ALIASES))
def test_every_issue_gpu_resolves_by_name_and_alias(gpu):
    entries = [find_gpu(alias) for alias in GPU_ALIASES[gpu]]
    assert all(entry is entries[0] for entry in entries), "aliases must resolve to one entry"
    entry = entries[0]
    assert entry.name in gpu_names()
    assert entry.peak_flops("bf16") > 0 and entry.peak_flops("fp16") > 0
    assert entry.memory_bytes > 0


def test_gpu_memory_and_peaks_are_ordered_sensibly():
    """Catalogue sanity against public data sheets: capacities in GB order, and
    Hopper's dense bf16 peak about three times Ampere's."""
    capacities = [find_gpu(n).memory_bytes for n in ("A100-40GB", "L40S", "A100-80GB", "H200", "B200", "MI300X")]
    assert capacities == sorted(capacities)
    assert find_gpu("A100-40GB").memory_bytes < find_gpu("A100-80GB").memory_bytes
    assert 2.5 < find_gpu("H100").peak_flops("bf16") / find_gpu("A100").peak_flops("bf16") < 3.5
    assert not find_gpu("A100").supports("fp8") and find_gpu("H100").supports("fp8")


def test_unknown_gpu_is_a_spec_error_naming_source_and_field():
    with pytest.raises(SpecError) as info:
        find_gpu("H900", "my-cluster.yaml", "gpu")
    assert info.value.source == "my-cluster.yaml" and info.value.field == "gpu"


# --- clusters and node overrides -------------------------------------------------------

BASE_CLUSTER = {"nodes": 3, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}


def test_cluster_without_overrides_is_uniform():
    cluster = parse_cluster(BASE_CLUSTER, "test")
    assert cluster.num_gpus == 24 and len(set(cluster.hosts)) == 3
    assert all(node.gpu is find_gpu("H100") and node.nic_Gbps == 400 for node in cluster.nodes)


def test_node_override_by_index():
    cluster = parse_cluster({**BASE_CLUSTER, "node_overrides": [{"node": 1, "nic_Gbps": 200, "nvlink_GBps": 300}]}, "test")
    assert cluster.nodes[1].nic_Gbps == 200 and cluster.nodes[1].nvlink_GBps == 300
    assert cluster.nodes[0].nic_Gbps == 400 and cluster.nodes[2].nic_Gbps == 400
    assert cluster.slowest.nic_Gbps == 200 and cluster.slowest.nvlink_GBps == 300


def test_node_override_by_host_name(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({**BASE_CLUSTER, "hosts": ["gpu-a", "gpu-b", "gpu-c"],
                                    "node_overrides": [{"node": "gpu-c", "gpu": "A100", "nics_per_node": 4}]}))
    cluster = load_cluster(path)
    assert cluster.hosts == ["gpu-a", "gpu-b", "gpu-c"]
    assert cluster.nodes[2].gpu is find_gpu("A100-SXM4-80GB") and cluster.nodes[2].nics_per_node == 4
    assert cluster.nodes[0].gpu is find_gpu("H100") and cluster.nodes[1].nics_per_node == 8
    # The job runs at the pace of the slowest node, in the smallest memory (H100's 79.11 GiB against A100's 79.15).
    slowest = cluster.slowest.gpu
    assert slowest.peak_tflops == find_gpu("A100").peak_tflops and slowest.memory_bytes == find_gpu("H100").memory_bytes


@pytest.mark.parametrize("node", [3, -1, "gpu-z"])
def test_bad_override_node_is_a_spec_error(tmp_path, node):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({**BASE_CLUSTER, "hosts": ["gpu-a", "gpu-b", "gpu-c"],
                                    "node_overrides": [{"node": node, "nic_Gbps": 100}]}))
    with pytest.raises(SpecError) as info:
        load_cluster(path)
    assert info.value.field == "node_overrides.0.node"
    assert info.value.source == str(path)


def test_override_with_unknown_field_is_a_spec_error():
    with pytest.raises(SpecError) as info:
        parse_cluster({**BASE_CLUSTER, "node_overrides": [{"node": 0, "nic_gbps": 100}]}, "test")
    assert info.value.field == "node_overrides.0.nic_gbps"


def test_hosts_must_match_node_count():
    with pytest.raises(SpecError) as info:
        parse_cluster({**BASE_CLUSTER, "hosts": ["a", "b"]}, "test")
    assert info.value.field == "hosts"


# --- the solver stack: highspy beside ortools -------------------------------------------


def _solve_both() -> tuple[float, float, int]:
    """A 2-variable LP with HiGHS through PuLP and a tiny CP-SAT model, in this process."""
    import pulp
    from ortools.sat.python import cp_model

    assert "HiGHS" in pulp.listSolvers(onlyAvailable=True), pulp.listSolvers(onlyAvailable=True)
    # max 3x + 2y  s.t.  x + y <= 4,  x + 3y <= 6,  x <= 3   ->  x = 3, y = 1, objective 11
    lp = pulp.LpProblem("two_vars", pulp.LpMaximize)
    x, y = pulp.LpVariable("x", lowBound=0), pulp.LpVariable("y", lowBound=0)
    lp += 3 * x + 2 * y
    lp += x + y <= 4
    lp += x + 3 * y <= 6
    lp += x <= 3
    status = lp.solve(pulp.HiGHS(msg=False))
    assert pulp.LpStatus[status] == "Optimal"

    # three items into two bins of capacity 5, minimise the bins used -> 2
    model = cp_model.CpModel()
    sizes, bins = [3, 3, 2], range(2)
    put = {(i, b): model.NewBoolVar(f"put_{i}_{b}") for i in range(3) for b in bins}
    used = [model.NewBoolVar(f"used_{b}") for b in bins]
    for i in range(3):
        model.AddExactlyOne(put[i, b] for b in bins)
    for b in bins:
        model.Add(sum(sizes[i] * put[i, b] for i in range(3)) <= 5 * used[b])
    model.Minimize(sum(used))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = 5.0
    solver.parameters.num_workers = 1
    assert solver.Solve(model) == cp_model.OPTIMAL
    return pulp.value(x), pulp.value(y), int(solver.ObjectiveValue())


def test_highs_through_pulp_and_cp_sat_in_one_process():
    import highspy  # noqa: F401  (the clash is between these two native libraries)
    from ortools.sat.python import cp_model  # noqa: F401

    x, y, bins = _solve_both()
    assert (x, y) == (pytest.approx(3.0), pytest.approx(1.0))
    assert bins == 2


@pytest.mark.parametrize("first", ["highspy", "ortools.sat.python.cp_model"])
def test_highspy_and_cp_sat_load_in_either_order_in_a_fresh_process(first):
    """The clash depends on which native library loads first, and pytest's own
    process may already have loaded one; check both orders from scratch."""
    second = "ortools.sat.python.cp_model" if first == "highspy" else "highspy"
    script = textwrap.dedent(f"""
        import importlib
        importlib.import_module({first!r})
        importlib.import_module({second!r})
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_specs import _solve_both
        print(_solve_both())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(3.0, 1.0, 2)" in done.stdout


# Published parameter counts (model cards): Mixtral 8x7B 46.7B, 8x22B 141B,
# Qwen3-235B-A22B 235B (22B active), DeepSeek-V3 671B (37B active) + 14B MTP.
@pytest.mark.parametrize(
    "name, total_B, active_B",
    [("mixtral-8x7b", 46.7, 12.9), ("mixtral-8x22b", 141, 39), ("qwen3-235b-a22b", 235, 22), ("deepseek-v3", 671 + 14, 37)],
)
def test_moe_catalogue_models_have_their_published_sizes(name, total_B, active_B):
    model = load_model(name)
    assert model.total_params() / 1e9 == pytest.approx(total_B, rel=0.02)
    h = model.hidden_size
    dense = model.num_layers - model.num_moe_layers
    active = (
        model.num_layers * (model.attention_params() + 2 * model.norm_params())
        + dense * model.mlp_params()
        + model.num_moe_layers * model.moe.active_params(h)
        + model.embedding_params()
        + model.head_params()
    )
    assert active / 1e9 == pytest.approx(active_B, rel=0.05)


def test_deepseek_v3_has_latent_attention_and_dense_first_layers():
    model = load_model("deepseek-v3")
    assert model.mla.kv_lora_rank == 512 and model.qk_head_dim == 192 and model.v_head_dim == 128
    assert [model.is_moe_layer(i) for i in (0, 2, 3, 60)] == [False, False, True, True]
    assert model.moe.shared_ffn_hidden_size == 2048 and model.mtp_layers == 1


def test_top8_moe_models_need_megatron(tmp_path):
    """DeepSpeed's MoE gates top-1 or top-2 and has no shared experts."""
    job = tmp_path / "job.yaml"
    cluster = "{nodes: 8, gpus_per_node: 8, gpu: H100, nvlink_GBps: 450, nics_per_node: 8, nic_Gbps: 400}"
    job.write_text(f"model: qwen3-235b-a22b\ncluster: {cluster}\nglobal_batch_size: 256\nseq_length: 4096\nframework: deepspeed\n")
    with pytest.raises(SpecError, match="top-1 and top-2 gates") as error:
        load_job(job)
    assert error.value.field == "framework"


@pytest.mark.parametrize(
    "gbs, seq, cluster, warned",
    [
        (512, 8192, {}, None),
        (4_194_304, 4096, {}, "did you give it in tokens?"),
        (512, 131072, {}, "longer than llama-3-8b's max_position_embeddings 8,192"),
        (512, 8192, {"node_overrides": [{"node": 1, "nic_Gbps": 200}]}, "names no hosts"),
        (512, 8192, {"node_overrides": [{"node": "b", "nic_Gbps": 200}], "hosts": ["a", "b"]}, None),
    ],
)
def test_job_warnings_say_what_is_legal_but_probably_not_meant(gbs, seq, cluster, warned):
    from loom.planner.specs.job import Job, job_warnings

    spec = {"nodes": 2, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400, **cluster}
    job = Job(model=load_model("llama-3-8b"), cluster=parse_cluster(spec, "c.yaml"), global_batch_size=gbs, seq_length=seq)
    warnings = job_warnings(job)
    assert (warnings == []) if warned is None else (len(warnings) == 1 and warned in warnings[0])


def test_a_routed_only_moe_plan_is_warned_optimistic_and_deepseek_v3_is_not():
    """Against measured runs (benchmarks/moe_runs.py) loom prices MoE models
    without a shared expert too fast: the plan says so."""
    from loom.planner.specs.job import Job, job_warnings

    cluster = parse_cluster({"nodes": 4, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}, "c")
    warned = {name: any("optimistic" in w for w in job_warnings(Job(model=load_model(name), cluster=cluster, global_batch_size=256,
                                                                    seq_length=4096)))
              for name in ("qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v3", "llama-3-8b")}
    assert warned == {"qwen3-30b-a3b": True, "mixtral-8x7b": True, "deepseek-v3": False, "llama-3-8b": False}


@pytest.mark.parametrize("features, field", [
    ("features: {moe_router_fusion: 'on'}", "features.moe_router_fusion"),  # a string is not a boolean
    ("features: {overlap_grad_reduce: 1.0}", "features.overlap_grad_reduce"),
    ("features:\n  moe_load_imbalance:\n    8: 1.2\n    8: 3.0", "'8'"),  # the same EP size twice
])
def test_job_features_are_read_strictly(tmp_path, features, field):
    job = tmp_path / "job.yaml"
    job.write_text(f"model: mixtral-8x7b\ncluster: {EXAMPLES / 'h100-64.yaml'}\nglobal_batch_size: 256\nseq_length: 4096\n{features}\n")
    with pytest.raises(SpecError, match=field):
        load_job(job)
