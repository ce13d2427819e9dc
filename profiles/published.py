"""Published training runs (``shared/validation/published_runs.yaml``) as
loom inputs: a job per run, the run's layout, and its measured step time.

Used by ``benchmarks/published_runs.py`` (prediction error) and the tests
(the search must find a layout at least as fast as the published one).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

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
