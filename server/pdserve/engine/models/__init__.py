"""Causal LMs written in plain torch over the paged KV cache, one module per family, and the one
table that says which builds a checkpoint's model_type.

    llama.py   Llama, Mistral, Qwen2, Qwen3
    moe.py     Qwen2-MoE, Qwen3-MoE, Mixtral
    gemma.py   Gemma 2, Gemma 3 (text)
    phi3.py    Phi-3 (fused checkpoint weights, LongRoPE)
    deepseek.py  DeepSeek-V2, DeepSeek-V3 (multi-head latent attention, mla.py; DeepSeek's MoE)

A builder takes the transformers config and the checkpoint's parameter names and returns a
model whose parameter names match them (ModelRunner loads the state dict into it, then calls
prepare(kernels)). A model whose KV pool is not per-head K and V (MLA's latent) says its block
shape with kv_block_shape(block_size).
"""
from __future__ import annotations

from pdserve.engine.models import deepseek, gemma, llama, moe, phi3

BUILDERS = {
    **{model_type: llama.build_model for model_type in llama.SUPPORTED_MODEL_TYPES},
    "qwen2_moe": moe.build_qwen_moe,
    "qwen3_moe": moe.build_qwen_moe,
    "mixtral": moe.build_mixtral,
    "gemma2": gemma.build_gemma,
    "gemma3_text": gemma.build_gemma,
    "phi3": phi3.build_phi3,
    "deepseek_v2": deepseek.build_deepseek,
    "deepseek_v3": deepseek.build_deepseek,
}
SUPPORTED_MODEL_TYPES = tuple(BUILDERS)


def build_model(config, state_dict_keys):
    model_type = getattr(config, "model_type", "")
    builder = BUILDERS.get(model_type)
    if builder is None:
        raise ValueError(f"model_type '{model_type}' is not supported; pdserve runs {', '.join(SUPPORTED_MODEL_TYPES)}")
    return builder(config, state_dict_keys)
