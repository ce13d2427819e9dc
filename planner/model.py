"""The model spec: a dense decoder-only transformer, read from a Hugging Face
style ``config.json`` (Llama 2/3, Mistral, Qwen2/2.5, GPT-2, GPT-NeoX).

Only what the memory and time models need is kept; names follow Megatron's
arguments so the emitters can write them out directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loom.planner.errors import SpecError
from loom.profiles.catalogue import model_config_path, model_names

# Families whose MLP is gated (SwiGLU) and which use RMSNorm, RoPE, no biases.
LLAMA_LIKE = {"llama", "mistral", "qwen2"}
# Families with a plain GeLU MLP, LayerNorm and biases everywhere.
GPT_LIKE = {"gpt2", "gpt_neox"}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # key/value heads (GQA); == heads for MHA
    ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    gated_mlp: bool  # SwiGLU: gate and up projections
    tied_embeddings: bool
    learned_position_embeddings: bool  # GPT-2 style; otherwise rotary
    linear_bias: bool  # biases in the linear layers (GPT) or none (Llama)
    qkv_bias: bool  # Qwen2 has biases on Q, K, V only
    normalization: str  # "LayerNorm" | "RMSNorm" (Megatron's spelling)
    dropout: float  # hidden and attention dropout during pre-training
    kv_channels: int | None = None  # head dim when not hidden / heads (Mistral-NeMo, Qwen3)
    rope_theta: float = 10000.0  # rotary base (Llama 3: 500000)
    norm_epsilon: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def q_size(self) -> int:
        """Width of Q (and of the attention output): heads x head dim."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of K (and of V): query groups x head dim."""
        return self.num_query_groups * self.head_dim

    # --- parameter counts (whole model, before any parallel split) ---------
    def attention_params(self) -> int:
        h, q, kv = self.hidden_size, self.q_size, self.kv_size
        weights = h * (q + 2 * kv) + q * h
        biases = (q + 2 * kv) * (self.linear_bias or self.qkv_bias) + h * self.linear_bias
        return weights + biases

    def mlp_params(self) -> int:
        h, f = self.hidden_size, self.ffn_hidden_size
        up = (2 if self.gated_mlp else 1) * h * f
        biases = ((2 if self.gated_mlp else 1) * f + h) * self.linear_bias
        return up + h * f + biases

    def norm_params(self) -> int:
        """Parameters of one norm (LayerNorm has a bias, RMSNorm not)."""
        return self.hidden_size * (2 if self.normalization == "LayerNorm" else 1)

    def layer_params(self) -> int:
        return self.attention_params() + self.mlp_params() + 2 * self.norm_params()

    def embedding_params(self) -> int:
        positions = self.max_position_embeddings * self.hidden_size if self.learned_position_embeddings else 0
        return self.vocab_size * self.hidden_size + positions

    def head_params(self) -> int:
        """Final norm plus the output projection (shared when embeddings are tied)."""
        output = 0 if self.tied_embeddings else self.vocab_size * self.hidden_size
        return self.norm_params() + output

    def total_params(self) -> int:
        return self.num_layers * self.layer_params() + self.embedding_params() + self.head_params()


def _pick(config: dict, source: str, *keys: str, default=None, required: bool = True):
    """The first of ``keys`` present in an HF config (families name fields differently)."""
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    if default is not None or not required:
        return default
    raise SpecError(source, keys[0], "a value in the model config")


def _positive_int(config: dict, source: str, *keys: str, default=None) -> int:
    value = _pick(config, source, *keys, default=default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SpecError(source, keys[0], "a positive integer", value)
    return value


def model_from_hf_config(config: dict, name: str, source: str) -> ModelSpec:
    """Build a spec from the fields of a Hugging Face ``config.json``."""
    family = config.get("model_type")
    if family not in LLAMA_LIKE | GPT_LIKE:
        raise SpecError(source, "model_type", f"one of {sorted(LLAMA_LIKE | GPT_LIKE)}", family)
    hidden = _positive_int(config, source, "hidden_size", "n_embd")
    heads = _positive_int(config, source, "num_attention_heads", "n_head")
    kv_heads = _positive_int(config, source, "num_key_value_heads", default=heads)
    head_dim = _pick(config, source, "head_dim", required=False)
    if head_dim is None and hidden % heads:
        raise SpecError(source, "num_attention_heads", f"a divisor of hidden size {hidden} (or an explicit head_dim)", heads)
    if head_dim is not None and (isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0):
        raise SpecError(source, "head_dim", "a positive integer", head_dim)
    if heads % kv_heads:
        raise SpecError(source, "num_key_value_heads", f"a divisor of {heads} attention heads", kv_heads)
    llama_like = family in LLAMA_LIKE
    return ModelSpec(
        name=name,
        num_layers=_positive_int(config, source, "num_hidden_layers", "n_layer"),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        ffn_hidden_size=_positive_int(config, source, "intermediate_size", "n_inner", default=4 * hidden),
        vocab_size=_positive_int(config, source, "vocab_size"),
        max_position_embeddings=_positive_int(config, source, "max_position_embeddings", "n_positions"),
        gated_mlp=llama_like,
        tied_embeddings=bool(config.get("tie_word_embeddings", family == "gpt2")),
        learned_position_embeddings=family == "gpt2",
        linear_bias=not llama_like,
        qkv_bias=family == "qwen2",
        normalization="RMSNorm" if llama_like else "LayerNorm",
        # GPT-2/3 and NeoX pre-trained with 0.1 dropout; Llama-era models with none.
        dropout=float(config.get("resid_pdrop", config.get("hidden_dropout", 0.1 if family == "gpt2" else 0.0))),
        kv_channels=head_dim if head_dim != hidden // heads else None,
        rope_theta=float(_pick(config, source, "rope_theta", "rotary_emb_base", default=10000.0)),
        norm_epsilon=float(_pick(config, source, "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", default=1e-5)),
    )


def load_model(name_or_path: str, source: str = "--model") -> ModelSpec:
    """A catalogue name (``llama-3-70b``) or a path to a ``config.json``;
    ``source`` is where the name was given (a job file or the flag)."""
    path = model_config_path(name_or_path)
    if path is None:
        path = Path(name_or_path)
        if not path.is_file():
            raise SpecError(source, "model", f"a catalogue name ({', '.join(model_names())}) or a config.json path", name_or_path)
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SpecError(str(path), f"line {err.lineno}", "valid JSON") from err
    if not isinstance(config, dict):
        raise SpecError(str(path), "<top level>", "a JSON object")
    name = path.stem if path.parent.name == "models" else path.parent.name if path.name == "config.json" else path.stem
    return model_from_hf_config(config, name=name, source=str(path))
