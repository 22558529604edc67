"""DeepSeek-V2 and DeepSeek-V3 (model_type deepseek_v2, deepseek_v3), as transformers defines them.

- Attention is multi-head latent attention (mla.py): queries through a low-rank pair
  (q_a_proj, its norm, q_b_proj) or one q_proj where q_lora_rank is None (V2-Lite); the KV
  latent and the shared rotary key from kv_a_proj_with_mqa. The KV pool holds the latent rows
  (kv_block_shape), not per-head keys and values. The softmax scale is qk_head_dim ** -0.5
  times YaRN's mscale squared where the rope has mscale_all_dim (transformers' yarn_apply_mscale).
- Rotary covers the qk_rope_head_dim part only. DeepSeek rotates interleaved pairs (V2 always,
  V3 with rope_interleave); the rotary rows of the query and latent projections are permuted
  into rotate-half order at load, so the kernel set's rope gives the same q.k (queries and keys
  permuted alike) at no cost per step.
- MoE layers run moe.py's grouped experts with DeepSeek's router: float32 (transformers keeps
  it so), softmax scores (V2) or sigmoid scores whose choice adds e_score_correction_bias (V3),
  top-k within the best topk_group of n_group groups (V2's group_limited_greedy ranks a group by
  its best expert, V3 by its best two), renormalised where norm_topk_prob (V3), times
  routed_scaling_factor; the shared experts are added to every token. The first
  first_k_dense_replace layers have a dense MLP.
- V3 checkpoints carry multi-token-prediction layers past num_hidden_layers; they are dropped
  at load, as transformers does.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_rope_utils import yarn_apply_mscale

from pdserve.engine.attention import AttentionMetadata
from pdserve.engine.models.llama import MLP, DecoderLayer, LlamaForCausalLM, RMSNorm, rope_inv_freq
from pdserve.engine.models.mla import decode_mla, prefill_mla, store_latent
from pdserve.engine.models.moe import SparseMoeBlock, dense_mlp

# transformers builds q_a_layernorm and kv_a_layernorm with its default eps, not rms_norm_eps
LATENT_NORM_EPS = 1e-6


def deinterleave(n: int) -> torch.Tensor:
    """The row order taking interleaved rotary pairs (x0, x1), (x2, x3), ... to rotate-half order."""
    return torch.cat((torch.arange(0, n, 2), torch.arange(1, n, 2)))


class MlaAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = heads = config.num_attention_heads
        self.nope, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.rank = config.kv_lora_rank
        self.q_lora_rank = config.q_lora_rank
        qk = self.nope + self.rope_dim
        hidden, bias = config.hidden_size, config.attention_bias
        if self.q_lora_rank:
            self.q_a_proj = nn.Linear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, heads * qk, bias=False)
        else:
            self.q_proj = nn.Linear(hidden, heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.rank, heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(heads * self.v_dim, hidden, bias=bias)
        self.scale = yarn_apply_mscale(dict(getattr(config, "rope_parameters", None) or {}), qk ** -0.5)
        self.interleaved = config.model_type == "deepseek_v2" or bool(getattr(config, "rope_interleave", False))

    def _rotate_half_order(self) -> None:
        order = deinterleave(self.rope_dim)
        q = (self.q_b_proj if self.q_lora_rank else self.q_proj).weight
        per_head = q.view(self.num_heads, self.nope + self.rope_dim, -1)
        per_head[:, self.nope:] = per_head[:, self.nope:][:, order]
        kv = self.kv_a_proj_with_mqa
        kv.weight[self.rank:] = kv.weight[self.rank:][order]
        if kv.bias is not None:
            kv.bias[self.rank:] = kv.bias[self.rank:][order]

    def fuse(self, kernels) -> None:
        """The two projections of x (query or its low-rank half, and the latent) as one linear;
        kv_b_proj kept whole for prefill and split per head (W_UK, W_UV) for absorbed decode."""
        if self.interleaved:
            self._rotate_half_order()
        first = self.q_a_proj if self.q_lora_rank else self.q_proj
        parts = (first, self.kv_a_proj_with_mqa)
        bias = None
        if any(m.bias is not None for m in parts):
            bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in parts])
        self.project = kernels.linear(torch.cat([m.weight for m in parts]).detach(), bias)
        if self.q_lora_rank:
            self.q_up = kernels.linear(self.q_b_proj.weight.detach())
            del self.q_a_proj, self.q_b_proj
        else:
            del self.q_proj
        per_head = self.kv_b_proj.weight.detach().view(self.num_heads, self.nope + self.v_dim, self.rank)
        self.w_uk = per_head[:, :self.nope].contiguous()                     # [H, nope, rank]
        self.w_uv_t = per_head[:, self.nope:].transpose(1, 2).contiguous()   # [H, rank, v]
        self.kv_up = kernels.linear(self.kv_b_proj.weight.detach())
        self.out = kernels.linear(self.o_proj.weight.detach(),
                                  None if self.o_proj.bias is None else self.o_proj.bias.detach())
        del self.kv_a_proj_with_mqa, self.kv_b_proj, self.o_proj

    def forward(self, kernels, x, cos, sin, kv_cache, meta: AttentionMetadata):
        tokens = x.shape[0]
        heads, nope, rank = self.num_heads, self.nope, self.rank
        projected = self.project(x)
        if self.q_lora_rank:
            norm = self.q_a_layernorm
            q = self.q_up(kernels.rms_norm(projected[:, :self.q_lora_rank], norm.weight, norm.eps))
            split = self.q_lora_rank
        else:
            split = heads * (nope + self.rope_dim)
            q = projected[:, :split]
        q = q.view(tokens, heads, nope + self.rope_dim)
        latent = projected[:, split:]
        norm = self.kv_a_layernorm
        c_kv = kernels.rms_norm(latent[:, :rank], norm.weight, norm.eps)
        k_pe = kernels.rope(latent[:, None, rank:], cos, sin)
        q_pe = kernels.rope(q[..., nope:], cos, sin)
        rows = torch.cat((c_kv, k_pe[:, 0]), dim=-1)
        store_latent(kv_cache, self.layer_idx, rows, meta)
        p = meta.num_prefill_tokens
        parts = []
        if p:
            query = torch.cat((q[:p, :, :nope], q_pe[:p]), dim=-1)
            parts.append(prefill_mla(query, rows[:p], kv_cache, self.layer_idx, meta, self.kv_up, rank, self.v_dim,
                                     self.scale))
        if meta.block_tables is not None:
            parts.append(decode_mla(q[p:, :, :nope], q_pe[p:], kv_cache, self.layer_idx, meta, self.w_uk,
                                    self.w_uv_t, self.scale))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self.out(out.reshape(tokens, heads * self.v_dim))


class DeepseekMoeBlock(SparseMoeBlock):
    """moe.py's grouped experts with DeepSeek's router and its always-on shared experts."""

    def __init__(self, config):
        v3 = config.model_type != "deepseek_v2"
        super().__init__(config.hidden_size, config.moe_intermediate_size, config.n_routed_experts,
                         config.num_experts_per_tok, renormalize=v3 and bool(config.norm_topk_prob))
        self.sigmoid = v3
        self.scaling = config.routed_scaling_factor
        grouped = v3 or getattr(config, "topk_method", "greedy") == "group_limited_greedy"
        self.groups = (config.n_group or 1) if grouped else 1
        self.topk_group = config.topk_group or self.groups
        shared = config.moe_intermediate_size * (config.n_shared_experts or 0)
        self.shared_experts = dense_mlp(config.hidden_size, shared) if shared else None
        if v3:
            self.gate.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts))
        self.router_weight = self.choice_bias = None
        self.register_load_state_dict_pre_hook(self._keep_router_float32)

    def _keep_router_float32(self, module, state_dict, prefix, *args) -> None:
        """The router and the choice bias as the checkpoint has them (transformers keeps both in
        float32): the model's cast to its dtype would round them."""
        weight, bias = state_dict.get(prefix + "gate.weight"), state_dict.get(prefix + "gate.e_score_correction_bias")
        self.router_weight = None if weight is None else weight.float().clone()
        self.choice_bias = None if bias is None else bias.float().clone()

    def fuse(self, kernels) -> None:
        if self.router_weight is None:
            self.router_weight = self.gate.weight.detach().float()
        if self.choice_bias is None and self.sigmoid:
            self.choice_bias = self.gate.e_score_correction_bias.float()
        self.router_weight = self.router_weight.to(kernels.device)
        if self.choice_bias is not None:
            self.choice_bias = self.choice_bias.to(kernels.device)
        super().fuse(kernels)
        del self.router       # the route runs on the float32 weight
        if self.shared_experts is not None:
            self.shared_experts.fuse(kernels)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(x.float(), self.router_weight)
        scores = scores.sigmoid() if self.sigmoid else scores.softmax(dim=-1)
        choice = scores + self.choice_bias if self.choice_bias is not None else scores
        if self.groups > 1:
            grouped = choice.view(-1, self.groups, self.num_experts // self.groups)
            rank = grouped.topk(2, dim=-1)[0].sum(dim=-1) if self.sigmoid else grouped.amax(dim=-1)
            kept = torch.zeros_like(rank, dtype=torch.bool).scatter_(1, rank.topk(self.topk_group, dim=-1)[1], True)
            dropped = ~kept.repeat_interleave(self.num_experts // self.groups, dim=1)
            choice = choice.masked_fill(dropped, float("-inf") if self.sigmoid else 0.0)
        ids = choice.topk(self.top_k, dim=-1)[1]
        weights = scores.gather(1, ids)
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return (weights * self.scaling).to(x.dtype), ids

    def forward(self, kernels, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(kernels, x)
        if self.shared_experts is not None:
            out += self.shared_experts(kernels, x)
        return out


class DeepseekDecoderLayer(nn.Module):
    forward = DecoderLayer.forward   # Llama's layer body: norms, attention, MLP, fused residual adds

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.self_attn = MlaAttention(config, layer_idx)
        sparse = layer_idx >= (config.first_k_dense_replace or 0)
        self.mlp = DeepseekMoeBlock(config) if sparse else MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DeepseekBackbone(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DeepseekDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DeepseekForCausalLM(nn.Module):
    """Llama's model (embedding, rotary, layer loop, head) around DeepSeek's layers."""
    rope = LlamaForCausalLM.rope
    prepare = LlamaForCausalLM.prepare
    forward = LlamaForCausalLM.forward
    last_hidden = LlamaForCausalLM.last_hidden
    logits = LlamaForCausalLM.logits

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = DeepseekBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # over qk_rope_head_dim (config.head_dim); float32, not a buffer (llama.py)
        self.inv_freq, self.rope_scaling = rope_inv_freq(config)
        self.kernels = None
        self.vocab_size = config.vocab_size
        self.register_load_state_dict_pre_hook(_drop_layers_past(config.num_hidden_layers))

    def kv_block_shape(self, block_size: int) -> tuple[int, ...]:
        """One KV block of the pool, all layers: the latent rows (ModelRunner allocates it)."""
        c = self.config
        return (c.num_hidden_layers, block_size, c.kv_lora_rank + c.qk_rope_head_dim)


def _drop_layers_past(num_layers: int):
    """A load-time hook: the checkpoint's multi-token-prediction layers (indices past the model's) go."""
    index = re.compile(r"^model\.layers\.(\d+)\.")

    def hook(module, state_dict, prefix, *args):
        for key in list(state_dict):
            found = index.match(key)
            if found and int(found.group(1)) >= num_layers:
                del state_dict[key]
    return hook


def build_deepseek(config, state_dict_keys) -> DeepseekForCausalLM:
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"{config.model_type} with hidden_act '{config.hidden_act}' is not supported (silu only)")
    if getattr(config, "mlp_bias", False):
        raise ValueError(f"{config.model_type} with mlp_bias is not supported")
    return DeepseekForCausalLM(config)
