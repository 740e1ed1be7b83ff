"""SequenceClassifier: a sequence-classification checkpoint (BERT or a decoder family, as transformers'
`*ForSequenceClassification` saves it) with its tokenizer and label names, giving logits for texts or text pairs.
What `llmasos eval classification` and the text-classification pipeline both run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llmasos.errors import ModelLoadError
from llmasos.models.heads import CLASSIFICATION, load_task_model
from llmasos.spec import ModelSpec, resolve_spec
from llmasos.tokenizer import Tokenizer


def is_classifier_checkpoint(config: dict[str, Any]) -> bool:
    return any(str(name).endswith("ForSequenceClassification") for name in config.get("architectures") or [])


class SequenceClassifier:
    """Logits of a classifier for batches of texts (or pairs), in float32 on the CPU by default."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, config: dict[str, Any],
                 spec: ModelSpec | None = None, path: str | None = None) -> None:
        self.model, self.tokenizer, self.config, self.spec = model, tokenizer, config, spec
        self.path = path
        id2label = config.get("id2label") or {}
        self.labels = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(model.num_labels)]
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, model: ModelSpec | str | Path, dtype: str = "float32", device: str = "cpu") -> SequenceClassifier:
        spec = resolve_spec(model, dtype=dtype, device=device)
        from llmasos.models.loader import read_config_json

        config = read_config_json(spec.directory)
        if not is_classifier_checkpoint(config):
            raise ModelLoadError(f"{spec.name} is not a sequence classifier (its architectures: "
                                 f"{config.get('architectures')}); train one with `llmasos train --task "
                                 "classification`")
        torch_dtype = "float32" if spec.dtype in ("auto", None) else spec.dtype
        task_model, config = load_task_model(spec.path, CLASSIFICATION, torch_dtype, spec.device or "cpu")
        return cls(task_model, Tokenizer.from_dir(spec.directory), config, spec, spec.path)

    @property
    def max_length(self) -> int:
        limit = getattr(self.model.config, "max_context_length", None)
        return limit or self.model.config.max_position_embeddings

    def encode(self, text: str, text_pair: str | None = None, truncation: bool = False) -> tuple[list[int], list[int]]:
        """(input_ids, token_type_ids) of a text or pair; over the model's length an error, or with `truncation`
        cut longest-first with the special tokens kept (transformers' truncation=True)."""
        backend = self.tokenizer.backend
        encoding = backend.encode(text, text_pair, add_special_tokens=True)
        if len(encoding.ids) > self.max_length:
            if not truncation:
                raise ValueError(f"the text is {len(encoding.ids)} tokens, over the model's {self.max_length}; "
                                 "pass truncation=True to cut it")
            previous = backend.truncation
            backend.enable_truncation(self.max_length)
            try:
                encoding = backend.encode(text, text_pair, add_special_tokens=True)
            finally:
                if previous is None:
                    backend.no_truncation()
                else:
                    backend.enable_truncation(**previous)
        return list(encoding.ids), list(encoding.type_ids)

    @torch.no_grad()
    def logits(self, texts: Sequence[str], text_pairs: Sequence[str | None] | None = None, batch_size: int = 16,
               truncation: bool = False) -> torch.Tensor:
        """(len(texts), num_labels) float32 logits; batches are padded at the end (each text's logits are those
        it has alone)."""
        from llmasos.train.dataset import Example
        from llmasos.train.tasks import pad_batch

        pairs = list(text_pairs) if text_pairs is not None else [None] * len(texts)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.config.get("pad_token_id") or 0
        examples = []
        for text, pair in zip(texts, pairs, strict=True):
            input_ids, type_ids = self.encode(text, pair, truncation)
            examples.append(Example(input_ids, [], token_type_ids=type_ids))
        outputs = [self.model(*pad_batch(examples[start:start + batch_size], pad_id, self.device)).float().cpu()
                   for start in range(0, len(examples), batch_size)]
        return torch.cat(outputs) if outputs else torch.empty(0, len(self.labels))
