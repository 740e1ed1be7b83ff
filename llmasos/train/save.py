"""Export a trained model as a Hugging Face checkpoint directory: config.json, model.safetensors, tokenizer files,
chat template and generation_config.json, loadable by transformers' AutoModelForCausalLM and by `LLM.load`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from llmasos.models.config import ModelConfig
from llmasos.tokenizer import Tokenizer
from llmasos.train.dataset import end_of_turn_token_id

# transformers' class for each family (our mistral reuses the Llama code but must be named as Mistral).
ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gpt2": "GPT2LMHeadModel",
}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def stored_dtype(config: ModelConfig, directory: Path) -> torch.dtype | None:
    """The dtype a checkpoint is stored in (config.json's dtype, else its first tensor's); None if neither says."""
    from safetensors import safe_open

    from llmasos.models.loader import DTYPES, weight_files

    if config.torch_dtype in DTYPES:
        return DTYPES[config.torch_dtype]
    try:
        files = weight_files(directory)
        with safe_open(str(files[0]), framework="pt") as handle:
            for key in handle.keys():
                dtype = handle.get_slice(key).get_dtype()
                return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(dtype)
    except (OSError, IndexError, ValueError):
        return None
    return None


def hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig,
                  dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A model's state dict under Hugging Face names (ours already are HF's): the tied output head left out as HF
    does, LoRA wrappers looked through to their base layers, adapter matrices excluded."""
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if ".lora_A." in name or ".lora_B." in name:
            continue
        tensor = tensor.detach()
        if dtype is not None:
            tensor = tensor.to(dtype)
        tensors[name.replace(".base_layer.", ".")] = tensor.cpu().contiguous()
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    return tensors


def hf_config(config: ModelConfig, dtype: torch.dtype, tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """The original config.json dict, with architectures, dtype and special token ids brought up to date."""
    data = dict(config.raw)
    data["model_type"] = config.model_type
    data.setdefault("architectures", [ARCHITECTURES.get(config.model_type, "LlamaForCausalLM")])
    data["dtype"] = DTYPE_NAMES.get(dtype, "float32")
    data["torch_dtype"] = data["dtype"]  # transformers < 5 reads this spelling
    if tokenizer is not None:
        for key, value in (("bos_token_id", tokenizer.bos_token_id), ("eos_token_id", tokenizer.eos_token_id),
                           ("pad_token_id", tokenizer.pad_token_id)):
            if data.get(key) is None and value is not None:
                data[key] = value
    return data


def generation_config(config_data: dict[str, Any], tokenizer: Tokenizer | None,
                      existing: dict[str, Any] | None = None) -> dict[str, Any]:
    """generation_config.json: the source model's, plus the chat template's end-of-turn token as an EOS, so that
    a chat reply stops where training taught it to."""
    data = dict(existing or {})
    eos = data.get("eos_token_id", config_data.get("eos_token_id"))
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if tokenizer is not None:
        for token_id in (tokenizer.eos_token_id, end_of_turn_token_id(tokenizer)):
            if token_id is not None and token_id not in eos_ids:
                eos_ids.append(token_id)
    for key in ("bos_token_id", "pad_token_id"):
        if data.get(key) is None and config_data.get(key) is not None:
            data[key] = config_data[key]
    if eos_ids:
        data["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    data.setdefault("_from_model_config", False)
    return data


def export_model(state: dict[str, torch.Tensor], config: ModelConfig, tokenizer: Tokenizer | None,
                 directory: str | Path, *, dtype: torch.dtype | None = None,
                 existing_generation_config: dict[str, Any] | None = None) -> Path:
    """Write a complete, loadable checkpoint directory from a model's state dict (`model.state_dict()`; LoRA
    matrices in it are ignored: merge them first to keep them)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = dtype or next(iter(state.values())).dtype
    save_file(hf_state_dict(state, config, dtype), str(directory / "model.safetensors"), metadata={"format": "pt"})
    config_data = hf_config(config, dtype, tokenizer)
    write_json(directory / "config.json", config_data)
    write_json(directory / "generation_config.json",
               generation_config(config_data, tokenizer, existing_generation_config))
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def task_config(model: torch.nn.Module, dtype: torch.dtype, tokenizer: Tokenizer | None,
                labels: list[str] | None = None) -> dict[str, Any]:
    """config.json of a task model (classifier, masked LM): transformers' class in `architectures`, and for a
    classifier id2label / label2id (what AutoModelForSequenceClassification sizes its head from) and a pad id (a
    decoder classifier pools the last token that is not padding)."""
    from llmasos.models.heads import DECODER_CLASSIFIERS, BertTaskModel, encoder_architecture

    config = model.config
    data = hf_config(config, dtype, tokenizer)
    for key in ("id2label", "label2id", "num_labels", "problem_type"):
        data.pop(key, None)
    if isinstance(model, BertTaskModel):
        data["architectures"] = [encoder_architecture(config.model_type, model.task)]
    else:
        data["architectures"] = [DECODER_CLASSIFIERS[config.model_type]]
        if data.get("pad_token_id") is None:
            data["pad_token_id"] = data.get("eos_token_id") if isinstance(data.get("eos_token_id"), int) else 0
    if labels is not None:
        data["id2label"] = {str(index): name for index, name in enumerate(labels)}
        data["label2id"] = {name: index for index, name in enumerate(labels)}
        data["problem_type"] = "single_label_classification"
    return data


def export_task_model(model: torch.nn.Module, tokenizer: Tokenizer | None, directory: str | Path, *,
                      labels: list[str] | None = None, dtype: torch.dtype | None = None,
                      state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a task model (a `models.heads` TaskModel) as a checkpoint AutoModelForSequenceClassification /
    AutoModelForMaskedLM loads: its state dict under transformers' names (the tied MLM decoder left out)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state is None else state
    dtype = dtype or next(iter(state.values())).dtype
    tensors = hf_state_dict(state, model.config, dtype)
    if getattr(model, "tied", False):
        tensors.pop("cls.predictions.decoder.weight", None)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    write_json(directory / "config.json", task_config(model, dtype, tokenizer, labels))
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory
