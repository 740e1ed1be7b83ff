"""Building blocks shared by the model families: norms, activations, the gated MLP and rotary attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmasos.errors import ModelLoadError
from llmasos.models.attention import AttentionMetadata
from llmasos.models.config import ModelConfig
from llmasos.models.rope import apply_rotary

ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ModelLoadError(f"config.json: activation {name!r} is not supported "
                             f"(supported: {', '.join(sorted(ACTIVATIONS))})") from None


class RMSNorm(nn.Module):
    """RMSNorm computed in float32. `offset=1` gives Gemma's (1 + weight) scaling."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x * (self.offset + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), the MLP of Llama-style families."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class RotaryAttention(nn.Module):
    """Multi-head / grouped-query attention with rotary positions and separate q, k, v projections.

    Families differ only in the knobs read from the config: qkv bias (Qwen2), q/k RMSNorm (Qwen3), the score scale
    and soft-capping (Gemma-2) and per-layer sliding windows."""

    def __init__(self, config: ModelConfig, layer_idx: int, qk_norm: bool = False, qkv_bias: bool | None = None,
                 o_bias: bool | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        hidden = config.hidden_size
        bias = config.attention_bias if qkv_bias is None else qkv_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden,
                                bias=config.attention_bias if o_bias is None else o_bias)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        self.qk_norm = qk_norm
        scalar = config.query_pre_attn_scalar
        self.scale = 1.0 / math.sqrt(scalar if scalar is not None else self.head_dim)
        self.sliding_window = config.layer_sliding_window(layer_idx)
        self.softcap = config.attn_logit_softcapping

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (num_tokens, hidden) -> q (num_tokens, heads, dim), k and v (num_tokens, kv_heads, dim)."""
        tokens = x.shape[0]
        q = self.q_proj(x).view(tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        return q, k, v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.project(x)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attn.attend(self.layer_idx, q, k, v, self.scale, self.sliding_window, self.softcap)
        return self.o_proj(out.reshape(x.shape[0], -1))
