"""Weight-only int8 / int4 quantization of a model's linear layers, run by PyTorch's own kernels on CPU and CUDA.

int8: symmetric, one scale per output channel, w = q * scale (q in -127..127); `torch._weight_int8pack_mm`.
int4: asymmetric, one scale and zero per group of `group_size` input channels in the gpt-fast / torchao convention
w = (q - 8) * scale + zero (q in 0..15); `torch._weight_int4pack_mm_for_cpu` on CPU, `torch._weight_int4pack_mm` on
CUDA. Scales and zeros are bfloat16 and the kernels run on bfloat16 activations (converted from and back to the
model's dtype around the call): torch's CPU kernels are vectorized for bfloat16 only (float32 runs 10-40x slower) and
the CUDA int4 kernel takes nothing else. CUDA int8 is the exception: its kernel computes in float32 whatever the input.

Weights are quantized into a device-independent layout (`QuantizedTensors`, what checkpoints store) and packed for
the kernel of the device a layer runs on. Shapes a kernel rejects are zero-padded rather than left unquantized:
int4 pads in_features to a multiple of the group size when quantizing (stored padded; activations get the same zero
columns at run time) and out_features to a multiple of 16 when packing (the CPU packer's rule; CUDA needs 8); int8
pads in_features to a multiple of 16 when packing (torch's CPU bfloat16 kernel returns garbage otherwise).

`quantize_model` also quantizes the output head, to int8 whatever the method (llama.cpp keeps its output tensor at 8
bits too); a head tied to the input embeddings then serves the embedding lookup as well (`QuantizedEmbedding`)."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmasos.models.gpt2 import Conv1D

logger = logging.getLogger(__name__)

METHODS = ("int8", "int4", "w8a8")
# w8a8 stores exactly what int8 stores (int8 weights, one scale per output channel); on CPU its layers also quantize
# their activations per call (dynamic, per tensor) and run fbgemm's int8 x int8 GEMM — llama.cpp's Q8_0 does the same
# — about 2x faster than bf16 for one-token decode, where torch's weight-only int8 kernel is not
# (benchmarks/quantized_matmul.py). Elsewhere (CUDA) w8a8 layers run as int8.
STORED_METHOD = {"w8a8": "int8"}
GROUP_SIZES = (32, 64, 128)
HEAD_METHOD = "int8"
SCALE_DTYPE = torch.bfloat16
INT8_IN_MULTIPLE = 16
INT4_OUT_MULTIPLE = 16
# Up to this many rows the int8 kernels run; above, the weight is converted (in blocks) for a float GEMM. torch's CPU
# int8 kernel is a matrix-vector product per row (its time grows linearly with rows: 1.5x faster than bf16 F.linear
# at 1 row, slower than converting from about 12), and its CUDA kernel is one thread per output with no tiling.
CPU_INT8_MAX_KERNEL_ROWS = 12
CUDA_INT8_MAX_KERNEL_ROWS = 16
QUANTIZE_BLOCK_ELEMENTS = 1 << 24
DEQUANTIZE_BLOCK_ELEMENTS = 1 << 21
_CUDA_INT8_KERNEL = torch._C._dispatch_has_kernel_for_dispatch_key("aten::_weight_int8pack_mm", "CUDA")


def check_method(method: str, group_size: int) -> None:
    if method not in METHODS:
        raise ValueError(f"quantization method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size!r}")


@dataclass
class QuantizedTensors:
    """A quantized weight in the device-independent layout checkpoints store.

    int8: qweight int8 (out, in), scales (out,). int4: qweight uint8 (out, padded_in / 2) with element 2j in the high
    nibble and 2j+1 in the low one (the layout `_convert_weight_to_int4pack` reads), scales and zeros
    (out, padded_in / group_size). Scales and zeros are bfloat16."""

    method: str
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None
    group_size: int | None = None

    def dequantize(self, in_features: int) -> torch.Tensor:
        """The float32 weight (out, in) these tensors represent."""
        if self.method == "int8":
            return self.qweight.float() * self.scales.float()[:, None]
        q = unpack_nibbles(self.qweight).float()  # (out, padded_in)
        groups = q.view(q.shape[0], -1, self.group_size)
        weight = (groups - 8) * self.scales.float()[..., None] + self.zeros.float()[..., None]
        return weight.view(q.shape[0], -1)[:, :in_features]


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(rows, cols) integers in 0..15 -> (rows, cols / 2) uint8, element 2j in the high nibble."""
    q = q.to(torch.uint8)
    return (q[:, ::2] << 4) | q[:, 1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(rows, cols / 2) uint8 -> (rows, cols) uint8 in 0..15; the inverse of `pack_nibbles`."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).view(packed.shape[0], -1)


def quantize_weight(weight: torch.Tensor, method: str, group_size: int = 32) -> QuantizedTensors:
    """Quantize a float weight (out, in). Scales and zeros are rounded to bfloat16 first and the integers computed
    against the rounded values, so the stored tensors are exactly what the kernels use. Works through the rows in
    blocks, so a large head never has more than ~16M float32 temporaries alive."""
    check_method(method, group_size)
    method = STORED_METHOD.get(method, method)
    block = max(1, QUANTIZE_BLOCK_ELEMENTS // max(weight.shape[1], 1))
    parts = [_quantize_rows(rows, method, group_size) for rows in weight.detach().split(block)]
    if len(parts) == 1:
        return parts[0]
    zeros = torch.cat([part.zeros for part in parts]) if method == "int4" else None
    return QuantizedTensors(method, torch.cat([part.qweight for part in parts]),
                            torch.cat([part.scales for part in parts]), zeros, parts[0].group_size)


def _quantize_rows(weight: torch.Tensor, method: str, group_size: int) -> QuantizedTensors:
    w = weight.float()
    if method == "int8":
        scales = (w.abs().amax(dim=1) / 127).to(SCALE_DTYPE)
        divisor = scales.float().masked_fill(scales == 0, 1.0)
        q = torch.round(w / divisor[:, None]).clamp_(-127, 127).to(torch.int8)
        return QuantizedTensors("int8", q, scales)
    out_features, in_features = w.shape
    pad = -in_features % group_size
    if pad:
        w = F.pad(w, (0, pad))
    groups = w.view(out_features, -1, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # (out, num_groups)
    scales = ((high - low).clamp(min=1e-6) / 15).to(SCALE_DTYPE)
    zeros = (low + scales.float() * 8).to(SCALE_DTYPE)
    s, z = scales.float()[..., None], zeros.float()[..., None]
    q = torch.round((groups - (z - 8 * s)) / s).clamp_(0, 15).view(out_features, -1)
    return QuantizedTensors("int4", pack_nibbles(q), scales, zeros, group_size)


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W held quantized and packed for the kernel of its device; x of any leading shape.

    Build with `from_float` or `from_quantized`. The packed layout belongs to one device, so move a model before
    quantizing it. `dtype` is the activations' (and the bias's) dtype."""

    def __init__(self, in_features: int, out_features: int, method: str, group_size: int | None,
                 packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.method, self.group_size, self.dtype = method, group_size, dtype
        self.kernel_in_features = packed.shape[1] if method == "int8" else scales.shape[0] * group_size
        self.register_buffer("packed", packed)  # int8 (out, padded_in), or the int4 kernel's layout
        self.register_buffer("scales", scales)  # int8 (out,); int4 scales_and_zeros (groups, padded_out, 2)
        self.register_buffer("bias", bias)
        self.dynamic = None  # fbgemm's packed int8 weight, when activations are quantized too (w8a8 on CPU)
        self.num_opaque_bytes = 0

    def enable_dynamic_activations(self) -> bool:
        """Run this int8 layer as w8a8 (activations quantized per call) where fbgemm's kernel exists; True if so."""
        if self.method != "int8" or self.packed.device.type != "cpu" or not dynamic_int8_supported():
            return False
        try:
            with warnings.catch_warnings():  # the quantized-tensor constructors are deprecated, still the only way in
                warnings.simplefilter("ignore")
                weight = torch._make_per_channel_quantized_tensor(
                    self.packed[:, :self.in_features].contiguous(), self.scales.double(),
                    torch.zeros(self.out_features, dtype=torch.long), 0)
                self.dynamic = torch.ops.quantized.linear_prepack(weight, None)
        except (AttributeError, RuntimeError) as exc:  # a torch without them: run as weight-only int8
            logger.warning("w8a8 is not available in this torch (%s); running int8 weight-only", exc)
            return False
        self.num_opaque_bytes = self.out_features * self.in_features
        return True

    def num_weights(self) -> int:
        """The parameters this layer stands for (its float weight and bias): not torch parameters once quantized."""
        return self.in_features * self.out_features + (0 if self.bias is None else self.bias.numel())

    def release_int8_copy(self) -> None:
        """Drop the int8 weight a w8a8 layer keeps beside fbgemm's packed one (quantized_tensors reads it back from
        fbgemm); a head whose rows an embedding reads keeps it."""
        if self.dynamic is not None and self.packed.numel():
            self.packed = torch.empty(0, dtype=torch.int8)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, method: str,
                   group_size: int = 32) -> QuantizedLinear:
        """From an nn.Linear-layout weight (out, in), on its device; activations in the weight's dtype."""
        tensors = quantize_weight(weight, method, group_size)
        return cls.from_quantized(tensors, weight.shape[1], bias, weight.dtype, weight.device)

    @classmethod
    def from_quantized(cls, tensors: QuantizedTensors, in_features: int, bias: torch.Tensor | None,
                       dtype: torch.dtype, device: torch.device | str) -> QuantizedLinear:
        """Pack stored tensors for the kernel of `device`."""
        device = torch.device(device)
        out_features = tensors.qweight.shape[0]
        bias = None if bias is None else bias.detach().to(device=device, dtype=dtype).clone()
        if tensors.method == "int8":
            q = tensors.qweight.to(device)
            pad = -q.shape[1] % INT8_IN_MULTIPLE
            packed = F.pad(q, (0, pad)) if pad else q.contiguous()
            scales = tensors.scales.to(device, SCALE_DTYPE).contiguous()
            return cls(in_features, out_features, "int8", None, packed, scales, bias, dtype)
        q = unpack_nibbles(tensors.qweight.to(device))  # (out, padded_in)
        scales_and_zeros = torch.stack([tensors.scales, tensors.zeros], dim=-1).to(device, SCALE_DTYPE)
        pad = -out_features % INT4_OUT_MULTIPLE
        if pad:  # extra rows: q = 8 with scale 0 and zero 0 dequantize to 0
            q = F.pad(q, (0, 0, 0, pad), value=8)
            scales_and_zeros = F.pad(scales_and_zeros, (0, 0, 0, 0, 0, pad))
        scales_and_zeros = scales_and_zeros.transpose(0, 1).contiguous()  # (groups, padded_out, 2)
        if device.type == "cuda":
            padded_in = q.shape[1]
            inner_k_tiles = 8 if padded_in % 128 == 0 else 4 if padded_in % 64 == 0 else 2
            packed = torch._convert_weight_to_int4pack(pack_nibbles(q).contiguous(), inner_k_tiles)
        else:
            packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        return cls(in_features, out_features, "int4", tensors.group_size, packed, scales_and_zeros, bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leading, dtype = x.shape[:-1], x.dtype
        x = x.reshape(-1, x.shape[-1])  # (rows, in_features)
        if self.kernel_in_features != self.in_features:
            x = F.pad(x, (0, self.kernel_in_features - self.in_features))
        out = self._matmul(x)  # (rows, padded_out)
        if out.shape[1] != self.out_features:
            out = out[:, :self.out_features]
        out = out.to(dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*leading, self.out_features)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        rows, cuda = x.shape[0], x.device.type == "cuda"
        if self.dynamic is not None:
            return torch.ops.quantized.linear_dynamic(x[:, :self.in_features].float().contiguous(), self.dynamic,
                                                      _REDUCE_RANGE)
        if self.method == "int8":
            compute = x.dtype if cuda else torch.bfloat16
            x = x.to(compute).contiguous()
            scales = self.scales.to(compute)
            if rows <= (CUDA_INT8_MAX_KERNEL_ROWS if cuda else CPU_INT8_MAX_KERNEL_ROWS) and (_CUDA_INT8_KERNEL
                                                                                                or not cuda):
                return torch._weight_int8pack_mm(x, self.packed, scales)
            if cuda:
                return F.linear(x, self.packed.to(compute)) * scales
            # Converted a block of output channels at a time: a cache-sized temporary instead of the whole weight
            # (a fresh 272 MB bf16 copy of Qwen2-0.5B's head costs 3x its GEMM in page faults alone).
            out = torch.empty(rows, self.packed.shape[0], dtype=compute, device=x.device)
            block = max(1, DEQUANTIZE_BLOCK_ELEMENTS // self.packed.shape[1])
            for start in range(0, self.packed.shape[0], block):
                out[:, start:start + block] = F.linear(x, self.packed[start:start + block].to(compute))
            return out.mul_(scales)
        x = x.to(torch.bfloat16).contiguous()
        if cuda:
            return torch._weight_int4pack_mm(x, self.packed, self.group_size, self.scales)
        return torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales)

    def quantized_tensors(self) -> QuantizedTensors:
        """This layer's weight in the stored, device-independent layout (on its device)."""
        if self.method == "int8" and self.dynamic is not None and not self.packed.numel():
            weight = torch.ops.quantized.linear_unpack(self.dynamic)[0]
            return QuantizedTensors("int8", weight.int_repr().contiguous(), self.scales)
        if self.method == "int8":
            return QuantizedTensors("int8", self.packed[:, :self.in_features].contiguous(), self.scales)
        q = self._unpack_int4()[:self.out_features]
        scales_and_zeros = self.scales.transpose(0, 1)[:self.out_features]  # (out, groups, 2)
        return QuantizedTensors("int4", pack_nibbles(q), scales_and_zeros[..., 0].contiguous(),
                                scales_and_zeros[..., 1].contiguous(), self.group_size)

    def _unpack_int4(self) -> torch.Tensor:
        """The integers (padded_out, padded_in) read back through the kernel itself with scale 1 and zero 8, since the
        packed layout differs by device and CPU instruction set. On CPU each float32 row of the probe reads 6 input
        channels at once as base-16 digits (sums stay exact below 2**24); on CUDA (bfloat16 output) one."""
        padded_in, padded_out = self.kernel_in_features, self.scales.shape[1]
        device = self.packed.device
        cuda = device.type == "cuda"
        digits, probe_dtype = (1, torch.bfloat16) if cuda else (6, torch.float32)
        identity = torch.tensor([1.0, 8.0], dtype=probe_dtype, device=device).expand(
            padded_in // self.group_size, padded_out, 2).contiguous()
        num_rows = -(-padded_in // digits)
        chunks = []
        for first in range(0, num_rows, 1024):  # bounded probe size (one row per input channel on CUDA)
            last = min(first + 1024, num_rows)
            columns = torch.arange(first * digits, min(last * digits, padded_in), device=device)
            probe = torch.zeros(last - first, padded_in, dtype=probe_dtype, device=device)
            probe[columns // digits - first, columns] = (16.0 ** (columns % digits)).to(probe_dtype)
            mm = torch._weight_int4pack_mm if cuda else torch._weight_int4pack_mm_for_cpu
            chunks.append(mm(probe, self.packed, self.group_size, identity))
        values = torch.cat(chunks).float().round().long()  # (num_rows, padded_out)
        nibbles = torch.stack([(values >> (4 * d)) & 0xF for d in range(digits)], dim=1)  # (num_rows, digits, out)
        return nibbles.flatten(0, 1)[:padded_in].T.to(torch.uint8).contiguous()

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.method == "int4" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}{group}, "
                f"bias={self.bias is not None}")


class QuantizedEmbedding(nn.Module):
    """An input embedding read from the int8 output head it is tied to: row i is q[i] * scale[i]."""

    def __init__(self, head: QuantizedLinear) -> None:
        super().__init__()
        assert head.method == "int8" and head.bias is None
        self.embedding_dim, self.dtype = head.in_features, head.dtype
        self.register_buffer("packed", head.packed)  # the head's own tensors, shared
        self.register_buffer("scales", head.scales)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = input_ids.reshape(-1)
        rows = self.packed.index_select(0, flat)[:, :self.embedding_dim]  # (tokens, dim) int8
        out = rows.to(self.dtype) * self.scales.index_select(0, flat).to(self.dtype)[:, None]
        return out.view(*input_ids.shape, self.embedding_dim)


def float_weight(module: nn.Module) -> torch.Tensor:
    """The nn.Linear-layout (out, in) weight of a linear layer; GPT-2's Conv1D stores it transposed."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def dequantized_weight(layer: QuantizedLinear) -> torch.Tensor:
    """The float32 weight (out, in) a quantized layer represents: what its kernel multiplies by, up to rounding."""
    return layer.quantized_tensors().dequantize(layer.in_features)


def module_path(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, candidate in model.named_modules(remove_duplicate=False) if candidate is module)


def quantization_targets(model: nn.Module, include_head: bool = True) -> dict[str, str]:
    """Module path -> role: "layer" for every linear layer inside the decoder layers (attention and MLP projections,
    fused or not, GPT-2's Conv1D too), "head" for the output head."""
    prefix = module_path(model, model.decoder_layers()) + "."
    targets = {name: "layer" for name, module in model.named_modules()
               if name.startswith(prefix) and isinstance(module, (nn.Linear, Conv1D, QuantizedLinear))}
    if include_head:
        targets[module_path(model, model.output_embeddings())] = "head"
    return targets


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def tie_quantized_embeddings(model: nn.Module) -> None:
    """Serve the embedding lookup from the int8 head (for a model whose config ties the two)."""
    head = model.output_embeddings()
    set_module(model, module_path(model, model.input_embeddings()), QuantizedEmbedding(head))


@torch.no_grad()
def quantize_model(model: nn.Module, method: str, group_size: int = 32, include_head: bool = True) -> nn.Module:
    """Replace, in place, every linear layer inside the decoder layers with a QuantizedLinear of `method` ("int8", or
    "int4" with `group_size` 32, 64 or 128), and the output head with an int8 one (`include_head`); returns the model.
    One layer at a time: each float weight is released as soon as its quantized form exists. A model must be on its
    device (and in its dtype) before, since packing is per device.

    The head is int8 whatever the method: on the bundled model an int8 head moves perplexity by < 0.01% where an
    int4 one adds 0.2-0.25% (on CPU an int4 head runs ~2x faster than int8 for one-token decode: see
    benchmarks/quantized_matmul.py). A head tied to the embeddings keeps them tied: the lookup reads the int8 rows,
    so no float copy of the table stays."""
    check_method(method, group_size)
    layer_storage = STORED_METHOD.get(method, method)
    head = model.output_embeddings()
    tied = include_head and not isinstance(head, QuantizedLinear) and (
        float_weight(head) is model.input_embeddings().weight)
    for path, role in quantization_targets(model, include_head).items():
        module = model.get_submodule(path)
        if isinstance(module, QuantizedLinear):
            continue
        layer_method = HEAD_METHOD if role == "head" else layer_storage
        set_module(model, path, QuantizedLinear.from_float(float_weight(module), module.bias, layer_method, group_size))
    if tied:
        tie_quantized_embeddings(model)
    if method == "w8a8":
        use_dynamic_activations(model)
    model.quantization = {"method": method, "group_size": group_size}
    logger.debug("quantized %s to %s (group size %d)", type(model).__name__, method, group_size)
    return model


def dynamic_int8_supported() -> bool:
    engines = torch.backends.quantized.supported_engines
    return "x86" in engines or "fbgemm" in engines


def _cpu_has_vnni() -> bool:
    """AVX-512 VNNI (or AVX-VNNI) accumulates u8 x s8 products in 32 bits; without it fbgemm's 16-bit path can
    saturate, so activations must use 7 bits (reduce_range)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


_REDUCE_RANGE = not _cpu_has_vnni()


def use_dynamic_activations(model: nn.Module) -> int:
    """Switch every int8 QuantizedLinear of a model to w8a8 (see STORED_METHOD); returns how many switched. Their
    int8 copies are released, except a head's that a tied embedding reads."""
    shared = {id(m.packed) for m in model.modules() if isinstance(m, QuantizedEmbedding)}
    switched = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear) and module.enable_dynamic_activations():
            switched += 1
            if id(module.packed) not in shared:
                module.release_int8_copy()
    return switched
