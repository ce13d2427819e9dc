"""The decoder-family trial of issue #16, re-runnable: every model config
loom ships or tests with, read and planned as a new user would.

    python benchmarks/model_families.py

Configs: the catalogue (profiles/models/*.json) and the public Hugging Face
configs the tests keep (tests/data/decoder_families, tests/data/unbuildable),
plus one config per out-of-scope architecture (an encoder-decoder, an
encoder-only, a vision-only and a pure state-space model). Each is planned on
nodes of 8 H100 sized to it (``_nodes_for``; global batch 64 per node,
sequence 4,096) with Megatron-LM, or
with DeepSpeed where Megatron's pretrain_gpt.py cannot build the family, or
refused with the reason loom gives. The published parameter counts each is
checked against live in the tests (tests/test_decoder_families.py,
tests/test_hybrid.py, tests/test_catalogue_moe.py).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from loom.planner.search.layouts import search
from loom.planner.specs.cluster import parse_cluster
from loom.planner.specs.errors import InfeasibleError, SpecError
from loom.planner.specs.job import Job
from loom.planner.specs.model import load_model, model_from_hf_config

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = [ROOT / "profiles" / "models", ROOT / "tests" / "data" / "decoder_families", ROOT / "tests" / "data" / "unbuildable"]
OUT_OF_SCOPE = {
    "t5-small": {"model_type": "t5", "is_encoder_decoder": True, "d_model": 512},
    "bert-base": {"model_type": "bert", "hidden_size": 768},
    "vit-base": {"model_type": "vit", "hidden_size": 768},
    "mamba2-2.7b": {"model_type": "mamba2", "hidden_size": 2560},
}
CLUSTER = {"nodes": 1, "gpus_per_node": 8, "gpu": "H100", "nvlink_GBps": 450, "nics_per_node": 8, "nic_Gbps": 400}


def _row(name: str, load) -> tuple[str, str]:
    """(outcome, what): 'planned', 'refused' (bad or out-of-scope input) or 'infeasible'."""
    try:
        model = load()
    except SpecError as error:
        message = str(error).split(": ", 1)[-1]
        return "refused", message if len(message) < 160 else f"{message[:60]} ... {message[-95:]}"
    framework = "deepspeed" if model.megatron_unbuildable else "megatron"
    if model.vision is not None:
        return "read", f"{model.total_params() / 1e9:.2f}B (vision-language: planned, no launch files)"
    nodes = _nodes_for(model.total_params())
    job = Job(model=model, cluster=parse_cluster({**CLUSTER, "nodes": nodes}, "bench"), global_batch_size=64 * nodes, seq_length=4096,
              framework=framework)
    try:
        best = search(job, top_k=1).plans[0]
    except InfeasibleError as error:
        return "infeasible", f"{model.total_params() / 1e9:.2f}B on {8 * nodes} H100: {str(error)[:110]}"
    active = f" ({model.active_params() / 1e9:.2f}B active)" if model.moe else ""
    return "planned", (f"{model.total_params() / 1e9:7.2f}B{active:16s} {8 * nodes:4d} H100  {framework:9s} {best.layout.label():40s} "
                       f"{best.step_time_s:7.3f} s")


def _nodes_for(params: float) -> int:
    """Nodes of 8 x 80 GB for ``params``: room for ~32 bytes per parameter
    (16-bit weights and gradients, fp32 Adam state and master, activations),
    rounded up to a power of two."""
    nodes = 1
    while nodes * 8 * 80e9 < 32 * params:
        nodes *= 2
    return nodes


def main() -> None:
    rows = [(path.stem, lambda path=path: load_model(str(path))) for folder in FOLDERS for path in sorted(folder.glob("*.json"))]
    rows += [(name, lambda name=name, config=config: model_from_hf_config(config, name, f"{name}.json")) for name, config in OUT_OF_SCOPE.items()]
    outcomes = Counter()
    print(f"{'config':28s} {'outcome':10s} parameters, GPUs, framework, best layout, step (or the reason)")
    for name, load in rows:
        outcome, what = _row(name, load)
        outcomes[outcome] += 1
        print(f"{name:28s} {outcome:10s} {what}")
    print(f"{len(rows)} configs: " + ", ".join(f"{count} {outcome}" for outcome, count in sorted(outcomes.items())))


if __name__ == "__main__":
    main()
