"""LoRA: low-rank adapters on a model's linear projections, saved and loaded in PEFT's format.

`add_lora` wraps target layers in place (the wrapped layer keeps PEFT's names: `base_layer`, `lora_A`, `lora_B`);
`lora_state_dict` / `save_adapter` write adapter_model.safetensors + adapter_config.json that
`peft.PeftModel.from_pretrained` loads; `apply_adapter` merges a saved adapter into a model's weights for inference."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmasos.errors import ModelLoadError
from llmasos.models.base import CausalLM
from llmasos.models.gpt2 import Conv1D

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class LoRALayer(nn.Module):
    """y = base(x) + dropout(x) A^T B^T * (alpha / r); A starts random, B at zero, so training starts at the base."""

    def __init__(self, base_layer: nn.Linear | Conv1D, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)  # Conv1D stores its weight (in, out)
        in_features, out_features = _features(base_layer)
        weight = base_layer.weight
        self.lora_A = nn.Linear(in_features, r, bias=False, device=weight.device, dtype=weight.dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=weight.device, dtype=weight.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default initialisation
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """B @ A * scaling, laid out like the base layer's weight."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, in)
        return delta.T if self.fan_in_fan_out else delta


def _features(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    return layer.in_features, layer.out_features


def default_target_modules(model: CausalLM) -> list[str]:
    """Every linear projection inside the decoder layers (attention and MLP), by leaf name, as PEFT's
    'all-linear' picks them; the output head and embeddings are left alone."""
    names: list[str] = []
    for layer in model.decoder_layers():
        for name, module in layer.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, (nn.Linear, Conv1D)) and leaf not in names:
                names.append(leaf)
    return names


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == target or name.endswith("." + target) for target in targets)


def add_lora(model: CausalLM, r: int, alpha: float, dropout: float = 0.0,
             target_modules: list[str] | None = None) -> list[str]:
    """Freeze the model and wrap each target layer in a LoRALayer; returns the wrapped modules' paths."""
    targets = target_modules or default_target_modules(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for head_name in getattr(model, "head_modules", ()):  # a task model's new head is trained in full
        for param in getattr(model, head_name).parameters():
            param.requires_grad_(True)
    wrapped: list[str] = []
    head = model.output_embeddings()
    heads = tuple(getattr(model, "head_modules", ()))
    for name, module in list(model.named_modules()):
        if module is head or name.split(".")[0] in heads or not _matches(name, targets) \
                or not isinstance(module, (nn.Linear, Conv1D)):
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, LoRALayer(module, r, alpha, dropout))
        wrapped.append(name)
    if not wrapped:
        available = ", ".join(default_target_modules(model))
        raise ValueError(f"lora_target_modules {targets} match no linear layer of this {model.config.model_type} "
                         f"model; its projections are: {available}")
    return wrapped


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALayer)}


def lora_state_dict(state: dict[str, torch.Tensor],
                    modules_to_save: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The adapter matrices of a model's state dict under PEFT's saved names:
    base_model.model.<path>.lora_A.weight / lora_B.weight; and the weights of `modules_to_save` (a classifier's head,
    trained in full) as base_model.model.<path>.weight, as PEFT saves them."""
    saved = tuple(f"{name}." for name in modules_to_save or ())
    return {f"{PEFT_PREFIX}{name}": tensor.detach().cpu().contiguous() for name, tensor in state.items()
            if ".lora_A." in name or ".lora_B." in name or name.startswith(saved)}


def adapter_config(model: nn.Module, r: int, alpha: float, dropout: float, base_model: str | None) -> dict[str, Any]:
    """adapter_config.json; a task model's head goes in modules_to_save (PEFT's SEQ_CLS task type)."""
    layers = lora_layers(model)
    targets = sorted({name.rsplit(".", 1)[-1] for name in layers})
    modules_to_save = list(getattr(model, "head_modules", ())) or None
    return {
        "peft_type": "LORA", "task_type": "SEQ_CLS" if getattr(model, "task", "") == "classification" else "CAUSAL_LM",
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": targets, "base_model_name_or_path": base_model, "bias": "none",
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()), "inference_mode": True,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": modules_to_save,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
        "revision": None,
    }


def save_adapter(state: dict[str, torch.Tensor], directory: Path, config: dict[str, Any]) -> None:
    """adapter_model.safetensors (from a model's state dict) and adapter_config.json, as PEFT writes them."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(lora_state_dict(state, config.get("modules_to_save")), str(directory / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every LoRALayer into its base layer's weight and put the plain layer back (HF names again)."""
    for name, layer in lora_layers(model).items():
        base = layer.base_layer
        base.weight.add_(layer.delta_weight().to(base.weight.dtype))
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, base)


def adapter_to_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's saved names back to our parameter names (the inverse of `lora_state_dict`)."""
    return {(name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name): tensor
            for name, tensor in tensors.items()}


def read_adapter(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """adapter_config.json and adapter_model.safetensors of a PEFT LoRA adapter, checked."""
    directory = Path(directory).expanduser()
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ModelLoadError(f"{path} not found: a LoRA adapter directory needs {ADAPTER_CONFIG} and "
                                 f"{ADAPTER_WEIGHTS} (as PEFT's save_pretrained writes them)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{config_path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise ModelLoadError(f"{config_path}: only LoRA adapters are supported, got peft_type "
                             f"{config.get('peft_type') if isinstance(config, dict) else None!r}")
    if config.get("use_dora"):
        raise ModelLoadError(f"{config_path}: DoRA adapters (use_dora: true) are not supported")
    try:
        tensors = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types on corrupt files
        raise ModelLoadError(f"{weights_path} is not a valid safetensors file: {exc}") from None
    return config, tensors


@torch.no_grad()
def apply_adapter(model: CausalLM, directory: str | Path) -> list[str]:
    """Merge a PEFT LoRA adapter into `model`'s weights in place (W += B @ A * alpha / r); returns the merged layer
    paths. The model then runs at full speed with no adapter code at all (what a Modelfile's ADAPTER line uses)."""
    config, tensors = read_adapter(directory)
    r, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    modules = dict(model.named_modules())
    merged: list[str] = []
    for key, a_weight in sorted(tensors.items()):
        if ".lora_A." not in key:
            continue
        path = key.split(".lora_A.")[0]
        path = path[len(PEFT_PREFIX):] if path.startswith(PEFT_PREFIX) else path
        b_key = key.replace(".lora_A.", ".lora_B.")
        module = modules.get(path)
        if module is None or b_key not in tensors or not isinstance(module, (nn.Linear, Conv1D)):
            raise ModelLoadError(f"{directory}: adapter tensor {key!r} has no matching linear layer {path!r} in this "
                                 f"{model.config.model_type} model; was it trained on another base model?")
        leaf_rank = next((v for k, v in rank_pattern.items() if _matches(path, [k])), r)
        leaf_alpha = next((v for k, v in alpha_pattern.items() if _matches(path, [k])), alpha)
        scaling = leaf_alpha / math.sqrt(leaf_rank) if config.get("use_rslora") else leaf_alpha / leaf_rank
        delta = tensors[b_key].float() @ a_weight.float() * scaling  # (out, in)
        if isinstance(module, Conv1D):
            delta = delta.T
        if delta.shape != module.weight.shape:
            raise ModelLoadError(f"{directory}: adapter for {path!r} has shape {list(delta.shape)} but the layer's "
                                 f"weight is {list(module.weight.shape)}; was it trained on another base model?")
        module.weight.add_(delta.to(device=module.weight.device, dtype=module.weight.dtype))
        merged.append(path)
    if not merged:
        raise ModelLoadError(f"{directory}: the adapter holds no LoRA weights")
    return merged
