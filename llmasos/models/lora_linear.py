"""Unmerged LoRA at inference: a linear layer (plain, Conv1D, oneDNN-packed or quantized) wrapped so that one batch
can carry rows for several adapters and rows for none — y = base(x), then y[rows of a] += (x[rows of a] A_a^T) B_a^T
* scale_a for each adapter a present, one pair of matmuls per adapter segment (Punica's segmented LoRA, in PyTorch).

The runner sorts a step's tokens by adapter slot, so each adapter's rows are one contiguous slice, and hands the
slices to the shared `LoRABatch` before the forward; a batch without adapter rows leaves it empty and every wrapped
layer is then exactly its base layer plus one attribute test."""

from __future__ import annotations

import torch
from torch import nn

from llmasos.models.gpt2 import Conv1D
from llmasos.models.packed_linear import PackedLinear
from llmasos.models.quantization import QuantizedLinear

LINEAR_TYPES = (nn.Linear, Conv1D, PackedLinear, QuantizedLinear)


class LoRABatch:
    """The current step's adapter segments: (slot, first row, end row), rows sorted by slot; empty = plain path.
    One object per engine, shared by every LoRALinear and set by the runner around each forward."""

    def __init__(self) -> None:
        self.segments: list[tuple[int, int, int]] = []


class LoRALinear(nn.Module):
    """A base linear plus per-slot adapter weights: slot -> (A^T (in, r), (B * scale)^T (r, out)) or absent."""

    def __init__(self, base_layer: nn.Module, batch: LoRABatch) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_features(base_layer)
        self.batch = batch
        self.slots: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # plain tensors, not parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        segments = self.batch.segments
        if not segments:
            return out
        flat_x = x.reshape(-1, self.in_features)  # (num_tokens, in)
        flat_out = out.view(-1, self.out_features)  # (num_tokens, out), the same storage
        for slot, start, end in segments:
            weights = self.slots.get(slot)
            if weights is not None:  # an adapter need not target every layer
                a_t, b_t = weights
                flat_out[start:end].addmm_(torch.mm(flat_x[start:end], a_t), b_t)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, lora_slots={sorted(self.slots)}"


def linear_features(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of any linear layer type the families use."""
    if isinstance(layer, Conv1D):  # weight stored (in, out)
        return layer.weight.shape[0], layer.weight.shape[1]
    return layer.in_features, layer.out_features


def lora_targets(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Every linear layer inside the decoder layers by module path (HF names), with its (in, out) features: what an
    adapter may target. The output head and the embeddings are not targets."""
    layers = model.decoder_layers()
    prefix = next(name for name, module in model.named_modules() if module is layers)
    targets: dict[str, tuple[int, int]] = {}
    for name, module in layers.named_modules():
        if isinstance(module, LoRALinear):
            targets[f"{prefix}.{name}"] = (module.in_features, module.out_features)
        elif isinstance(module, LINEAR_TYPES) and not name.endswith(".base_layer"):
            targets[f"{prefix}.{name}"] = linear_features(module)
    return targets


def install_lora_layers(model: nn.Module, batch: LoRABatch) -> dict[str, LoRALinear]:
    """Wrap every target linear of `model` in a LoRALinear sharing `batch`, in place; returns them by path."""
    wrapped: dict[str, LoRALinear] = {}
    for path in lora_targets(model):
        module = model.get_submodule(path)
        if not isinstance(module, LoRALinear):
            parent_name, _, leaf = path.rpartition(".")
            module = LoRALinear(module, batch)
            setattr(model.get_submodule(parent_name), leaf, module)
        wrapped[path] = module
    return wrapped
