"""The trainer's bridge to task models: which objective a model can train with, the backbone of an encoder or
classifier checkpoint, a BERT from a config (pretraining from scratch), classification data with its labels, and
the task model (backbone plus head) a run trains."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from llmasos.errors import ModelLoadError
from llmasos.models.bert import ENCODER_FAMILIES, BertConfig, BertModel
from llmasos.models.heads import TaskModel, attach_head, load_backbone
from llmasos.models.loader import read_json_file
from llmasos.tokenizer import Tokenizer
from llmasos.train import tasks
from llmasos.train.arguments import TrainingArguments
from llmasos.train.dataset import Example
from llmasos.train.labels import build_classification_examples, label_names, read_labelled

if TYPE_CHECKING:
    from llmasos.train.trainer import LLMTrainer


def is_task_model(model: nn.Module) -> bool:
    return isinstance(model, TaskModel)


def is_encoder(model: nn.Module) -> bool:
    from llmasos.models.heads import BertTaskModel

    return isinstance(model, (BertModel, BertTaskModel))


def task_backbone(directory: Path, dtype: str) -> nn.Module | None:
    """The backbone of an encoder checkpoint or of a decoder saved as a classifier; None for a causal-LM checkpoint
    (the trainer's usual loader reads those)."""
    data = read_json_file(directory / "config.json", required=False) or {}
    architecture = (data.get("architectures") or [""])[0]
    if data.get("model_type") in ENCODER_FAMILIES or architecture.endswith("ForSequenceClassification"):
        return load_backbone(directory, dtype)
    return None


def bert_from_config(data: dict[str, Any], tokenizer: Tokenizer, seed: int) -> BertModel | None:
    """A randomly initialised BERT (transformers' initialisation) for a config.json dict of an encoder family, with
    every size written out and the tokenizer's vocabulary and pad id; None for other families."""
    if data.get("model_type") not in ENCODER_FAMILIES:
        return None
    data = dict(data)
    data.setdefault("vocab_size", tokenizer.vocab_size)
    if data["vocab_size"] < tokenizer.vocab_size:
        raise ValueError(f"config vocab_size {data['vocab_size']} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} tokens")
    if tokenizer.pad_token_id is not None:
        data.setdefault("pad_token_id", tokenizer.pad_token_id)
    data.setdefault("intermediate_size", 4 * int(data.get("hidden_size", 0) or 0) or None)
    data.setdefault("initializer_range", 0.02)
    config = BertConfig.from_dict(data)
    for key in ("hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id",
                "hidden_dropout_prob", "attention_probs_dropout_prob", "intermediate_size"):
        config.raw.setdefault(key, getattr(config, key))
    torch.manual_seed(seed)
    model = ENCODER_FAMILIES[config.model_type](config)
    std = float(config.raw["initializer_range"])
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if 0 <= config.pad_token_id < config.vocab_size:  # transformers zeroes the padding embedding
            model.embeddings.word_embeddings.weight[config.pad_token_id].zero_()
    return model.eval()


def objective_for(trainer: LLMTrainer, args: TrainingArguments) -> tasks.Objective:
    """The loop's objective for `args.objective`, refused when the model cannot learn it."""
    model, objective = trainer.model, args.objective
    encoder = is_encoder(model)
    if objective == tasks.CAUSAL:
        if encoder:
            raise ValueError("this is a BERT encoder: train it with objective='mlm' (masked LM) or "
                             "'classification', not the causal objective")
        if is_task_model(model):
            raise ValueError(f"this model was trained as a {model.task} model; its objective is {model.task!r}")
        return tasks.causal_objective()
    if objective == tasks.MASKED_LM:
        if not encoder:
            raise ValueError("objective='mlm' is BERT's masked language modelling, for encoders; a decoder trains "
                             "with objective='causal'")
        if args.fsdp:
            raise ValueError("fsdp is implemented for the causal objective only")
        mask_id = trainer.tokenizer.mask_token_id
        if mask_id is None:
            raise ValueError("objective='mlm' needs a tokenizer with a mask token (e.g. [MASK]); "
                             "`llmasos tokenizer train --wordpiece` makes one")
        return tasks.masked_lm_objective(sorted(trainer.tokenizer.all_special_ids), mask_id,
                                         trainer.tokenizer.vocab_size, args.mlm_probability, args.mlm_whole_word)
    if args.fsdp:
        raise ValueError("fsdp is implemented for the causal objective only")
    return tasks.classification_objective()


def source_labels(trainer: LLMTrainer) -> dict[int, str] | None:
    """The label names the model already has: its own (after training), else a classifier checkpoint's."""
    if trainer.labels is not None:
        return dict(enumerate(trainer.labels))
    if trainer.source_dir is None:
        return None
    data = read_json_file(trainer.source_dir / "config.json", required=False) or {}
    architecture = (data.get("architectures") or [""])[0]
    if not architecture.endswith("ForSequenceClassification") or not isinstance(data.get("id2label"), dict):
        return None
    return {int(key): str(value) for key, value in data["id2label"].items()}


def prepare_task_data(trainer: LLMTrainer, data: Any, args: TrainingArguments,
                      name: str) -> tuple[list[Example], list[str]]:
    """Classification records -> examples and the label names (the model's, or learnt from the training data)."""
    records = read_labelled(data, name)
    existing = source_labels(trainer)
    if name == "train_data" or existing is None:
        names = label_names(records, existing)
    else:
        names = [existing[index] for index in range(len(existing))]
    return build_classification_examples(records, trainer.tokenizer, names, trainer._max_seq_length(args)), names


def to_task_model(trainer: LLMTrainer, args: TrainingArguments) -> TaskModel:
    """The model a run of `args.objective` trains: the current one if it already is that task model, else the
    backbone with the head put on (its weights from the source checkpoint when it holds them, else initialised with
    the run's seed)."""
    model = trainer.model
    num_labels = len(trainer.labels) if trainer.labels is not None else None
    if is_task_model(model):
        if model.task != args.objective:
            raise ValueError(f"this model was trained as a {model.task} model; its objective is {model.task!r}")
        if num_labels is not None and getattr(model, "num_labels", num_labels) != num_labels:
            raise ValueError(f"this classifier has {model.num_labels} labels but the data has {num_labels}")
        return model
    if trainer.lora_settings is not None:
        raise ModelLoadError("add the task head before LoRA adapters: start from the base checkpoint")
    task_model, _ = attach_head(model, args.objective, trainer.source_dir, num_labels, seed=args.seed)
    return task_model
