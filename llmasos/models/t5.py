"""Native T5 (t5, mt5) encoder-decoder on Hugging Face safetensors, with cached greedy or sampled decoding.

Parameters carry transformers' T5ForConditionalGeneration names. Covers the original T5 (ReLU, tied and rescaled
output) and T5 v1.1 / mT5 / Flan-T5 (gated GELU, separate lm_head). `SEQ2SEQ_FAMILIES` is the encoder-decoder registry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmasos.errors import ModelLoadError
from llmasos.models.layers import activation


@dataclass
class T5Config:
    model_type: str
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    num_decoder_layers: int | None = None
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    pad_token_id: int = 0
    eos_token_id: int | list[int] = 1
    decoder_start_token_id: int | None = None
    scale_decoder_outputs: bool = True  # original T5 rescales before its tied output; v1.1 (tie=False) does not
    torch_dtype: str | None = None
    tie_word_embeddings: bool = False  # set by the loader: True when the checkpoint has no lm_head of its own
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelLoadError(f"config.json: {name} must be a positive integer, got {value!r}")
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.decoder_start_token_id is None:
            self.decoder_start_token_id = self.pad_token_id
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ModelLoadError(f"config.json: feed_forward_proj {self.feed_forward_proj!r} is not 'ACT' or "
                                 "'gated-ACT'")
        activation(self.act_name)

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def act_name(self) -> str:
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]

    @property
    def eos_token_ids(self) -> set[int]:
        eos = self.eos_token_id
        return {eos} if isinstance(eos, int) else set(eos)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> T5Config:
        model_type = data.get("model_type")
        if model_type not in SEQ2SEQ_FAMILIES:
            raise ModelLoadError(f"model_type {model_type!r} is not a supported encoder-decoder; supported: "
                                 f"{', '.join(sorted(SEQ2SEQ_FAMILIES))}")
        names = [f.name for f in cls.__dataclass_fields__.values()
                 if f.name not in ("model_type", "scale_decoder_outputs", "torch_dtype", "tie_word_embeddings", "raw")]
        values = {k: data[k] for k in names if data.get(k) is not None}
        missing = [k for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads") if k not in values]
        if missing:
            raise ModelLoadError(f"config.json is missing required keys: {', '.join(missing)}")
        # transformers >= 5 writes scale_decoder_outputs; older configs say it through tie_word_embeddings.
        scale = data.get("scale_decoder_outputs", data.get("tie_word_embeddings") is not False)
        return cls(model_type=model_type, scale_decoder_outputs=bool(scale),
                   torch_dtype=data.get("dtype") or data.get("torch_dtype"), raw=dict(data), **values)


class T5LayerNorm(nn.Module):
    """RMS norm without mean subtraction or bias; the variance is taken in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps)).to(self.weight.dtype)


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """Mesh TensorFlow's bucketing of (key position - query position): exact near zero, logarithmic farther out."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).long() * num_buckets
        relative = relative.abs()
    else:
        relative = -torch.clamp(relative, max=0)
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(relative.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(relative < max_exact, relative, large)


class T5Attention(nn.Module):
    def __init__(self, config: T5Config, has_relative_bias: bool, bidirectional: bool) -> None:
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.num_heads, self.head_dim, self.bidirectional = config.num_heads, config.d_kv, bidirectional
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(self.num_buckets, config.num_heads)

    def heads(self, x: torch.Tensor) -> torch.Tensor:  # (batch, length, inner) -> (batch, heads, length, head_dim)
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def position_bias(self, query_length: int, key_length: int, offset: int = 0) -> torch.Tensor:
        """(1, heads, query_length, key_length) bias; queries sit at positions offset.. (decoding with a cache)."""
        device = self.relative_attention_bias.weight.device
        query = torch.arange(query_length, device=device)[:, None] + offset
        key = torch.arange(key_length, device=device)[None, :]
        buckets = relative_position_bucket(key - query, self.bidirectional, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, keys: torch.Tensor | None = None,
                values: torch.Tensor | None = None) -> torch.Tensor:
        """T5 does not scale q.k: its initialisation absorbs the 1/sqrt(d). `bias` carries positions and masks."""
        query = self.heads(self.q(x))
        keys = self.heads(self.k(x)) if keys is None else keys
        values = self.heads(self.v(x)) if values is None else values
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=bias.to(query.dtype), scale=1.0)
        return self.o(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class T5DenseReluDense(nn.Module):
    """The feed-forward block: wo(act(wi(x))), or wo(act(wi_0(x)) * wi_1(x)) when gated (v1.1)."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.gated = config.gated
        if self.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = activation(config.act_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(hidden)


class T5SelfAttentionLayer(nn.Module):
    def __init__(self, config: T5Config, has_relative_bias: bool, bidirectional: bool) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_bias, bidirectional)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)


class T5CrossAttentionLayer(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.EncDecAttention = T5Attention(config, has_relative_bias=False, bidirectional=True)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)


class T5FeedForwardLayer(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.DenseReluDense = T5DenseReluDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)


def _clamp_half(x: torch.Tensor) -> torch.Tensor:
    """float16 activations of T5 overflow; transformers clamps them just below the largest value, and so do we."""
    if x.dtype == torch.float16:
        limit = torch.finfo(torch.float16).max - 1000
        return torch.clamp(x, -limit, limit)
    return x


class T5Block(nn.Module):
    def __init__(self, config: T5Config, is_decoder: bool, has_relative_bias: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = [T5SelfAttentionLayer(config, has_relative_bias, bidirectional=not is_decoder)]
        if is_decoder:
            layers.append(T5CrossAttentionLayer(config))
        layers.append(T5FeedForwardLayer(config))
        self.layer = nn.ModuleList(layers)

    def self_attention(self, x: torch.Tensor, bias: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        sub = self.layer[0]
        normed = sub.layer_norm(x)
        attention = sub.SelfAttention
        keys = values = None
        if cache is not None:  # append this step's keys and values to the layer's cache
            new_k, new_v = attention.heads(attention.k(normed)), attention.heads(attention.v(normed))
            cache["k"] = new_k if "k" not in cache else torch.cat([cache["k"], new_k], dim=2)
            cache["v"] = new_v if "v" not in cache else torch.cat([cache["v"], new_v], dim=2)
            keys, values = cache["k"], cache["v"]
        return _clamp_half(x + attention(normed, bias, keys, values))

    def cross_attention(self, x: torch.Tensor, bias: torch.Tensor, keys: torch.Tensor,
                        values: torch.Tensor) -> torch.Tensor:
        sub = self.layer[1]
        return _clamp_half(x + sub.EncDecAttention(sub.layer_norm(x), bias, keys, values))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        sub = self.layer[-1]
        return _clamp_half(x + sub.DenseReluDense(sub.layer_norm(x)))


class T5Stack(nn.Module):
    def __init__(self, config: T5Config, is_decoder: bool) -> None:
        super().__init__()
        count = config.num_decoder_layers if is_decoder else config.num_layers
        self.block = nn.ModuleList(T5Block(config, is_decoder, has_relative_bias=i == 0) for i in range(count))
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    @property
    def bias_attention(self) -> T5Attention:
        return self.block[0].layer[0].SelfAttention


def _padding_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """mask (batch, keys) of 1/0 -> additive bias (batch, 1, 1, keys): 0 where visible, the dtype's min where not."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class T5ForConditionalGeneration(nn.Module):
    ignored_weight_suffixes: tuple[str, ...] = ()

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, is_decoder=False)
        self.decoder = T5Stack(config, is_decoder=True)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight

    @classmethod
    def sanitize(cls, weights: dict[str, str]) -> dict[str, str]:
        """The stacks share `shared`; take it from a stack's embed_tokens when a checkpoint saved only that."""
        out = {name: name for name in weights if not name.endswith("embed_tokens.weight")
               and name != "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"}
        if "shared.weight" not in weights:
            for name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
                if name in weights:
                    out["shared.weight"] = name
                    break
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask (batch, length) -> encoder output (batch, length, d_model)."""
        hidden = self.shared(input_ids)
        length = input_ids.shape[1]
        bias = self.encoder.bias_attention.position_bias(length, length) + _padding_bias(attention_mask, hidden.dtype)
        for block in self.encoder.block:
            hidden = block.feed_forward(block.self_attention(hidden, bias))
        return self.encoder.final_layer_norm(hidden)

    def new_cache(self, encoder_output: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
        """Decoding state: cross-attention keys/values (computed once), a self-attention cache per layer."""
        cross = []
        for block in self.decoder.block:
            attention = block.layer[1].EncDecAttention
            cross.append((attention.heads(attention.k(encoder_output)), attention.heads(attention.v(encoder_output))))
        return {"cross": cross, "self": [{} for _ in self.decoder.block], "length": 0,
                "cross_bias": _padding_bias(attention_mask, encoder_output.dtype)}

    def decode_step(self, token_ids: torch.Tensor, cache: dict[str, Any]) -> torch.Tensor:
        """The next decoder tokens (batch, steps) after `cache["length"]` earlier ones -> float32 logits (batch, steps,
        vocab). Updates the cache."""
        hidden = self.shared(token_ids)
        steps, past = token_ids.shape[1], cache["length"]
        bias = self.decoder.bias_attention.position_bias(steps, past + steps, offset=past)
        if steps > 1:  # several new tokens at once: each sees only itself and earlier ones
            causal = torch.ones(steps, past + steps, dtype=torch.bool, device=hidden.device).tril(past)
            bias = bias.masked_fill(~causal, torch.finfo(bias.dtype).min)
        for block, self_cache, (keys, values) in zip(self.decoder.block, cache["self"], cache["cross"], strict=True):
            hidden = block.self_attention(hidden, bias, self_cache)
            hidden = block.cross_attention(hidden, cache["cross_bias"], keys, values)
            hidden = block.feed_forward(hidden)
        cache["length"] = past + steps
        hidden = self.decoder.final_layer_norm(hidden)
        if self.config.scale_decoder_outputs:
            hidden = hidden * self.config.d_model ** -0.5
        return self.lm_head(hidden).float()


SEQ2SEQ_FAMILIES: dict[str, type[T5ForConditionalGeneration]] = {
    "t5": T5ForConditionalGeneration,
    "mt5": T5ForConditionalGeneration,
}


def is_seq2seq_config(data: dict[str, Any]) -> bool:
    return data.get("model_type") in SEQ2SEQ_FAMILIES


def load_seq2seq(path: str | Path, dtype: str | torch.dtype = "auto",
                 device: str | torch.device = "cpu") -> tuple[T5ForConditionalGeneration, T5Config]:
    """Load a T5-family checkpoint directory (config.json + safetensors) in eval mode."""
    from llmasos.models.loader import instantiate, read_config_json, resolve_directory

    def tie_unless_lm_head(config: T5Config, headers: dict) -> None:  # T5 v1.1 ships its own lm_head
        config.tie_word_embeddings = not any("lm_head.weight" in header for header in headers.values())

    directory = resolve_directory(path)
    config = T5Config.from_dict(read_config_json(directory))
    model = instantiate(SEQ2SEQ_FAMILIES[config.model_type], config, directory, dtype, device, tie_unless_lm_head)
    return model, config
