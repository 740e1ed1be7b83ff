"""bf16 linear layers with weights pre-packed once for oneDNN on CPU — the blocked layout and kernel
(`mkldnn._linear_pointwise`, AVX-512 BF16 dot products) that torch.compile's CPU weight freezing uses. A plain bf16
F.linear re-lays out the weight on every call; for one-token decode steps the packed kernel is ~2x faster with
bit-identical results (benchmarks/packed_linear.py)."""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def packing_supported(dtype: torch.dtype, device: torch.device) -> bool:
    if device.type != "cpu" or dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(supported()) if supported is not None else False
    except RuntimeError:
        return False


class PackedLinear(nn.Module):
    """Inference-only stand-in for an nn.Linear: same inputs and outputs, weight held in oneDNN's packed layout."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.dtype = weight.dtype
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight)  # an opaque tensor, not a parameter
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.num_weight_bytes = weight.numel() * weight.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed_weight, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"


def pack_linear_layers(model: nn.Module) -> int:
    """Replace every bf16 nn.Linear of an inference model by a PackedLinear, in place; returns how many. The
    output projection is packed too (a tied one gets its own packed copy: the embedding keeps its table)."""
    count = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16:
                setattr(module, child_name, PackedLinear(child))
                count += 1
    log.debug("packed %d linear layers of %s for oneDNN", count, type(model).__name__)
    return count


def packed_bytes(model: nn.Module) -> int:
    """Bytes held in kernel-packed weights that model.parameters() and buffers do not show (oneDNN, fbgemm)."""
    return sum(m.num_weight_bytes if isinstance(m, PackedLinear) else getattr(m, "num_opaque_bytes", 0)
               for m in model.modules())
