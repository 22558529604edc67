"""The Llama family (Llama, Mistral, Qwen2, Qwen3) in plain torch over a paged KV cache.

Weights and hyper-parameters come from a transformers checkpoint (config.json and
*.safetensors, transformers' parameter names). Every operation of the layer body (linears,
RMSNorm, residual add + RMSNorm, rotary embedding, SiLU-and-mul, paged attention) goes through
the device's kernel set (engine/kernels/), so each device runs its fast path behind one interface.
"""
from __future__ import annotations

import torch
from torch import nn

from pdserve.engine.attention import AttentionMetadata, paged_attention

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def rope_inv_freq(config) -> tuple[torch.Tensor, float]:
    """Rotary inverse frequencies and scaling, from transformers 4 or 5 style configs."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        return inv_freq.float(), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(attention_scaling)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps


class Attention(nn.Module):
    def __init__(self, config, layer_idx: int, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None

    def fuse(self, kernels) -> None:
        """One QKV linear instead of three (weights concatenated once, at load)."""
        p = (self.q_proj, self.k_proj, self.v_proj)
        bias = torch.cat([m.bias for m in p]) if p[0].bias is not None else None
        self.qkv = kernels.linear(torch.cat([m.weight for m in p]).detach(), None if bias is None else bias.detach())
        self.out = kernels.linear(self.o_proj.weight.detach())
        del self.q_proj, self.k_proj, self.v_proj, self.o_proj

    def forward(self, kernels, x, cos, sin, kv_cache, meta: AttentionMetadata):
        tokens = x.shape[0]
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv(x)
        if self.q_norm is not None:
            q = kernels.rms_norm(qkv[:, :h * d].view(tokens, h, d), self.q_norm.weight, self.q_norm.eps)
            k = kernels.rms_norm(qkv[:, h * d:(h + kvh) * d].view(tokens, kvh, d), self.k_norm.weight, self.k_norm.eps)
            q, k = kernels.rope(q, cos, sin), kernels.rope(k, cos, sin)
        else:
            # q and k side by side in the QKV output: one rotary pass for both
            qk = kernels.rope(qkv[:, :(h + kvh) * d].view(tokens, h + kvh, d), cos, sin)
            q, k = qk[:, :h], qk[:, h:]
        v = qkv[:, (h + kvh) * d:].view(tokens, kvh, d)
        out = self.attend(kernels, q, k, v, kv_cache, meta)
        return self.out(out.reshape(tokens, h * d))

    def attend(self, kernels, q, k, v, kv_cache, meta: AttentionMetadata):
        """This layer's attention over the pool (families with windows or soft-capping override it)."""
        return paged_attention(kernels, q, k, v, kv_cache, self.layer_idx, meta)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def fuse(self, kernels) -> None:
        """One gate_up linear instead of two (weights concatenated once, at load), with the
        activation after it."""
        self.gate_up = self.activated(kernels, torch.cat([self.gate_proj.weight, self.up_proj.weight]).detach())
        self.down = kernels.linear(self.down_proj.weight.detach())
        del self.gate_proj, self.up_proj, self.down_proj

    def activated(self, kernels, gate_up: torch.Tensor):
        """x -> silu(gate) * up, fused where the kernel set can."""
        return kernels.silu_gate_up(gate_up)

    def forward(self, kernels, x):
        return self.down(self.gate_up(x))


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.self_attn = Attention(config, layer_idx, qkv_bias, qk_norm)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, kernels, h, residual, cos, sin, kv_cache, meta):
        """h: the previous layer's output, not yet added to the residual stream (None at layer 0,
        where h is the embedding). Returns (this layer's MLP output, the residual stream)."""
        ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
        if residual is None:
            residual, x = h, kernels.rms_norm(h, ln1.weight, ln1.eps)
        else:
            x, residual = kernels.add_rms_norm(h, residual, ln1.weight, ln1.eps)
        h = self.self_attn(kernels, x, cos, sin, kv_cache, meta)
        x, residual = kernels.add_rms_norm(h, residual, ln2.weight, ln2.eps)
        return self.mlp(kernels, x), residual


class Backbone(nn.Module):
    def __init__(self, config, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, qkv_bias, qk_norm) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Parameter names follow transformers so a checkpoint's state dict loads as is; prepare()
    then fuses the layer body's linears for the device's kernel set."""

    # the decode forward is device work only (no host reads, no shapes from values): a GPU engine
    # may capture it in CUDA graphs (engine/decode_graphs.py); families that differ say False
    decode_graphs = True

    def __init__(self, config, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.config = config
        self.model = Backbone(config, qkv_bias, qk_norm)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # RoPE's frequencies: float32, as transformers keeps them, and no buffer, so the model's
        # cast to its dtype leaves them (bf16 frequencies turn the angles by up to a radian at a
        # thousand positions); prepare() moves them to the device
        self.inv_freq, self.rope_scaling = rope_inv_freq(config)
        self.kernels = None
        self.vocab_size = config.vocab_size

    @torch.no_grad()
    def prepare(self, kernels) -> None:
        """After the weights are on the device in their dtype: concatenated QKV and gate_up
        linears, every linear's weight prepared (prepacked) by the kernel set."""
        self.kernels = kernels
        for layer in self.model.layers:
            layer.self_attn.fuse(kernels)
            layer.mlp.fuse(kernels)
        self.head = kernels.linear(self.lm_head.weight.detach())
        del self.lm_head
        self.inv_freq = self.inv_freq.to(kernels.device)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scaling).to(dtype)[:, None, :]
        sin = (emb.sin() * self.rope_scaling).to(dtype)[:, None, :]
        return cos, sin

    def forward(self, input_ids, positions, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        """Returns the logits of the last token of every sequence, [num_seqs, vocab]."""
        return self.logits(self.last_hidden(input_ids, positions, kv_cache, meta))

    def last_hidden(self, input_ids, positions, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        """The final-normed hidden state of each row in meta.last_token_indices, [rows, hidden]:
        what the LM head reads. A caller running several forwards in one step (the prefill's
        groups) takes these and runs the head once, over all of them."""
        kernels = self.kernels
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(positions, h.dtype)
        residual = None
        for i, layer in enumerate(self.model.layers):
            h, residual = layer(kernels, h, residual, cos, sin, kv_cache, meta)
            meta.layer_done(i)
        last = meta.last_token_indices
        norm = self.model.norm
        h, _ = kernels.add_rms_norm(h[last], residual[last], norm.weight, norm.eps)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[0] == 0:      # a step of prompt pieces none of which ends its prompt
            return hidden.new_empty((0, self.vocab_size))
        return self.head(hidden)


def build_model(config, state_dict_keys) -> LlamaForCausalLM:
    model_type = getattr(config, "model_type", "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type '{model_type}' is not supported; pdserve runs {', '.join(SUPPORTED_MODEL_TYPES)}")
    qkv_bias = any(k.endswith("self_attn.q_proj.bias") for k in state_dict_keys)
    qk_norm = any(k.endswith("self_attn.q_norm.weight") for k in state_dict_keys)
    return LlamaForCausalLM(config, qkv_bias, qk_norm)
