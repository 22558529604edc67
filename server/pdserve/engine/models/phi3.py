"""Phi-3 (Phi-3 / Phi-3.5 mini and medium): Llama's layer body with the checkpoint's fused
weights, LongRoPE scaling and, where the config has one, a sliding window.

- The checkpoint holds qkv_proj and gate_up_proj already fused; they are split into Llama's
  q/k/v and gate/up names as the state dict loads (prepare() fuses them again, once).
- LongRoPE (rope type "longrope", short and long factors): transformers picks the long factors
  for a forward whose longest sequence reaches past original_max_position_embeddings, and the
  short ones otherwise, and keeps the keys already cached as they were. Here each prompt piece
  takes the long factors when its last position is past that length, and each decoding token
  when its own position is: the same choice transformers makes for a batch of one. A prompt
  longer than that length which is split into pieces (chunked prefill) or starts from cached
  blocks keeps the factors its earlier pieces were computed with, where transformers would
  compute the whole prompt on the long ones: the KV of a position depends on the prompt's
  length, which neither a piece nor the prefix cache's block keys carry.
- A partial rotary factor below 1 (Phi-4-mini) is refused: the kernel set rotates whole heads.
"""
from __future__ import annotations

import torch

from pdserve.engine.attention import AttentionMetadata
from pdserve.engine.models.llama import LlamaForCausalLM
from pdserve.engine.models.local_attention import window_layers
from pdserve.engine.models.rotary import cos_sin


def _split_fused(config):
    """A load-time hook: qkv_proj and gate_up_proj weights split into Llama's names."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q_size = config.num_attention_heads * head_dim
    kv_size = config.num_key_value_heads * head_dim

    def hook(module, state_dict, prefix, *args):
        for key in list(state_dict):
            if key.endswith("self_attn.qkv_proj.weight"):
                base = key[:-len("qkv_proj.weight")]
                q, k, v = state_dict.pop(key).split([q_size, kv_size, kv_size])
                state_dict.update({base + "q_proj.weight": q, base + "k_proj.weight": k, base + "v_proj.weight": v})
            elif key.endswith("mlp.gate_up_proj.weight"):
                base = key[:-len("gate_up_proj.weight")]
                gate, up = state_dict.pop(key).chunk(2)
                state_dict.update({base + "gate_proj.weight": gate, base + "up_proj.weight": up})
    return hook


class Phi3ForCausalLM(LlamaForCausalLM):
    decode_graphs = False   # its windowed layers and LongRoPE switch are not tried in graphs

    def __init__(self, config):
        super().__init__(config, qkv_bias=False, qk_norm=False)
        window_layers(self.model.layers, config, qkv_bias=False, qk_norm=False)
        self.register_load_state_dict_pre_hook(_split_fused(config))
        params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
        self.long_rope = None
        if (params.get("rope_type") or params.get("type")) == "longrope":
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            self.original_max = params.get("original_max_position_embeddings") or config.original_max_position_embeddings
            init = ROPE_INIT_FUNCTIONS["longrope"]
            short, scaling = init(config, torch.device("cpu"))
            long, _ = init(config, torch.device("cpu"), seq_len=self.original_max + 1)
            self.long_rope = (short.float(), long.float(), float(scaling))
        self._long_tokens = None

    @torch.no_grad()
    def prepare(self, kernels) -> None:
        super().prepare(kernels)
        if self.long_rope is not None:
            short, long, scaling = self.long_rope
            self.long_rope = (short.to(kernels.device), long.to(kernels.device), scaling)

    def long_tokens(self, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """[T] bool: the tokens that take the long factors this step."""
        reach = positions.clone()        # the last position of each token's piece (decodes: its own)
        for start, end in meta.prefill_bounds or ():
            reach[start:end] = positions[end - 1]
        return reach >= self.original_max

    def last_hidden(self, input_ids, positions, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        if self.long_rope is not None:
            self._long_tokens = self.long_tokens(positions, meta)
        return super().last_hidden(input_ids, positions, kv_cache, meta)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        if self.long_rope is None:
            return super().rope(positions, dtype)
        short, long, scaling = self.long_rope
        cos_s, sin_s = cos_sin(short, scaling, positions, dtype)
        cos_l, sin_l = cos_sin(long, scaling, positions, dtype)
        pick = self._long_tokens[:, None, None]
        return torch.where(pick, cos_l, cos_s), torch.where(pick, sin_l, sin_s)


def build_phi3(config, state_dict_keys) -> Phi3ForCausalLM:
    params = getattr(config, "rope_parameters", None) or {}
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
    if partial != 1.0:
        raise ValueError(f"phi3 with partial_rotary_factor {partial} is not supported (pdserve rotates whole heads)")
    if any(k.endswith("qkv_proj.bias") for k in state_dict_keys):
        raise ValueError("phi3 with a qkv_proj bias is not supported")
    return Phi3ForCausalLM(config)
