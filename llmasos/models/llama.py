"""Llama and the families that differ from it only by config knobs: Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm)."""

from __future__ import annotations

import torch
from torch import nn

from llmasos.models.attention import AttentionMetadata
from llmasos.models.base import CausalLM
from llmasos.models.config import ModelConfig
from llmasos.models.layers import GatedMLP, RMSNorm, RotaryAttention
from llmasos.models.rope import RotaryEmbedding


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, **attention_options) -> None:
        super().__init__()
        self.self_attn = RotaryAttention(config, layer_idx, **attention_options)
        self.mlp = GatedMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, **attention_options) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, **attention_options) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)


class RotaryCausalLM(CausalLM):
    """Shared plumbing of the rotary families: cos/sin once per step, handed to every layer."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.rotary = RotaryEmbedding(config)

    def position_inputs(self, positions: torch.Tensor, attn: AttentionMetadata) -> tuple:
        return self.rotary.cos_sin(positions, attn.context_lens, attn.query_lens)


class LlamaForCausalLM(RotaryCausalLM):
    attention_options: dict = {}

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.model = LlamaModel(config, **self.attention_options)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.layers

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.norm(hidden)


class Qwen2ForCausalLM(LlamaForCausalLM):
    attention_options = {"qkv_bias": True, "o_bias": False}


class Qwen3ForCausalLM(LlamaForCausalLM):
    attention_options = {"qk_norm": True}
