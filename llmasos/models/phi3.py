"""Phi-3: Llama's architecture with fused qkv_proj and gate_up_proj weights and optional partial rotary."""

from __future__ import annotations

import torch
from torch import nn

from llmasos.models.config import ModelConfig
from llmasos.models.layers import RotaryAttention, activation
from llmasos.models.llama import LlamaForCausalLM


class Phi3Attention(RotaryAttention):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        del self.q_proj, self.k_proj, self.v_proj
        out = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, out, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        tokens = x.shape[0]
        return (q.reshape(tokens, self.num_heads, self.head_dim), k.reshape(tokens, self.num_kv_heads, self.head_dim),
                v.reshape(tokens, self.num_kv_heads, self.head_dim))


class Phi3MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * self.act(gate))


class Phi3ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn = Phi3Attention(config, i)
            layer.mlp = Phi3MLP(config)
