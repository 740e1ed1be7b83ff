"""ModelConfig: one validated view of a Hugging Face config.json, legacy and current key spellings alike."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from llmasos.errors import ModelLoadError

# HF spells the same idea differently per family; the first spelling found wins.
_ALIASES = {
    "hidden_size": ("hidden_size", "n_embd"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer"),
    "num_attention_heads": ("num_attention_heads", "n_head"),
    "max_position_embeddings": ("max_position_embeddings", "n_positions"),
    "intermediate_size": ("intermediate_size", "n_inner"),
    "norm_eps": ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps"),
    "hidden_act": ("hidden_activation", "hidden_act", "activation_function"),
}


@dataclass
class ModelConfig:
    """The architecture facts every family reads; family-specific extras stay in `raw`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-6
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    partial_rotary_factor: float = 1.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    query_pre_attn_scalar: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelLoadError(f"config.json: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ModelLoadError(
                f"config.json: layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def max_context_length(self) -> int:
        """The longest sequence the model takes: positions stretched by linear or dynamic RoPE scaling count."""
        scaling = self.rope_scaling or {}
        if scaling.get("rope_type") in ("linear", "dynamic") and isinstance(scaling.get("factor"), (int, float)):
            return int(self.max_position_embeddings * scaling["factor"])
        return self.max_position_embeddings

    def layer_sliding_window(self, layer_idx: int) -> int | None:
        """The attention window of one layer, or None for full attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None:
            return self.sliding_window
        return self.sliding_window if self.layer_types[layer_idx] == "sliding_attention" else None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a config.json dict; unknown keys are kept in `raw`, never rejected."""
        if "model_type" not in data:
            raise ModelLoadError("config.json has no model_type: it is not a Hugging Face model config")
        values: dict[str, Any] = {"model_type": data["model_type"], "raw": dict(data)}
        known = {f.name for f in fields(cls)}
        for name in known & data.keys():
            values[name] = data[name]
        for name, spellings in _ALIASES.items():
            for spelling in spellings:
                if data.get(spelling) is not None:
                    values[name] = data[spelling]
                    break
        _read_rope(data, values)
        hidden, heads = values.get("hidden_size"), values.get("num_attention_heads")
        if values.get("num_key_value_heads") is None:
            values["num_key_value_heads"] = heads
        if values.get("head_dim") is None and isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
            values["head_dim"] = hidden // heads
        if values.get("intermediate_size") is None and isinstance(hidden, int):
            values["intermediate_size"] = 4 * hidden  # GPT-2 leaves n_inner null
        eos = data.get("eos_token_id")
        values["eos_token_ids"] = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        values["torch_dtype"] = data.get("dtype") or data.get("torch_dtype")
        if data["model_type"] in ("qwen2", "qwen3") and not data.get("use_sliding_window", False):
            values["sliding_window"] = None
        missing = [name for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
                   if values.get(name) is None]
        if missing:
            raise ModelLoadError(f"config.json is missing required keys: {', '.join(missing)}")
        values = {k: v for k, v in values.items() if v is not None or k in ("rope_scaling", "sliding_window")}
        return cls(**values)


def _read_rope(data: dict[str, Any], values: dict[str, Any]) -> None:
    """Accept both `rope_parameters` (transformers >= 5) and legacy `rope_theta` + `rope_scaling`."""
    params = data.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type form: take the full-attention one
        params = params["full_attention"]
    scaling: dict[str, Any] | None = None
    if isinstance(params, dict):
        if "rope_theta" in params:
            values["rope_theta"] = params["rope_theta"]
        if "partial_rotary_factor" in params:
            values["partial_rotary_factor"] = params["partial_rotary_factor"]
        scaling = dict(params)
    legacy = data.get("rope_scaling")
    if isinstance(legacy, dict):
        scaling = {**(scaling or {}), **legacy}
    if scaling is not None:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        scaling = None if rope_type == "default" else {**scaling, "rope_type": rope_type}
    values["rope_scaling"] = scaling
    if data.get("partial_rotary_factor") is not None:
        values["partial_rotary_factor"] = data["partial_rotary_factor"]
