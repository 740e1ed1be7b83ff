"""Gemma-2: scaled embeddings, (1 + w) RMSNorm, norms before and after each block, soft-capped attention and logits,
alternating sliding-window layers (all knobs read from the config by the shared attention)."""

from __future__ import annotations

import torch
from torch import nn

from llmasos.models.attention import AttentionMetadata
from llmasos.models.config import ModelConfig
from llmasos.models.layers import GatedMLP, RMSNorm, RotaryAttention
from llmasos.models.llama import RotaryCausalLM


class Gemma2DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = RotaryAttention(config, layer_idx)
        self.mlp = GatedMLP(config)
        dim, eps = config.hidden_size, config.norm_eps
        self.input_layernorm = RMSNorm(dim, eps, offset=1.0)
        self.post_attention_layernorm = RMSNorm(dim, eps, offset=1.0)
        self.pre_feedforward_layernorm = RMSNorm(dim, eps, offset=1.0)
        self.post_feedforward_layernorm = RMSNorm(dim, eps, offset=1.0)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, attn))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma2Model(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Gemma2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps, offset=1.0)


class Gemma2ForCausalLM(RotaryCausalLM):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.model = Gemma2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.model.embed_tokens(input_ids)
        # The normalizer is rounded to the activation dtype first, exactly as the reference does.
        return hidden * torch.tensor(self.config.hidden_size ** 0.5, dtype=hidden.dtype)

    def input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.layers

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.norm(hidden)
