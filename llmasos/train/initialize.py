"""A model from scratch: a complete config.json from a few sizes and a tokenizer, and transformers' initialisation
(normal(0, initializer_range) weights, zero biases, unit norms; GPT-2's scaled residual projections)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from llmasos.models import CausalLM, load_config
from llmasos.models.gpt2 import Conv1D
from llmasos.models.layers import RMSNorm
from llmasos.tokenizer import Tokenizer

# Keys transformers' config classes fill with defaults; we write them explicitly so every reader agrees.
_EXPLICIT = {
    "gpt2": {"n_positions": "max_position_embeddings", "n_embd": "hidden_size", "n_layer": "num_hidden_layers",
             "n_head": "num_attention_heads", "layer_norm_epsilon": "norm_eps",
             "activation_function": "hidden_act", "tie_word_embeddings": "tie_word_embeddings"},
    "default": {"hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
                "num_hidden_layers": "num_hidden_layers", "num_attention_heads": "num_attention_heads",
                "num_key_value_heads": "num_key_value_heads", "head_dim": "head_dim",
                "max_position_embeddings": "max_position_embeddings", "rms_norm_eps": "norm_eps",
                "rope_theta": "rope_theta", "hidden_act": "hidden_act", "tie_word_embeddings": "tie_word_embeddings",
                "attention_bias": "attention_bias"},
}


def complete_config(data: dict[str, Any], tokenizer: Tokenizer) -> dict[str, Any]:
    """config.json for a new model: vocab size and special token ids from the tokenizer, every size explicit."""
    if "model_type" not in data:
        raise ValueError("a model config needs a model_type (llama, qwen2, gpt2, ...)")
    data = dict(data)
    data.setdefault("vocab_size", tokenizer.vocab_size)
    if data["vocab_size"] < tokenizer.vocab_size:
        raise ValueError(f"config vocab_size {data['vocab_size']} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} tokens")
    for key, value in (("bos_token_id", tokenizer.bos_token_id), ("eos_token_id", tokenizer.eos_token_id),
                       ("pad_token_id", tokenizer.pad_token_id)):
        if value is not None:
            data.setdefault(key, value)
    data.setdefault("initializer_range", 0.02)
    config = load_config(data)
    explicit = _EXPLICIT["gpt2" if config.model_type == "gpt2" else "default"]
    for key, field_name in explicit.items():
        data.setdefault(key, getattr(config, field_name))
    if config.model_type == "gpt2" and "n_inner" not in data and config.intermediate_size != 4 * config.hidden_size:
        data["n_inner"] = config.intermediate_size
    return data


@torch.no_grad()
def init_weights(model: CausalLM) -> None:
    """transformers' `_init_weights` for our families, so a scratch model trains like one built by transformers."""
    std = float(model.config.raw.get("initializer_range", 0.02))
    for module in model.modules():
        if isinstance(module, (nn.Linear, Conv1D)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            (nn.init.zeros_ if module.offset else nn.init.ones_)(module.weight)
    if model.config.model_type == "gpt2":  # GPT-2 scales the residual projections by 1 / sqrt(2 * n_layer)
        scaled = std / math.sqrt(2 * model.config.num_hidden_layers)
        for name, param in model.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=scaled)
    model.tie_weights()
