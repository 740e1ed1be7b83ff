"""Native BERT-family encoders (bert, roberta, xlm-roberta, camembert) on Hugging Face safetensors.

Token ids of a padded batch -> the last hidden states (what transformers' BertModel returns as last_hidden_state).
Parameters carry transformers' BertModel names, so checkpoints load unrenamed; task heads (masked LM, pooler,
classifiers) are skipped. `ENCODER_FAMILIES` is the encoder registry, apart from the decoder-only `MODEL_FAMILIES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmasos.errors import ModelLoadError
from llmasos.models.layers import activation


@dataclass
class BertConfig:
    """The facts of a BERT-family config.json that the encoder reads; everything else stays in `raw`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1  # dropout acts only in training (the trainer); inference never sees it
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"
    torch_dtype: str | None = None
    tie_word_embeddings: bool = False  # encoders have no output embeddings; the shared loader reads this flag
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelLoadError(f"config.json: {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ModelLoadError(f"config.json: hidden_size ({self.hidden_size}) is not a multiple of "
                                 f"num_attention_heads ({self.num_attention_heads})")
        if self.position_embedding_type != "absolute":
            raise ModelLoadError(f"config.json: position_embedding_type {self.position_embedding_type!r} is not "
                                 "supported; only 'absolute' position embeddings are")
        activation(self.hidden_act)  # fails early, naming the activation

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BertConfig:
        model_type = data.get("model_type")
        if model_type not in ENCODER_FAMILIES:
            raise ModelLoadError(f"model_type {model_type!r} is not a supported encoder; supported encoder families: "
                                 f"{', '.join(sorted(ENCODER_FAMILIES))}")
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size") if data.get(k) is None]
        if missing:
            raise ModelLoadError(f"config.json is missing required keys: {', '.join(missing)}")
        names = {"hidden_act", "max_position_embeddings", "hidden_dropout_prob", "attention_probs_dropout_prob",
                 "type_vocab_size", "layer_norm_eps", "pad_token_id",
                 "position_embedding_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size"}
        values = {k: data[k] for k in names if data.get(k) is not None}
        return cls(model_type=model_type, torch_dtype=data.get("dtype") or data.get("torch_dtype"), raw=dict(data),
                   **values)


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        hidden = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
                  + self.position_embeddings(position_ids))
        return self.dropout(self.LayerNorm(hidden))


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        batch, length, _ = hidden.shape

        def heads(x: torch.Tensor) -> torch.Tensor:  # (batch, length, hidden) -> (batch, heads, length, head_dim)
            return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.query(hidden)), heads(self.key(hidden)),
                                             heads(self.value(hidden)), attn_mask=key_mask,
                                             dropout_p=self.dropout_p if self.training else 0.0)
        return out.transpose(1, 2).reshape(batch, length, -1)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, attended: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(attended)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)  # transformers' name: encoder.layer.N.attention.self.query
        self.output = BertSelfOutput(config)

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(hidden, key_mask), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(hidden))


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, intermediate: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(intermediate)) + residual)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        attended = self.attention(hidden, key_mask)
        return self.output(self.intermediate(attended), attended)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertPooler(nn.Module):
    """tanh(dense(hidden of the first token)): the sentence vector BERT's classifiers read."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden[:, 0]))  # (batch, hidden)


class BertModel(nn.Module):
    """BERT: absolute positions counted from 0."""

    ignored_weight_suffixes: tuple[str, ...] = ("position_ids",)
    # Prefixes task models (BertForMaskedLM, RobertaForSequenceClassification, ...) put before the encoder's names.
    checkpoint_prefixes: tuple[str, ...] = ("bert.", "roberta.", "model.")

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    @property
    def max_length(self) -> int:
        """The longest input, in tokens, that the position embeddings cover."""
        return self.config.max_position_embeddings

    def position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, attention_mask (batch, length), 1 = real token, 0 = padding -> hidden (batch, length, hidden)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if input_ids.shape[1] > self.max_length:
            raise ValueError(f"{input_ids.shape[1]} tokens exceed this encoder's limit of {self.max_length}; "
                             "truncate the input")
        hidden = self.embeddings(input_ids, self.position_ids(input_ids, attention_mask), token_type_ids)
        key_mask = attention_mask.bool()[:, None, None, :]  # (batch, 1, 1, length): which keys each query may see
        for layer in self.encoder.layer:
            hidden = layer(hidden, key_mask)
        return hidden

    @classmethod
    def sanitize(cls, weights: dict[str, str]) -> dict[str, str]:
        """Checkpoint names -> parameter names: drop a task model's prefix and heads, rename TF-era gamma/beta."""
        out: dict[str, str] = {}
        for name in weights:
            target = name
            for prefix in cls.checkpoint_prefixes:
                if target.startswith(prefix):
                    target = target[len(prefix):]
                    break
            if not target.startswith(("embeddings.", "encoder.")) or target.endswith("position_ids"):
                continue
            if target.endswith(".gamma"):
                target = target[: -len("gamma")] + "weight"
            elif target.endswith(".beta"):
                target = target[: -len("beta")] + "bias"
            out[target] = name
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class RobertaModel(BertModel):
    """RoBERTa and XLM-RoBERTa: positions start after the padding index, and padding keeps the padding position."""

    @property
    def max_length(self) -> int:
        return self.config.max_position_embeddings - self.config.pad_token_id - 1

    def position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # transformers' create_position_ids_from_input_ids: real tokens count up from padding_idx + 1.
        padding_idx = self.config.pad_token_id
        real = input_ids.ne(padding_idx).int()
        return (torch.cumsum(real, dim=1) * real).long() + padding_idx


ENCODER_FAMILIES: dict[str, type[BertModel]] = {
    "bert": BertModel,
    "roberta": RobertaModel,
    "xlm-roberta": RobertaModel,
    "camembert": RobertaModel,
}


def is_encoder_config(data: dict[str, Any]) -> bool:
    """True when a config.json dict describes one of the supported encoder families."""
    return data.get("model_type") in ENCODER_FAMILIES


def load_encoder(path: str | Path, dtype: str | torch.dtype = "auto",
                 device: str | torch.device = "cpu") -> tuple[BertModel, BertConfig]:
    """Load a BERT-family checkpoint directory (config.json + safetensors) in eval mode."""
    from llmasos.models.loader import instantiate, read_config_json, resolve_directory

    directory = resolve_directory(path)
    config = BertConfig.from_dict(read_config_json(directory))
    model = instantiate(ENCODER_FAMILIES[config.model_type], config, directory, dtype, device)
    return model, config
