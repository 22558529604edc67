"""Rotary tables beyond llama.py's one per model: one per layer type (Gemma 3's local and global
bases) and the cos / sin of any table. The tables are float32 attributes, not buffers, so the
model's cast to its dtype never rounds them."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from pdserve.engine.models.llama import rope_inv_freq


def per_layer_type(config) -> bool:
    """Whether config.rope_parameters holds one set of parameters per layer type (Gemma 3)."""
    params = getattr(config, "rope_parameters", None) or {}
    layer_types = set(getattr(config, "layer_types", None) or ())
    return bool(layer_types) and layer_types <= set(params)


def rope_tables(config) -> dict[str | None, tuple[torch.Tensor, float]]:
    """{layer type: (inv_freq, attention scaling)}; the key is None where one table serves all layers."""
    if not per_layer_type(config):
        return {None: rope_inv_freq(config)}
    tables = {}
    for layer_type in sorted(set(config.layer_types)):
        params = config.rope_parameters[layer_type]
        if params.get("rope_type", "default") == "default":
            shim = SimpleNamespace(rope_parameters=params, head_dim=config.head_dim, hidden_size=config.hidden_size,
                                   num_attention_heads=config.num_attention_heads)
            tables[layer_type] = rope_inv_freq(shim)
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, torch.device("cpu"), layer_type=layer_type)
            tables[layer_type] = (inv_freq.float(), float(scaling))
    return tables


def cos_sin(inv_freq: torch.Tensor, scaling: float, positions: torch.Tensor, dtype: torch.dtype):
    """[T, 1, D] cos and sin (rotate-half layout) for the positions, in dtype."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype)[:, None, :], (emb.sin() * scaling).to(dtype)[:, None, :]
