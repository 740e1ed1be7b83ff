"""Sentence embeddings from BERT-family encoders, computed the way sentence-transformers computes them.

A sentence-transformers directory says how in modules.json: the Transformer (truncation from sentence_bert_config.json),
then Pooling (1_Pooling/config.json: cls, mean, max, ...), optional Dense layers and Normalize. A plain encoder
checkpoint without modules.json gets mean pooling and no normalisation, as sentence-transformers gives it.

>>> embedder = Embedder.load("path/to/all-MiniLM-L6-v2")
>>> vectors = embedder.embed(["a sentence", "another one"])  # list of 384-float lists
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tokenizers
import torch
import torch.nn.functional as F

from llmasos.engine.validation import check_token_ids
from llmasos.errors import ModelLoadError
from llmasos.models.bert import BertConfig, BertModel, is_encoder_config, load_encoder
from llmasos.models.loader import read_config_json
from llmasos.spec import ModelSpec, resolve_spec
from llmasos.tokenizer import Tokenizer

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# sentence-transformers' legacy boolean keys, in the order it concatenates their outputs.
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_DENSE_ACTIVATIONS = {"Tanh": torch.tanh, "Identity": lambda x: x, "ReLU": F.relu, "GELU": F.gelu,
                      "Sigmoid": torch.sigmoid, "SiLU": F.silu}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from None


@dataclass
class Pooling:
    """How token vectors become one sentence vector (sentence-transformers' Pooling module)."""

    modes: tuple[str, ...] = ("mean",)
    include_prompt: bool = True

    def __post_init__(self) -> None:
        bad = [mode for mode in self.modes if mode not in POOLING_MODES]
        if bad or not self.modes:
            raise ModelLoadError(f"pooling mode {bad[0] if bad else None!r} is not supported; use one of "
                                 f"{', '.join(POOLING_MODES)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Pooling:
        """Read 1_Pooling/config.json in either form: `pooling_mode` (str or list) or the legacy boolean keys."""
        mode = data.get("pooling_mode")
        if mode is None:
            modes = tuple(name for key, name in _LEGACY_POOLING_KEYS.items() if data.get(key))
            modes = modes or ("mean",)
        else:
            modes = (mode,) if isinstance(mode, str) else tuple(mode)
        return cls(modes=modes, include_prompt=bool(data.get("include_prompt", True)))

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor, prompt_length: int = 0) -> torch.Tensor:
        """hidden (batch, length, dim), mask (batch, length) of right-padded rows -> (batch, dim * len(modes))."""
        hidden = hidden.float()
        full_mask = mask
        if prompt_length and not self.include_prompt:
            mask = mask.clone()
            mask[:, :prompt_length] = 0
        weights = mask.unsqueeze(-1).float()  # (batch, length, 1)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        outputs = []
        for mode in self.modes:
            if mode == "cls":
                first = mask.int().argmax(dim=1)
                outputs.append(hidden[rows, first])
            elif mode == "max":
                outputs.append(hidden.masked_fill(weights == 0, float("-inf")).max(dim=1).values)
            elif mode in ("mean", "mean_sqrt_len_tokens"):
                counts = weights.sum(dim=1).clamp(min=1e-9)
                outputs.append((hidden * weights).sum(dim=1) / (counts if mode == "mean" else counts.sqrt()))
            elif mode == "weightedmean":
                positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=torch.float32)
                weighted = weights * positions.view(1, -1, 1)
                outputs.append((hidden * weighted).sum(dim=1) / weighted.sum(dim=1).clamp(min=1e-9))
            else:  # lasttoken: the last real token of each right-padded row
                last = full_mask.sum(dim=1).long() - 1
                outputs.append(hidden[rows, last] * weights[rows, last])
        return torch.cat(outputs, dim=-1)


@dataclass
class Dense:
    """A sentence-transformers Dense module: activation(linear(x)), weights from its own safetensors file."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    activation: str = "Tanh"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _DENSE_ACTIVATIONS[self.activation](F.linear(x, self.weight, self.bias))

    @classmethod
    def load(cls, directory: Path, device: torch.device) -> Dense:
        from safetensors.torch import load_file

        config = _read_json(directory / "config.json")
        name = str(config.get("activation_function") or "torch.nn.modules.activation.Tanh").rsplit(".", 1)[-1]
        if name not in _DENSE_ACTIVATIONS:
            raise ModelLoadError(f"{directory}: Dense activation {name!r} is not supported "
                                 f"(supported: {', '.join(sorted(_DENSE_ACTIVATIONS))})")
        weights_file = directory / "model.safetensors"
        if not weights_file.is_file():
            raise ModelLoadError(f"{directory} has no model.safetensors: Dense layers are read from safetensors only; "
                                 "re-save the model with sentence-transformers >= 3 (safe_serialization=True)")
        tensors = load_file(weights_file, device=str(device))
        weight = tensors.get("linear.weight")
        if weight is None:
            raise ModelLoadError(f"{weights_file} has no linear.weight tensor")
        return cls(weight.float(), tensors["linear.bias"].float() if "linear.bias" in tensors else None, name)


@dataclass
class EmbeddingSettings:
    """What a sentence-transformers directory configures around its encoder."""

    encoder_path: Path
    pooling: Pooling = field(default_factory=Pooling)
    post: list[tuple[str, Path]] = field(default_factory=list)  # ("dense", dir) / ("normalize", dir), in order
    max_seq_length: int | None = None
    do_lower_case: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None

    @property
    def normalize(self) -> bool:
        return any(kind == "normalize" for kind, _ in self.post)


def read_embedding_settings(directory: str | Path) -> EmbeddingSettings:
    """Read modules.json and the module configs it names; without modules.json: mean pooling, no normalisation."""
    directory = Path(directory)
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        settings = EmbeddingSettings(encoder_path=directory)
    else:
        modules = _read_json(modules_file)
        if not isinstance(modules, list):
            raise ModelLoadError(f"{modules_file} must hold a list of modules")
        settings = EmbeddingSettings(encoder_path=directory)
        for module in sorted(modules, key=lambda m: m.get("idx", 0)):
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            relative = Path(str(module.get("path") or ""))
            if relative.is_absolute() or ".." in relative.parts:
                raise ModelLoadError(f"{modules_file} names a module outside the model directory: {relative}")
            path = directory / relative
            if kind == "Transformer":
                settings.encoder_path = path
            elif kind == "Pooling":
                settings.pooling = Pooling.from_dict(_read_json(path / "config.json"))
            elif kind == "Dense":
                settings.post.append(("dense", path))
            elif kind == "Normalize":
                settings.post.append(("normalize", path))
            else:
                raise ModelLoadError(f"{modules_file}: module type {module.get('type')!r} is not supported; LLMasOS "
                                     "runs Transformer, Pooling, Dense and Normalize modules")
    for folder in (settings.encoder_path, directory):
        st_config = folder / "sentence_bert_config.json"
        if st_config.is_file():
            data = _read_json(st_config)
            settings.max_seq_length = data.get("max_seq_length")
            settings.do_lower_case = bool(data.get("do_lower_case", False))
            break
    extra = directory / "config_sentence_transformers.json"
    if extra.is_file():
        data = _read_json(extra)
        settings.prompts = {k: v for k, v in (data.get("prompts") or {}).items() if isinstance(v, str)}
        settings.default_prompt_name = data.get("default_prompt_name")
    return settings


def is_embedding_model(path: str | Path) -> bool:
    """True for a directory whose encoder is a supported BERT-family model (with or without modules.json)."""
    directory = Path(path).expanduser()
    settings = read_embedding_settings(directory) if directory.is_dir() else None
    if settings is None or not (settings.encoder_path / "config.json").is_file():
        return False
    return is_encoder_config(read_config_json(settings.encoder_path))


class Embedder:
    """A sentence-embedding model: encoder, tokenizer, pooling, optional Dense layers and normalisation."""

    def __init__(self, model: BertModel, config: BertConfig, tokenizer: Tokenizer, settings: EmbeddingSettings,
                 path: Path | None = None, spec: ModelSpec | None = None) -> None:
        self.model, self.config, self.tokenizer, self.settings, self.path = model, config, tokenizer, settings, path
        self.spec = spec  # what `load` resolved; None when built by hand
        self.device = next(model.parameters()).device
        self.dense = [Dense.load(p, self.device) for kind, p in settings.post if kind == "dense"]
        self.max_seq_length = min(settings.max_seq_length or model.max_length, model.max_length)
        # A private copy of the tokenizer pipeline that truncates the way sentence-transformers does.
        self._truncating = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
        self._truncating.no_padding()
        self._truncating.enable_truncation(self.max_seq_length)
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else config.pad_token_id

    @classmethod
    def load(cls, model: ModelSpec | str | Path, dtype: str | torch.dtype = "auto",
             device: str | torch.device = "cpu") -> Embedder:
        """Load a ModelSpec, a library model by name or a directory (sentence-transformers layout or a plain
        encoder); `dtype` and `device` given here override the spec's. "auto" is float32, as sentence-transformers
        computes embeddings."""
        spec = resolve_spec(model, dtype=dtype, device=device)
        directory = spec.directory
        if not directory.is_dir():
            raise ModelLoadError(f"model directory {str(directory)!r} does not exist")
        if spec.adapters or spec.quantization:  # refused rather than silently dropped
            what = "a LoRA adapter (ADAPTER)" if spec.adapters else f"{spec.quantization} quantization"
            raise ModelLoadError(f"{spec.name} is an embedding model, which cannot take {what}; only decoder-only "
                                 "models do")
        settings = read_embedding_settings(directory)
        encoder, config = load_encoder(settings.encoder_path, dtype="float32" if spec.dtype == "auto" else spec.dtype,
                                       device=spec.device)
        tokenizer_dir = settings.encoder_path if (settings.encoder_path / "tokenizer.json").is_file() else directory
        return cls(encoder, config, Tokenizer.from_dir(tokenizer_dir), settings, directory, spec)

    @property
    def dimension(self) -> int:
        if self.dense:
            return self.dense[-1].weight.shape[0]
        return self.config.hidden_size * len(self.settings.pooling.modes)

    def _prompt(self, prompt: str | None, prompt_name: str | None) -> str:
        if prompt is not None:
            return prompt
        name = prompt_name or self.settings.default_prompt_name
        if name is None:
            return ""
        if name not in self.settings.prompts:
            raise ValueError(f"prompt name {name!r} is not defined by this model; it defines: "
                             f"{', '.join(sorted(self.settings.prompts)) or 'none'}")
        return self.settings.prompts[name]

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids as the model sees them: special tokens added, truncated to max_seq_length."""
        if self.settings.do_lower_case:
            texts = [text.lower() for text in texts]
        return [encoding.ids for encoding in self._truncating.encode_batch(list(texts))]

    def _prompt_length(self, prompt: str) -> int:
        if not prompt:
            return 0
        ids = self.tokenize([prompt])[0]
        return len(ids) - 1 if ids and ids[-1] in self.tokenizer.all_special_ids else len(ids)

    def prepare(self, inputs: str | list[str] | list[list[int]], prompt: str | None = None,
                prompt_name: str | None = None) -> tuple[list[list[int]], int]:
        """The token ids each input is embedded from, and the prompt's length in tokens. Texts get the prompt, the
        special tokens and truncation; lists of token ids are used as given."""
        if isinstance(inputs, str):
            inputs = [inputs]
        inputs = list(inputs)
        prompt_text = self._prompt(prompt, prompt_name)
        if all(isinstance(item, str) for item in inputs):
            return self.tokenize([prompt_text + text for text in inputs]), self._prompt_length(prompt_text)
        if not all(isinstance(item, list) and all(isinstance(t, int) for t in item) for item in inputs):
            raise ValueError("inputs must be a string, a list of strings or a list of token-id lists")
        for ids in inputs:
            if not ids or len(ids) > self.max_seq_length:
                raise ValueError(f"token-id inputs must hold 1 to {self.max_seq_length} tokens, got {len(ids)}")
            check_token_ids(ids, self.config.vocab_size)
        return [list(ids) for ids in inputs], 0

    def encode(self, inputs: str | list[str] | list[list[int]], batch_size: int = 32, normalize: bool | None = None,
               prompt: str | None = None, prompt_name: str | None = None) -> torch.Tensor:
        """Embed texts (or lists of token ids) -> float32 tensor (num_inputs, dimension) on the CPU.

        `normalize` None follows the model's configuration; `prompt` / `prompt_name` prepend an instruction (the
        model's `prompts` in config_sentence_transformers.json), as sentence-transformers does."""
        id_lists, prompt_length = self.prepare(inputs, prompt, prompt_name)
        return self.encode_ids(id_lists, prompt_length, batch_size, normalize)

    @torch.inference_mode()
    def encode_ids(self, id_lists: list[list[int]], prompt_length: int = 0, batch_size: int = 32,
                   normalize: bool | None = None) -> torch.Tensor:
        """Embed prepared token-id lists (see `prepare`) -> float32 tensor (num_inputs, dimension)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        order = sorted(range(len(id_lists)), key=lambda i: -len(id_lists[i]))  # similar lengths share a batch
        result = torch.empty(len(id_lists), self.dimension)
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            result[chosen] = self._embed_batch([id_lists[i] for i in chosen], prompt_length, normalize).cpu()
        return result

    def _embed_batch(self, id_lists: list[list[int]], prompt_length: int, normalize: bool | None) -> torch.Tensor:
        length = max(len(ids) for ids in id_lists)
        ids = torch.full((len(id_lists), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, row_ids in enumerate(id_lists):
            ids[row, :len(row_ids)] = torch.tensor(row_ids)
            mask[row, :len(row_ids)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        vectors = self.settings.pooling(self.model(ids, mask), mask, prompt_length)  # (batch, dim) float32
        dense = iter(self.dense)
        for kind, _ in self.settings.post:
            if kind == "dense":
                vectors = next(dense)(vectors)
            elif normalize is None:
                vectors = F.normalize(vectors, p=2, dim=-1)
        if normalize:
            vectors = F.normalize(vectors, p=2, dim=-1)
        return vectors

    def embed(self, inputs: str | list[str] | list[list[int]], **options: Any) -> list[list[float]]:
        """Like `encode`, as plain lists of floats (one per input)."""
        return self.encode(inputs, **options).tolist()
