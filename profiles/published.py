"""Published training runs as loom inputs: a job per run, the run's layout,
and its measured step time. Two sources, beside the repository:
``shared/validation/published_runs.yaml`` (papers) and
``shared/validation/nvidia_perf_runs.yaml`` (NVIDIA's performance tables).

Used by the benchmarks (prediction error, memory) and the tests (the search
must find a layout at least as fast as the published one; every layout that
ran must fit).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from loom.planner.specs.cluster import parse_cluster
from loom.planner.specs.errors import SpecError
from loom.planner.specs.job import Features, Job, stack_features
from loom.planner.specs.layout import Layout
from loom.planner.specs.model import load_model

# Beside the repository, as CI lays it out (shared/ next to the clone).
VALIDATION = Path(__file__).resolve().parents[2] / "shared" / "validation" / "published_runs.yaml"
GPT3_VOCAB = 50257  # MLPerf rows leave vocab null; GPT-3's tokenizer has 50257 entries

# What each group of runs ran, from its publication (not fitted):
#  - SC'21 (2021) and Korthikanti et al. (2022) predate flash attention and ran
#    the DP all-reduce after the backward pass, TP collectives un-overlapped.
#  - MLPerf v3.1 (NeMo, 2023) and the Megatron-Core README table run Transformer
#    Engine's fused attention with DP, TP (userbuffers) and PP overlap.
ERA_FEATURES = {
    "sc21": dict(flash_attention=False, overlap_grad_reduce=False, overlap_param_gather=False, tp_comm_overlap=False),
    "ra": dict(flash_attention=False, overlap_grad_reduce=False, overlap_param_gather=False, tp_comm_overlap=False),
    "mlperf31": dict(flash_attention=True, overlap_grad_reduce=True, overlap_param_gather=True, tp_comm_overlap=True),
    "mcore": dict(flash_attention=True, overlap_grad_reduce=True, overlap_param_gather=True, tp_comm_overlap=True),
}


def published_step_time_s(row: dict) -> float:
    """The measured step time, or one derived from TFLOP/s with the row's formula."""
    if row.get("step_time_s"):
        return row["step_time_s"]
    B, s, L, h, V = row["gbs"], row["seq"], row["layers"], row["hidden"], row["vocab"]
    if row["flops_formula"] == "megatron_hw_full_recompute":
        flops = 96 * B * s * L * h**2 * (1 + s / (6 * h) + V / (16 * L * h))
    else:
        flops = 72 * B * s * L * h**2 * (1 + s / (6 * h) + V / (12 * L * h))
    return flops / (row["tflops_per_gpu"] * 1e12 * row["gpus"])


def assumed_layout(row: dict) -> dict:
    """The row's layout as ``loom evaluate`` flags. Unpublished fields get the
    default of the run's era: micro batch 1, no recompute and no interleaving
    where the row gives none (the Megatron-Core table), sequence parallelism
    and the distributed optimizer on for the 2023+ runs (MLPerf and
    Megatron-Core ran both), off for 2021-22 unless the row says so."""
    era = row["id"].split("-")[0]
    modern = era in ("mlperf31", "mcore")
    return {
        "tp": row["tp"], "pp": row["pp"], "dp": row["dp"], "cp": 1,
        "vpp": row.get("vpp") or 1,
        "mbs": row.get("mbs") or 1,
        "recompute": row.get("recompute") or "none",
        "sequence_parallel": row.get("sequence_parallel", modern and row["tp"] > 1),
        "distributed_optimizer": row.get("distributed_optimizer", modern),
    }


def write_inputs(row: dict, clusters: dict, folder: Path) -> Path:
    """A model config.json, a cluster YAML and a job YAML for one row."""
    c = clusters[row["cluster"]]
    model = {
        "model_type": "gpt2", "n_embd": row["hidden"], "n_layer": row["layers"], "n_head": row["heads"],
        "n_positions": row["seq"], "vocab_size": row["vocab"] or GPT3_VOCAB, "tie_word_embeddings": True,
    }
    (folder / "config.json").write_text(json.dumps(model))
    cluster = {
        "name": row["cluster"], "nodes": -(-row["gpus"] // c["gpus_per_node"]), "gpus_per_node": c["gpus_per_node"],
        "gpu": c["gpu"], "nvlink_GBps": c["nvlink_GBps"], "nics_per_node": c["nics_per_node"], "nic_Gbps": c["nic_Gbps"],
    }
    job = {
        "model": str(folder / "config.json"), "cluster": cluster, "global_batch_size": row["gbs"],
        "seq_length": row["seq"], "precision": row["precision"], "features": ERA_FEATURES[row["id"].split("-")[0]],
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def load_validation(path: Path = VALIDATION) -> dict:
    return yaml.safe_load(path.read_text())


# --- NVIDIA's performance tables (shared/validation/nvidia_perf_runs.yaml) -----
NVIDIA_RUNS = VALIDATION.with_name("nvidia_perf_runs.yaml")
# DGX systems as NVIDIA builds them: 8 GPUs on NVSwitch, one 400 Gb/s NIC per GPU.
DGX = {
    "DGX-H100": {"gpus_per_node": 8, "gpu": "H100-SXM5-80GB", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400},
    "DGX-B200": {"gpus_per_node": 8, "gpu": "B200", "nvlink_GBps": 900, "nics_per_node": 8, "nic_Gbps": 400},
}
# The tables' precision column as loom's precision and Transformer Engine's
# fp8 recipe: FP8 and FP8-CS are current (tensorwise) scaling on H100 (the
# file's header), FP8-MX and MXFP8 block scaling; BF16 is bf16.
NVIDIA_PRECISION = {"FP8": ("fp8", "tensorwise"), "FP8-CS": ("fp8", "tensorwise"), "FP8-MX": ("fp8", "mxfp8"),
                    "MXFP8": ("fp8", "mxfp8"), "BF16": ("bf16", "tensorwise")}
# What NVIDIA's MoE recipes ran beyond the stack's defaults, per release,
# model and system (Megatron-Bridge scripts/performance at the release's
# tag: v0.1.0rc4 run_script.py + configs/ for 25.09, v0.3.0
# configs/*_workload_base_configs.py for 26.02). Rows whose note says
# "token-drop" ran apply_moe_token_drop: capacity factor 1.0, padded to
# capacity, alltoall dispatcher. Releases not listed run the stack defaults.
NVIDIA_MOE_RECIPES = {
    # 25.09 DeepSeek-V3 H100: enable_deepep and A2A_1F1B (overlap_moe_expert_parallel_comm, delay_wgrad_compute).
    ("25.09", "deepseek-v3", "DGX-H100"): dict(moe_token_dispatcher="deepep", overlap_moe_expert_parallel_comm=True),
    # 25.09 DeepSeek-V3 B200: token drop with the shared experts beside the all-to-all.
    ("25.09", "deepseek-v3", "DGX-B200"): dict(moe_shared_expert_overlap=True),
    # 26.02 Qwen3-30B-A3B H100 FP8_CS: moe_flex_dispatcher_backend="deepep", moe_a2a_overlap=True.
    ("26.02", "qwen3-30b-a3b", "DGX-H100"): dict(moe_token_dispatcher="deepep", overlap_moe_expert_parallel_comm=True),
    # 26.02 Qwen3-235B-A22B H100: alltoall with moe_a2a_overlap=True.
    ("26.02", "qwen3-235b-a22b", "DGX-H100"): dict(overlap_moe_expert_parallel_comm=True),
    # 26.02 DeepSeek-V3 B200: moe_flex_dispatcher_backend="hybridep".
    ("26.02", "deepseek-v3", "DGX-B200"): dict(moe_token_dispatcher="hybridep"),
}
TOKEN_DROP = dict(moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True, moe_token_dispatcher="alltoall")


def _moe_recipe(row: dict) -> dict:
    """The MoE features NVIDIA's recipe set for ``row`` (NVIDIA_MOE_RECIPES)."""
    model = Path(row["model"]).parent.name if row["model"].startswith("models/") else row["model"]
    recipe = dict(NVIDIA_MOE_RECIPES.get((row["release"], model, row["gpu"]), {}))
    if "token-drop" in row.get("note", ""):
        recipe.update(TOKEN_DROP)
    return recipe


# The rows ran NVIDIA's performance recipes (NeMo, then Megatron-Bridge): the
# megatron-bridge stack's features, the row's own TP overlap and fp8 recipe.
NVIDIA_STACK = "megatron-bridge"


@dataclass(frozen=True)
class NvidiaRun:
    """One row of NVIDIA's tables as loom inputs, or why loom cannot express it."""

    row: dict
    job: Job | None
    layout: Layout | None
    model_used: str  # the model config loom read (the row's, or its stand-in)
    reason: str = ""  # why job is None

    @property
    def step_time_s(self) -> float:
        """Published step time: gbs x seq / (tokens/s/GPU x GPUs)."""
        row = self.row
        return row["gbs"] * row["seq"] / (row["tokens_per_s_per_gpu"] * row["gpus"])


def nvidia_runs(path: Path = NVIDIA_RUNS) -> list[NvidiaRun]:
    """Every row of ``path`` as a job and the layout it ran. A row whose model
    loom cannot read uses its ``approx_model`` stand-in (same shapes, a family
    loom reads). ``fsdp > 0`` rows ran Megatron-FSDP sharded over that many
    ranks (the file's header)."""
    runs = []
    for row in yaml.safe_load(path.read_text())["runs"]:
        model, used = None, row["model"]
        for candidate in (row["model"], row.get("approx_model")):
            if candidate is None:
                continue
            try:
                model = load_model(str(path.parent / candidate) if candidate.startswith("models/") else candidate)
                used = candidate
                break
            except SpecError:
                continue
        if model is None:
            runs.append(NvidiaRun(row, None, None, used, "model family not read"))
            continue
        cluster = parse_cluster({**DGX[row["gpu"]], "nodes": row["gpus"] // 8}, str(path))
        precision, fp8_recipe = NVIDIA_PRECISION[row["precision"]]
        recipe = _moe_recipe(row) if model.moe is not None else {}
        features = stack_features(NVIDIA_STACK, Features(tp_comm_overlap=bool(row.get("recipe_tp_comm_overlap", False)), fp8_recipe=fp8_recipe, **recipe))
        job = Job(model=model, cluster=cluster, global_batch_size=row["gbs"], seq_length=row["seq"], precision=precision,
                  stack=NVIDIA_STACK, features=features, source=row["id"])
        tp, pp, cp = row["tp"], row["pp"], row["cp"]
        layout = Layout(tp=tp, pp=pp, dp=row["gpus"] // (tp * pp * cp), cp=cp, ep=row["ep"], vpp=row["vpp"],
                        micro_batch_size=row["mbs"], global_batch_size=row["gbs"], sequence_parallel=tp > 1,
                        recompute=row["recompute"], distributed_optimizer=True, fsdp=row["fsdp"])
        runs.append(NvidiaRun(row, job, layout, used))
    return runs
