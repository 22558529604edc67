"""Gemma 2 and Gemma 3 (text) over the paged KV cache.

What sets them apart from Llama, and where each is done:
- RMSNorm scales by (1 + weight): the 1 is added to every norm's weight once at load, so the
  kernel set's rms_norm and add_rms_norm run unchanged (in bfloat16 the sum is rounded to it).
- Four norms per layer: the attention and MLP outputs are normed before they join the residual.
- The embedding is scaled by sqrt(hidden_size) (in the weights' dtype, as transformers does).
- Attention scale query_pre_attn_scalar ** -0.5, sliding-window layers (layer_types), and
  logit soft-capping of attention scores (Gemma 2) and of the final logits: layers with a
  window or a cap run local_attention.py's torch path, the others the device kernels.
- Gemma 3: q/k norms, and separate rotary bases (and scaling) for local and global layers.
- The MLP is gelu(tanh) gated, computed in torch (the kernel set has the SiLU form only).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine.attention import AttentionMetadata
from pdserve.engine.models.llama import MLP, LlamaForCausalLM, RMSNorm
from pdserve.engine.models.local_attention import AttentionShape, ShapedAttention, sliding_windows
from pdserve.engine.models.rotary import cos_sin, per_layer_type, rope_tables


class GeluMLP(MLP):
    def activated(self, kernels, gate_up: torch.Tensor):
        return kernels.linear(gate_up)   # the GELU runs in forward

    def forward(self, kernels, x):
        gate_up = self.gate_up(x)
        half = gate_up.shape[-1] // 2
        return self.down(F.gelu(gate_up[:, :half], approximate="tanh") * gate_up[:, half:])


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, shape: AttentionShape, qk_norm: bool):
        super().__init__()
        self.self_attn = ShapedAttention(config, layer_idx, config.attention_bias, qk_norm, shape)
        self.mlp = GeluMLP(config)
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps)

    def norms(self) -> list[RMSNorm]:
        attn = self.self_attn
        return [self.input_layernorm, self.post_attention_layernorm, self.pre_feedforward_layernorm,
                self.post_feedforward_layernorm] + [n for n in (attn.q_norm, attn.k_norm) if n is not None]

    def forward(self, kernels, h, residual, cos, sin, kv_cache, meta):
        """As llama.DecoderLayer: h is the previous layer's (normed) output, not yet in the residual."""
        ln = self.input_layernorm
        if residual is None:
            residual, x = h, kernels.rms_norm(h, ln.weight, ln.eps)
        else:
            x, residual = kernels.add_rms_norm(h, residual, ln.weight, ln.eps)
        ln = self.post_attention_layernorm
        h = kernels.rms_norm(self.self_attn(kernels, x, cos, sin, kv_cache, meta), ln.weight, ln.eps)
        ln = self.pre_feedforward_layernorm
        x, residual = kernels.add_rms_norm(h, residual, ln.weight, ln.eps)
        ln = self.post_feedforward_layernorm
        return kernels.rms_norm(self.mlp(kernels, x), ln.weight, ln.eps), residual


class GemmaBackbone(nn.Module):
    def __init__(self, config, qk_norm: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        scale = config.query_pre_attn_scalar ** -0.5
        softcap = getattr(config, "attn_logit_softcapping", None)
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(config, i, AttentionShape(scale=scale, window=window, softcap=softcap), qk_norm)
            for i, window in enumerate(sliding_windows(config)))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class GemmaForCausalLM(nn.Module):
    def __init__(self, config, qk_norm: bool):
        super().__init__()
        self.config = config
        self.model = GemmaBackbone(config, qk_norm)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope_tables = rope_tables(config)
        self.layer_rope = (list(config.layer_types[:config.num_hidden_layers]) if per_layer_type(config)
                           else [None] * config.num_hidden_layers)
        self.final_softcap = getattr(config, "final_logit_softcapping", None)
        self.kernels = None
        self.vocab_size = config.vocab_size

    @torch.no_grad()
    def prepare(self, kernels) -> None:
        self.kernels = kernels
        for norm in [n for layer in self.model.layers for n in layer.norms()] + [self.model.norm]:
            norm.weight += 1.0
        for layer in self.model.layers:
            layer.self_attn.fuse(kernels)
            layer.mlp.fuse(kernels)
        self.head = kernels.linear(self.lm_head.weight.detach())
        del self.lm_head
        self.rope_tables = {k: (f.to(kernels.device), s) for k, (f, s) in self.rope_tables.items()}
        weight = self.model.embed_tokens.weight
        self.embed_scale = torch.tensor(self.config.hidden_size ** 0.5, dtype=weight.dtype, device=weight.device)

    def forward(self, input_ids, positions, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        """Returns the logits of the last token of every sequence, [num_seqs, vocab]."""
        return self.logits(self.last_hidden(input_ids, positions, kv_cache, meta))

    def last_hidden(self, input_ids, positions, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        """The final-normed hidden state of each row in meta.last_token_indices (llama.py)."""
        kernels = self.kernels
        h = self.model.embed_tokens(input_ids) * self.embed_scale
        rope = {k: cos_sin(f, s, positions, h.dtype) for k, (f, s) in self.rope_tables.items()}
        residual = None
        for i, layer in enumerate(self.model.layers):
            h, residual = layer(kernels, h, residual, *rope[self.layer_rope[i]], kv_cache, meta)
            meta.layer_done(i)
        last = meta.last_token_indices
        norm = self.model.norm
        h, _ = kernels.add_rms_norm(h[last], residual[last], norm.weight, norm.eps)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = LlamaForCausalLM.logits(self, hidden)
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits


def build_gemma(config, state_dict_keys) -> GemmaForCausalLM:
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(f"{config.model_type} with use_bidirectional_attention (an encoder) is not a causal LM pdserve serves")
    if any(k.endswith("self_attn.o_proj.bias") for k in state_dict_keys):
        raise ValueError(f"{config.model_type} with attention_bias on o_proj is not supported")
    qk_norm = any(k.endswith("self_attn.q_norm.weight") for k in state_dict_keys)
    return GemmaForCausalLM(config, qk_norm)
