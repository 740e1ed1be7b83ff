"""Pipelines over task heads rather than generation: "text-classification" (alias "sentiment-analysis"),
"zero-shot-classification" (an NLI classifier) and "fill-mask", with transformers' inputs, options and output
shapes, on `SequenceClassifier` / `MaskedLM`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmasos.errors import ModelLoadError
from llmasos.models.heads import MASKED_LM
from llmasos.pipelines.base import ENCODER, Pipeline

DEFAULT = object()


class TaskModelPipeline(Pipeline):
    """A pipeline whose backend is a task model it loads itself (not an LLM, Seq2SeqLM or Embedder)."""

    backend_kind = ""

    def __init__(self, backend: Any, **options: Any) -> None:
        self.model, self.kind = backend, ENCODER  # no generation options: only task options are accepted
        self.options = self._check_options(options)

    @classmethod
    def load_backend(cls, model: Any, dtype: str = "auto", device: str = "cpu") -> Any:
        raise NotImplementedError


class TaskHeadModel:
    """A checkpoint with a task head (`head`: one of llmasos.models.heads' kinds) and its tokenizer."""

    head = ""
    needs = "an encoder checkpoint with a task head"  # what the error for a decoder or T5 says to give instead

    def __init__(self, model: torch.nn.Module, tokenizer: Any, path: str | None = None) -> None:
        self.model, self.tokenizer, self.path = model, tokenizer, path

    @classmethod
    def load(cls, model: Any, dtype: str = "float32", device: str = "cpu"):
        from llmasos.models.heads import load_task_model
        from llmasos.spec import resolve_spec
        from llmasos.tokenizer import Tokenizer

        spec = resolve_spec(model, dtype=dtype, device=device)
        if spec.kind != "encoder":  # else the trainer's "objective 'mlm' is for encoders" would be the message
            use = "text-generation" if spec.kind == "decoder" else "text2text-generation"
            raise ModelLoadError(f"{spec.name} is a {spec.kind} model; this pipeline needs {cls.needs} (use "
                                 f"pipeline({use!r}, ...) for it)")
        task_model, _ = load_task_model(spec.path, cls.head, "float32" if spec.dtype in ("auto", None)
                                        else spec.dtype, spec.device or "cpu")
        return cls(task_model, Tokenizer.from_dir(spec.directory), spec.path)


class MaskedLM(TaskHeadModel):
    """A BertForMaskedLM checkpoint with its tokenizer: vocabulary logits at every position."""

    head = MASKED_LM
    needs = "a BERT masked-LM checkpoint (BertForMaskedLM)"

    @torch.no_grad()
    def logits(self, input_ids: list[int]) -> torch.Tensor:
        """(length, vocab) float32 logits of one unpadded input."""
        ids = torch.tensor([input_ids], device=next(self.model.parameters()).device)
        hidden = self.model(ids, torch.ones_like(ids), torch.zeros_like(ids))
        return self.model.compute_logits(hidden)[0].cpu()


class TextClassificationPipeline(TaskModelPipeline):
    """`clf("text")` -> `[{"label", "score"}]`; `clf(["a", "b"])` -> one dict each; a pair as
    `{"text": ..., "text_pair": ...}`. `top_k=k` gives the k best labels per input, sorted (None: all of them);
    `function_to_apply` is "softmax" (several labels), "sigmoid" (one label, or multi-label models) or "none"."""

    task = "text-classification"
    task_options = frozenset({"top_k", "function_to_apply", "truncation", "batch_size"})

    @classmethod
    def load_backend(cls, model: Any, dtype: str = "auto", device: str = "cpu") -> Any:
        from llmasos.classification import SequenceClassifier

        if isinstance(model, SequenceClassifier):
            return model
        return SequenceClassifier.load(model, dtype="float32" if dtype == "auto" else dtype, device=device)

    def __call__(self, inputs: str | dict | list, **options: Any) -> list:
        call_legacy = "top_k" not in options
        options = self.merged(options)
        legacy = "top_k" not in options
        top_k = options.get("top_k", 1)
        single = isinstance(inputs, (str, dict))
        items = [inputs] if single else list(inputs)
        texts, pairs = [], []
        for item in items:
            if isinstance(item, dict):
                if not isinstance(item.get("text"), str):
                    raise ValueError("a text-classification input dict needs 'text' (and optionally 'text_pair')")
                texts.append(item["text"])
                pairs.append(item.get("text_pair"))
            elif isinstance(item, str):
                texts.append(item)
                pairs.append(None)
            else:
                raise ValueError('text-classification inputs are strings or {"text", "text_pair"} dicts, or a list '
                                 "of them")
        logits = self.model.logits(texts, pairs, options.get("batch_size", 16), options.get("truncation", False))
        scores = self._scores(logits, options.get("function_to_apply"))
        labels = self.model.labels
        results: list = []
        for row in scores.tolist():
            if top_k == 1 and legacy:
                best = max(range(len(row)), key=row.__getitem__)
                results.append({"label": labels[best], "score": row[best]})
                continue
            entries = [{"label": labels[index], "score": score} for index, score in enumerate(row)]
            if not legacy:
                entries.sort(key=lambda entry: entry["score"], reverse=True)
                if top_k is not None:
                    entries = entries[:top_k]
            results.append(entries)
        if single:
            return [results[0]] if isinstance(inputs, str) and call_legacy else results[0]
        return results

    def _scores(self, logits: torch.Tensor, function: str | None) -> torch.Tensor:
        if function is None:
            problem = self.model.config.get("problem_type")
            if problem == "regression":
                function = "none"
            elif problem == "multi_label_classification" or logits.shape[-1] == 1:
                function = "sigmoid"
            else:
                function = "softmax"
        function = function.lower()
        if function == "softmax":
            return logits.double().softmax(-1)  # transformers scores in numpy float64... of float32 logits
        if function == "sigmoid":
            return torch.sigmoid(logits.double())
        if function == "none":
            return logits
        raise ValueError(f"function_to_apply must be softmax, sigmoid or none, got {function!r}")


class ZeroShotClassificationPipeline(TaskModelPipeline):
    """`zs("text", candidate_labels=["politics", "sport"])` -> `{"sequence", "labels", "scores"}`, labels sorted by
    score, with an NLI classifier (a label whose name starts with "entail"): each label becomes the hypothesis
    `hypothesis_template.format(label)` ("This example is {}."), scored by its entailment logit, softmaxed across the
    labels; with `multi_label=True` (or one label) entailment against contradiction for each label alone."""

    task = "zero-shot-classification"
    task_options = frozenset({"candidate_labels", "hypothesis_template", "multi_label", "batch_size"})

    @classmethod
    def load_backend(cls, model: Any, dtype: str = "auto", device: str = "cpu") -> Any:
        return TextClassificationPipeline.load_backend(model, dtype, device)

    def __call__(self, sequences: str | list[str], candidate_labels: str | list[str] | None = None,
                 **options: Any) -> dict | list[dict]:
        if candidate_labels is not None:
            options["candidate_labels"] = candidate_labels
        options = self.merged(options)
        labels = options.get("candidate_labels")
        if isinstance(labels, str):
            labels = [label.strip() for label in labels.split(",") if label.strip()]
        if not labels:
            raise ValueError("zero-shot-classification needs candidate_labels (a list, or a comma-separated string)")
        template = options.get("hypothesis_template", "This example is {}.")
        if template.format(labels[0]) == template:
            raise ValueError(f"hypothesis_template {template!r} has no {{}} for the label")
        names = [name.lower() for name in self.model.labels]
        entailment = next((index for index, name in enumerate(names) if name.startswith("entail")), -1)
        contradiction = -1 if entailment == 0 else 0
        texts = [sequences] if isinstance(sequences, str) else list(sequences)
        results = []
        for text in texts:
            logits = self.model.logits([text] * len(labels), [template.format(label) for label in labels],
                                       options.get("batch_size", 16), truncation=True).double()
            if options.get("multi_label", False) or len(labels) == 1:
                scores = logits[:, [contradiction, entailment]].softmax(-1)[:, 1]
            else:
                scores = logits[:, entailment].softmax(-1)
            order = sorted(range(len(labels)), key=lambda index: -float(scores[index]))
            results.append({"sequence": text, "labels": [labels[i] for i in order],
                            "scores": [float(scores[i]) for i in order]})
        return results[0] if isinstance(sequences, str) else results


class FillMaskPipeline(TaskModelPipeline):
    """`fill("Paris is the [MASK] of France.")` -> the `top_k` (5) likeliest tokens for the mask, each
    `{"score", "token", "token_str", "sequence"}`; several masks give a list per mask; `targets` limits the
    candidates to those words (a word not in the vocabulary stands for its first token)."""

    task = "fill-mask"
    task_options = frozenset({"top_k", "targets"})

    @classmethod
    def load_backend(cls, model: Any, dtype: str = "auto", device: str = "cpu") -> Any:
        if isinstance(model, MaskedLM):
            return model
        return MaskedLM.load(model, dtype="float32" if dtype == "auto" else dtype, device=device)

    def __call__(self, inputs: str | list[str], **options: Any) -> list:
        options = self.merged(options)
        tokenizer = self.model.tokenizer
        if tokenizer.mask_token_id is None:
            raise ValueError("the tokenizer defines no mask token, so fill-mask cannot run")
        target_ids = self._target_ids(options["targets"]) if options.get("targets") is not None else None
        top_k = options.get("top_k") or 5
        if target_ids is not None:
            top_k = min(top_k, len(target_ids))
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        outputs = [self._fill(text, top_k, target_ids) for text in texts]
        return outputs[0] if isinstance(inputs, str) or len(texts) == 1 else outputs

    def _fill(self, text: str, top_k: int, target_ids: list[int] | None) -> list:
        tokenizer = self.model.tokenizer
        input_ids = tokenizer.encode(text)
        positions = [index for index, token in enumerate(input_ids) if token == tokenizer.mask_token_id]
        if not positions:
            raise ValueError(f"no mask token ({tokenizer.mask_token}) in the input {text!r}")
        probs = self.model.logits(input_ids)[positions].softmax(-1)  # (num_masks, vocab)
        if target_ids is not None:
            probs = probs[:, target_ids]
        values, predictions = probs.topk(top_k)
        single_mask = len(positions) == 1
        result = []
        for position, row_values, row_predictions in zip(positions, values.tolist(), predictions.tolist(),
                                                         strict=True):
            row = []
            for value, prediction in zip(row_values, row_predictions, strict=True):
                token = target_ids[prediction] if target_ids is not None else prediction
                tokens = list(input_ids)
                tokens[position] = token
                tokens = [t for t in tokens if t != tokenizer.pad_token_id]
                row.append({"score": value, "token": token, "token_str": tokenizer.decode([token]),
                            "sequence": tokenizer.decode(tokens, skip_special_tokens=single_mask)})
            result.append(row)
        return result[0] if single_mask else result

    def _target_ids(self, targets: str | list[str]) -> list[int]:
        tokenizer = self.model.tokenizer
        ids: list[int] = []
        for target in [targets] if isinstance(targets, str) else targets:
            token_id = tokenizer.token_to_id(target)
            if token_id is None:
                pieces = tokenizer.encode(target, add_special_tokens=False)
                if not pieces:
                    continue
                token_id = pieces[0]
            ids.append(token_id)
        ids = list(dict.fromkeys(ids))
        if not ids:
            raise ValueError("targets: at least one target must be a word the tokenizer can encode")
        return ids


def checkpoint_architectures(model: Any) -> list[str]:
    """config.json's architectures of a library name or checkpoint directory (empty when it cannot be read)."""
    from llmasos.models.loader import read_json_file

    try:
        from llmasos.spec import resolve_spec

        directory = resolve_spec(model).directory if not isinstance(model, Path) else model
    except (ValueError, OSError, ModelLoadError):
        return []
    return list((read_json_file(Path(directory) / "config.json", required=False) or {}).get("architectures") or [])
