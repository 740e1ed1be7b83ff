"""Rotary position embeddings with the scalings Hub checkpoints use: linear, dynamic NTK, llama3, yarn, longrope."""

from __future__ import annotations

import math

import torch

from llmasos.errors import ModelLoadError
from llmasos.models.config import ModelConfig

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


class RotaryEmbedding:
    """Computes cos/sin per token. Length-dependent scalings (dynamic, longrope) use each sequence's own length,
    so a request's numbers never depend on what else shares its batch."""

    def __init__(self, config: ModelConfig) -> None:
        self.dim = config.rotary_dim
        self.base = config.rope_theta
        self.max_position_embeddings = config.max_position_embeddings
        scaling = config.rope_scaling or {}
        self.rope_type = scaling.get("rope_type", "default")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            supported = ", ".join(SUPPORTED_ROPE_TYPES)
            raise ModelLoadError(f"config.json: rope type {self.rope_type!r} is not supported (supported: {supported})")
        self.scaling = scaling
        self.attention_scaling = 1.0
        self.original_max = scaling.get("original_max_position_embeddings", self.max_position_embeddings)
        with torch.device("cpu"):  # models are built on the meta device; frequencies are real numbers regardless
            self.inv_freq = self._static_inv_freq()
        self._device_cache: dict[torch.device, torch.Tensor] = {}

    def _exponents(self) -> torch.Tensor:
        return torch.arange(0, self.dim, 2, dtype=torch.int64, device="cpu").float() / self.dim

    def _static_inv_freq(self) -> torch.Tensor:
        inv_freq = 1.0 / (self.base ** self._exponents())
        kind, s = self.rope_type, self.scaling
        if kind == "linear":
            inv_freq = inv_freq / s["factor"]
        elif kind == "llama3":
            inv_freq = _llama3(inv_freq, s)
        elif kind == "yarn":
            inv_freq, self.attention_scaling = self._yarn()
        elif kind == "longrope":
            factor = self.max_position_embeddings / self.original_max
            self.attention_scaling = s.get("attention_factor") or (
                1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(self.original_max)))
            inv_freq = self._longrope(long=False)
        return inv_freq

    def _yarn(self) -> tuple[torch.Tensor, float]:
        s = self.scaling
        factor = s.get("factor") or self.max_position_embeddings / self.original_max

        def get_mscale(scale: float, mscale: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

        attention = s.get("attention_factor")
        if attention is None:
            if s.get("mscale") and s.get("mscale_all_dim"):
                attention = get_mscale(factor, s["mscale"]) / get_mscale(factor, s["mscale_all_dim"])
            else:
                attention = get_mscale(factor)
        beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return self.dim * math.log(self.original_max / (rotations * 2 * math.pi)) / (2 * math.log(self.base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if s.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, self.dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(self.dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
        pos_freqs = self.base ** self._exponents()
        extrapolation = 1 - ramp
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
        return inv_freq, float(attention)

    def _longrope(self, long: bool) -> torch.Tensor:
        factors = torch.tensor(self.scaling["long_factor" if long else "short_factor"], dtype=torch.float32,
                               device="cpu")
        return 1.0 / (factors * self.base ** self._exponents())

    def _inv_freq_for_length(self, seq_len: int) -> torch.Tensor:
        """inv_freq for a sequence of `seq_len` tokens (only dynamic and longrope depend on it)."""
        if self.rope_type == "dynamic":
            factor = self.scaling["factor"]
            seq_len = max(seq_len, self.max_position_embeddings)
            base = self.base * ((factor * seq_len / self.max_position_embeddings) - (factor - 1)) ** (
                self.dim / (self.dim - 2))
            return 1.0 / (base ** self._exponents())
        if self.rope_type == "longrope" and seq_len > self.original_max:
            return self._longrope(long=True)
        return self.inv_freq

    @property
    def length_dependent(self) -> bool:
        return self.rope_type in ("dynamic", "longrope")

    def cos_sin(self, positions: torch.Tensor, seq_lens: list[int] | None = None,
                tokens_per_seq: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, (num_tokens, rotary_dim) in float32, for flat `positions` (num_tokens,).

        `seq_lens[i]` (total length of sequence i after this step) and `tokens_per_seq[i]` (its tokens in this batch)
        are needed only by length-dependent scalings."""
        device = positions.device
        if self.length_dependent and seq_lens is not None:
            inv = torch.cat([self._inv_freq_for_length(length).unsqueeze(0).expand(count, -1)
                             for length, count in zip(seq_lens, tokens_per_seq, strict=True)]).to(device)
            freqs = positions.float().unsqueeze(-1) * inv  # (num_tokens, rotary_dim / 2)
        else:
            inv = self._device_cache.get(device)
            if inv is None:
                inv = self._device_cache[device] = self.inv_freq.to(device)
            freqs = positions.float().unsqueeze(-1) * inv.unsqueeze(0)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def _llama3(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (num_tokens, num_heads, head_dim); only the first cos.shape[-1] dims rotate (partial rotary)."""
    rotary_dim = cos.shape[-1]
    cos = cos.to(x.dtype).unsqueeze(1)  # (num_tokens, 1, rotary_dim)
    sin = sin.to(x.dtype).unsqueeze(1)
    if rotary_dim < x.shape[-1]:
        rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
        return torch.cat((_rotate(rot, cos, sin), rest), dim=-1)
    return _rotate(x, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
