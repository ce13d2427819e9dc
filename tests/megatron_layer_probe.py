"""Bytes megatron-core's own SelfAttention and MLP keep for backward, on CPU.

Run as a script (a test starts it in its own process, since it initialises
torch.distributed and megatron's parallel state): prints JSON with the bytes
saved by megatron-core's attention and MLP (fused bias-SwiGLU) and by loom's
profiler's (``profiles/torch_blocks.py``) on the same shapes, counted once
per storage, weights excluded.

megatron-core's local DotProductAttention needs CUDA buffers, so the core
attention is PyTorch's SDPA here, as Transformer Engine's flash attention
would be: it keeps Q, K, V, its output and the log-sum-exp. Everything
around it (the fused QKV GEMM, the split into Q, K, V, rotary embedding, the
output projection) is megatron-core's code.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore")


class FlashAttention(torch.nn.Module):
    """Stands in for TE's DotProductAttention: [s, b, heads, d] in, [s, b, heads * d] out."""

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None, packed_seq_params=None, **_):
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)  # a view when the batch is 1


def saved_bytes(run, persistent) -> int:
    skip = {tensor.untyped_storage().data_ptr() for tensor in persistent}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = run()
    out.float().sum().backward()
    return sum(storages.values())


def main(config: dict, seq_length: int) -> dict:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29541")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from loom.planner.specs.model import model_from_hf_config
    from loom.profiles.torch_blocks import DecoderLayer, RankShape

    parallel_state.initialize_model_parallel(1, 1)
    model = model_from_hf_config(config, "probe", "probe")
    megatron_config = TransformerConfig(
        num_layers=1, hidden_size=model.hidden_size, num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups, ffn_hidden_size=model.ffn_hidden_size, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True, bf16=True, params_dtype=torch.bfloat16, apply_rope_fusion=False,
        bias_activation_fusion=True,
    )
    layer = TransformerLayer(megatron_config, get_gpt_layer_local_spec(normalization="RMSNorm").submodules).to(torch.bfloat16)
    attention = layer.self_attention
    attention.core_attention = FlashAttention()
    head_dim = model.head_dim
    inverse = 1.0 / model.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(seq_length).float(), inverse)
    rotary = torch.cat([angles, angles], dim=-1)[:, None, None, :]  # what megatron's RotaryEmbedding returns
    hidden = torch.randn(seq_length, 1, model.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    weights = list(layer.parameters())
    megatron = {
        "attention": saved_bytes(lambda: attention(hidden, attention_mask=None, rotary_pos_emb=rotary)[0], weights),
        "mlp": saved_bytes(lambda: layer.mlp(hidden)[0], weights),
    }
    ours = DecoderLayer(RankShape(model, 1, 1, seq_length, sequence_parallel=False), torch.bfloat16, torch.device("cpu"), moe=False, recompute="none")
    tokens = ours.hidden_states(seq_length)
    loom = {
        "attention": saved_bytes(lambda: ours._attention(tokens), ours.persistent),
        "mlp": saved_bytes(lambda: ours._mlp(tokens, ours.up, ours.down), ours.persistent),
    }
    return {"megatron": megatron, "loom": loom}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]), int(sys.argv[2]))))
