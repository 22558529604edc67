"""Mixture-of-experts families: Qwen2-MoE (with its shared expert), Qwen3-MoE and Mixtral.

Llama's layer body (models/llama.py) with the MLP of the sparse layers replaced by a routed
block: a router linear, softmax, the top-k experts per token (renormalised where the model
does it: norm_topk_prob for Qwen, always for Mixtral), and the experts computed grouped by
expert: the (token, expert) pairs are sorted by expert and each active expert runs its rows as
one matmul through the kernel set; there is no loop over tokens. Qwen2-MoE adds a shared expert
gated by sigmoid(shared_expert_gate(x)).

Checkpoints keep one set of weights per expert (transformers writes them so); they are stacked
into [experts, 2 * intermediate, hidden] and [experts, hidden, intermediate] at load, and each
expert's slice is prepared by the kernel set. Mixtral's names (block_sparse_moe, w1/w3/w2) are
mapped onto the Qwen names as the state dict loads.
"""
from __future__ import annotations

import re
from types import SimpleNamespace

import torch
from torch import nn

from pdserve.engine.models.llama import MLP, LlamaForCausalLM
from pdserve.engine.models.local_attention import window_layers

# checkpoint name -> module name (Mixtral's MoE onto the Qwen layout)
MIXTRAL_NAMES = ((re.compile(r"\.block_sparse_moe\."), ".mlp."),
                 (re.compile(r"\.experts\.(\d+)\.w1\."), r".experts.\1.gate_proj."),
                 (re.compile(r"\.experts\.(\d+)\.w3\."), r".experts.\1.up_proj."),
                 (re.compile(r"\.experts\.(\d+)\.w2\."), r".experts.\1.down_proj."))


def dense_mlp(hidden: int, intermediate: int) -> MLP:
    return MLP(SimpleNamespace(hidden_size=hidden, intermediate_size=intermediate))


class SparseMoeBlock(nn.Module):
    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, renormalize: bool,
                 shared_intermediate: int = 0):
        super().__init__()
        self.top_k, self.renormalize, self.num_experts = top_k, renormalize, num_experts
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(dense_mlp(hidden, intermediate) for _ in range(num_experts))
        self.shared_expert = dense_mlp(hidden, shared_intermediate) if shared_intermediate else None
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False) if shared_intermediate else None

    def fuse(self, kernels) -> None:
        """Expert weights stacked once, each expert's slice prepared by the kernel set."""
        gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in self.experts]).detach()
        down = torch.stack([e.down_proj.weight for e in self.experts]).detach()
        self.expert_gate_up = [kernels.linear(w) for w in gate_up]
        self.expert_down = [kernels.linear(w) for w in down]
        self.router = kernels.linear(self.gate.weight.detach())
        del self.experts, self.gate
        if self.shared_expert is not None:
            self.shared_expert.fuse(kernels)
            self.shared_gate = kernels.linear(self.shared_expert_gate.weight.detach())
            del self.shared_expert_gate

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] in x's dtype, expert ids [T, k]), as transformers' top-k routers give them."""
        probs = torch.softmax(self.router(x), dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), ids

    def forward(self, kernels, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)                 # (token, slot) pairs grouped by expert
        rows = order // self.top_k                               # the token of each pair
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        out = torch.zeros_like(x)
        start = 0
        for expert, n in enumerate(counts):
            if n == 0:
                continue
            pairs = order[start:start + n]
            tokens = rows[start:start + n]
            y = self.expert_down[expert](kernels.silu_and_mul(self.expert_gate_up[expert](x[tokens])))
            out.index_add_(0, tokens, y * weights.reshape(-1)[pairs, None])
            start += n
        if self.shared_expert is not None:
            out += torch.sigmoid(self.shared_gate(x)) * self.shared_expert(kernels, x)
        return out


class MoeForCausalLM(LlamaForCausalLM):
    """Llama's model with a SparseMoeBlock as the MLP of every sparse layer."""

    decode_graphs = False   # the experts' routing reads token counts on the host

    def __init__(self, config, qkv_bias: bool, qk_norm: bool, shared_expert: bool, renormalize: bool):
        super().__init__(config, qkv_bias, qk_norm)
        num_experts = getattr(config, "num_experts", None) or config.num_local_experts
        intermediate = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        shared = config.shared_expert_intermediate_size if shared_expert else 0
        sparse_step = getattr(config, "decoder_sparse_step", 1) or 1
        dense_layers = set(getattr(config, "mlp_only_layers", None) or ())
        for i, layer in enumerate(self.model.layers):
            if i not in dense_layers and (i + 1) % sparse_step == 0:
                layer.mlp = SparseMoeBlock(config.hidden_size, intermediate, num_experts,
                                           config.num_experts_per_tok, renormalize, shared)
        window_layers(self.model.layers, config, qkv_bias, qk_norm)


def _rename(names):
    def hook(module, state_dict, prefix, *args):
        for key in list(state_dict):
            new = key
            for pattern, repl in names:
                new = pattern.sub(repl, new)
            if new != key:
                state_dict[new] = state_dict.pop(key)
    return hook


def build_qwen_moe(config, state_dict_keys) -> MoeForCausalLM:
    qkv_bias = any(k.endswith("self_attn.q_proj.bias") for k in state_dict_keys)
    qk_norm = any(k.endswith("self_attn.q_norm.weight") for k in state_dict_keys)
    shared = any(k.endswith("mlp.shared_expert_gate.weight") for k in state_dict_keys)
    return MoeForCausalLM(config, qkv_bias, qk_norm, shared_expert=shared, renormalize=bool(config.norm_topk_prob))


def build_mixtral(config, state_dict_keys) -> MoeForCausalLM:
    model = MoeForCausalLM(config, qkv_bias=False, qk_norm=False, shared_expert=False, renormalize=True)
    model.register_load_state_dict_pre_hook(_rename(MIXTRAL_NAMES))
    return model
