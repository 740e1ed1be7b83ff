"""GPT-2: learned positions, LayerNorm, gelu_new, and Conv1D weights stored transposed (in, out) as on the Hub."""

from __future__ import annotations

import math

import torch
from torch import nn

from llmasos.models.attention import AttentionMetadata
from llmasos.models.base import CausalLM
from llmasos.models.config import ModelConfig
from llmasos.models.layers import activation


class Conv1D(nn.Module):
    """A linear layer storing its weight (in_features, out_features) as the Hub does, so checkpoints load as-is."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class GPT2Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.c_attn = Conv1D(config.hidden_size, 3 * config.hidden_size)
        self.c_proj = Conv1D(config.hidden_size, config.hidden_size)
        raw = config.raw
        self.scale = 1.0 / math.sqrt(self.head_dim) if raw.get("scale_attn_weights", True) else 1.0
        if raw.get("scale_attn_by_inverse_layer_idx", False):
            self.scale /= layer_idx + 1

    def forward(self, x: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.c_attn(x).view(tokens, 3, self.num_heads, self.head_dim).unbind(1)
        out = attn.attend(self.layer_idx, q, k, v, self.scale)
        return self.c_proj(out.reshape(tokens, -1))


class GPT2MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = Conv1D(config.hidden_size, config.intermediate_size)
        self.c_proj = Conv1D(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GPT2MLP(config)

    def forward(self, x: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


class GPT2LMHeadModel(CausalLM):
    ignored_weight_suffixes = (".attn.bias", ".attn.masked_bias")

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    @classmethod
    def sanitize(cls, weights: dict[str, str]) -> dict[str, str]:
        # The original Hub checkpoints were saved from GPT2Model, without the "transformer." prefix.
        return {(name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"): source
                for name, source in weights.items()}

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.transformer.wte(input_ids) + self.transformer.wpe(positions)

    def input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def decoder_layers(self) -> nn.ModuleList:
        return self.transformer.h

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.transformer.ln_f(hidden)
