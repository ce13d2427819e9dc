"""What torchtitan can train: it builds only the models it registers, by
name and flavor (``[model] name``, ``flavor`` of its job TOML), so a model is
trainable there when its shape is one of them.

Flavors of torchtitan 0.2.2 (the last release whose config manager reads
TOML: torchtitan/config/manager.py ``_maybe_load_toml``), each from
``torchtitan/models/<name>/__init__.py`` (``llama3_args``, ``qwen3_args``,
``deepseekv3_args``, ``gptoss_configs``). ``pipeline`` is whether the
model's TrainSpec has a ``pipelining_fn`` (qwen3's and gpt_oss's are None
in 0.2.2). ``tests/test_torchtitan.py``
checks this table against the installed torchtitan's registry.
"""

from __future__ import annotations

from dataclasses import dataclass

from loom.planner.specs.model import ModelSpec, Yarn


@dataclass(frozen=True)
class Flavor:
    """A registered torchtitan model and the shape that identifies it
    (llama3's FFN width as its FeedForward computes it from
    ffn_dim_multiplier and multiple_of; MLA models' key/value heads are
    their attention heads)."""

    name: str  # [model] name
    flavor: str  # [model] flavor
    # hidden, layers, heads, key/value heads, FFN width, vocabulary, routed
    # experts, tied embeddings, query/key and value head dims
    shape: tuple[int, ...]
    pipeline: bool  # torchtitan can split it into pipeline stages
    # The rotary embeddings it builds: rope_theta and Llama 3.1's scaling
    # factor (None: unscaled). Its job TOML sets neither.
    rotary: tuple[float, float | None]


# Rotary embeddings each family builds (model args' defaults): llama3 always
# scales by Llama 3.1's RoPEScalingArgs (factor 8); qwen3's theta is set per
# flavor; deepseek_v3 applies YaRN (rope_factor 40) only to sequences longer
# than original_seq_len 4096 (precompute_freqs_cis), gpt_oss always (rope_factor
# 32 > 1: precompute_rope_cache).
ROPE_THETA = {"llama3": 500000.0, "qwen3": 1000000.0, "deepseek_v3": 10000.0, "gpt_oss": 150000.0}
LLAMA3_SCALING = 8.0
# deepseek_v3: YaRN x40 beyond 4,096 tokens, compared by its factor (MLA.rope_scaling_factor);
# gpt_oss: GptOssModelArgs' rope_factor 32, ntk_beta 32, ntk_alpha 1, original_seq_len 4096, its ramp not rounded.
DEEPSEEK_YARN = (40.0, 4096)  # (factor, the longest sequence it leaves unscaled)
# The RMSNorm epsilon each family's model args fix (norm_eps; no flavor sets its own).
NORM_EPS = {"llama3": 1e-5, "qwen3": 1e-6, "deepseek_v3": 1e-5, "gpt_oss": 1e-5}
GPT_OSS_YARN = Yarn(factor=32.0, beta_fast=32.0, beta_slow=1.0, original_positions=4096, truncate=False)
# Head dims each model family builds: llama3 dim / n_heads (Attention), qwen3
# head_dim 128 and gpt_oss 64 (their model args' defaults, every flavor),
# deepseek_v3's MLA qk_nope 128 + qk_rope 64 and v 128.
HEAD_DIMS = {"qwen3": (128, 128), "deepseek_v3": (192, 128), "gpt_oss": (64, 64)}


def _flavors(name: str, pipeline: bool, rows: dict[str, tuple[int, ...]], tied: tuple[str, ...] = (),
             theta: dict[str, float] | None = None) -> tuple[Flavor, ...]:
    """``tied``: the flavors whose output layer is the embedding's weight
    (qwen3's enable_weight_tying); ``theta``: flavors whose rope_theta is
    not the family's."""
    def head_dims(shape: tuple[int, ...]) -> tuple[int, int]:
        return HEAD_DIMS.get(name, (shape[0] // shape[2], shape[0] // shape[2]))

    def rotary(flavor: str) -> tuple[float, float | None]:
        return (theta or {}).get(flavor, ROPE_THETA[name]), LLAMA3_SCALING if name == "llama3" else None

    return tuple(Flavor(name, flavor, (*shape, int(flavor in tied), *head_dims(shape)), pipeline, rotary(flavor))
                 for flavor, shape in rows.items())


FLAVORS = (
    *_flavors("llama3", True, {"8B": (4096, 32, 32, 8, 14336, 128256, 0), "70B": (8192, 80, 64, 8, 28672, 128256, 0),
                               "405B": (16384, 126, 128, 8, 53248, 128256, 0)}),
    *_flavors("qwen3", False, {
        "0.6B": (1024, 28, 16, 8, 3072, 151936, 0), "1.7B": (2048, 28, 16, 8, 6144, 151936, 0),
        "4B": (2560, 36, 32, 8, 9728, 151936, 0), "8B": (4096, 36, 32, 8, 12288, 151936, 0),
        "14B": (5120, 40, 40, 8, 17408, 151936, 0), "32B": (5120, 64, 64, 8, 25600, 151936, 0),
        "30B-A3B": (2048, 48, 32, 4, 6144, 151936, 128), "235B-A22B": (4096, 94, 64, 4, 12288, 151936, 128)},
        tied=("0.6B", "1.7B", "4B"), theta={"235B-A22B": 5000000.0}),
    *_flavors("deepseek_v3", True, {"16B": (2048, 27, 16, 16, 10944, 102400, 64), "236B": (5120, 60, 128, 128, 12288, 102400, 160),
                                    "671B": (7168, 61, 128, 128, 18432, 129280, 256)}),
    # gpt_oss (gptoss_configs; GptOssModelArgs' defaults give the widths): its
    # FlexAttention with sinks and windows has no CP, as loom's rules say for
    # such models already.
    *_flavors("gpt_oss", False, {"20b": (2880, 24, 64, 8, 2880, 201088, 32), "120b": (2880, 36, 64, 8, 2880, 201088, 128)}),
)


# The token dispatchers torchtitan 0.2.2 runs, as loom names them: its
# parallelism.expert_parallel_comm_backend "standard" (all-to-all) and "deepep".
DISPATCHERS = ("alltoall", "deepep")


def shape_of(model: ModelSpec) -> tuple[int, ...]:
    """``model``'s entries of ``Flavor.shape``."""
    experts = model.moe.num_experts if model.moe is not None else 0
    return (model.hidden_size, model.num_layers, model.num_attention_heads, model.num_query_groups, model.ffn_hidden_size,
            model.vocab_size, experts, int(model.tied_embeddings), model.qk_head_dim, model.v_head_dim)


def flavor_of(model: ModelSpec) -> Flavor | None:
    """The torchtitan flavor with ``model``'s shape, or None."""
    shape = shape_of(model)
    return next((flavor for flavor in FLAVORS if flavor.shape == shape), None)


def rotary_mismatch(model: ModelSpec, seq_length: int) -> str:
    """What differs between the rotary embeddings of ``model``'s config and
    those its torchtitan flavor builds for ``seq_length`` tokens ('' when
    none, or no flavor): a run trains the flavor's."""
    flavor = flavor_of(model)
    if flavor is None or not model.rotary:
        return ""
    if flavor.name == "deepseek_v3":
        factor, unscaled_up_to = DEEPSEEK_YARN
        theirs = (*flavor.rotary, factor if seq_length > unscaled_up_to else None)
        ours = (model.rope_theta, model.rope_scaling_factor, model.mla.rope_scaling_factor if model.mla else None)
    else:
        theirs = (*flavor.rotary, GPT_OSS_YARN if flavor.name == "gpt_oss" else None)
        ours = (model.rope_theta, model.rope_scaling_factor, model.yarn)
    if ours == theirs:
        return ""

    def said(theta: float, llama3: float | None, yarn: float | Yarn | None) -> str:
        if llama3:
            scaled = f"Llama 3.1's scaling x{llama3:g}"
        elif isinstance(yarn, Yarn):
            scaled = (f"YaRN x{yarn.factor:g} (betas {yarn.beta_fast:g}/{yarn.beta_slow:g} over {yarn.original_positions:,} positions, "
                      f"{'' if yarn.truncate else 'un'}rounded)")
        else:
            scaled = f"YaRN x{yarn:g}" if yarn else "unscaled"
        return f"rope_theta {theta:.10g}, {scaled}"

    return (f"torchtitan's {flavor.name} {flavor.flavor} builds rotary embeddings with {said(*theirs)} at {seq_length:,} tokens, "
            f"{model.name}'s config {said(*ours)}: the run trains torchtitan's (its job TOML sets neither)")


def norm_mismatch(model: ModelSpec) -> str:
    """The config's RMSNorm epsilon where its torchtitan flavor builds
    another ('' when the same, or no flavor): a run trains the flavor's."""
    flavor = flavor_of(model)
    if flavor is None or model.norm_epsilon == NORM_EPS[flavor.name]:
        return ""
    return (f"torchtitan's {flavor.name} {flavor.flavor} normalises with eps {NORM_EPS[flavor.name]:g}, {model.name}'s config with "
            f"{model.norm_epsilon:g}: the run trains torchtitan's (its job TOML cannot set it)")


def trainable(model: ModelSpec) -> str:
    """Why torchtitan cannot build ``model`` ('' when it can): its shape must
    be a flavor's, and its blocks what torchtitan's models build (no squared
    ReLU, zero-centred or post-sublayer norms, ALiBi, embedding norm, and
    none of the families Megatron cannot build either)."""
    foreign = model.megatron_unbuildable or model.squared_relu or model.layernorm_1p or model.alibi or model.embedding_norm \
        or model.norms_per_layer != 2 or model.mamba is not None or model.post_norms_only or model.parallel_attention
    if flavor_of(model) is not None and not foreign:
        return ""
    if foreign:
        return f"its models' blocks; {model.name}'s differ (its family's activation, norms, positions or Mamba layers)"
    names = ", ".join(f"{flavor.name} {flavor.flavor}" for flavor in FLAVORS)
    return f"one of the torchtitan 0.2 models loom writes files for ({names}); {model.name} is none of them"
