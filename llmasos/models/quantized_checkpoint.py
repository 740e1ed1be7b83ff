"""Quantized checkpoints: safetensors holding int8 / packed int4 weights with their scales, and config.json saying so.

Tensor names follow the layer paths: int8 layers store `<path>.weight` (int8, out x in) and `<path>.scales`; int4
layers `<path>.qweight` (uint8 nibbles, out x padded_in / 2), `<path>.scales` and `<path>.zeros`; biases and every
unquantized tensor keep their usual names and dtype. The layout is device-independent: layers are packed for their
kernel at load. config.json gains "quantization_config": {"quant_method": "llmasos", "method", "group_size"}."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from llmasos.errors import ModelLoadError
from llmasos.models.gpt2 import Conv1D
from llmasos.models.quantization import (
    HEAD_METHOD,
    QuantizedEmbedding,
    QuantizedLinear,
    QuantizedTensors,
    check_method,
    float_weight,
    module_path,
    quantization_targets,
    quantize_weight,
    set_module,
    tie_quantized_embeddings,
    use_dynamic_activations,
)

QUANT_METHOD = "llmasos"


def quantization_config(method: str, group_size: int) -> dict:
    return {"quant_method": QUANT_METHOD, "method": method, "group_size": group_size}


def stored_quantization(config_json: dict) -> tuple[str, int] | None:
    """(method, group_size) of a checkpoint config.json saved quantized by llmasos; None for a float checkpoint.
    Other quantization formats (GPTQ, AWQ, bitsandbytes, ...) are refused with a message naming them."""
    quant = config_json.get("quantization_config")
    if quant is None:
        return None
    if not isinstance(quant, dict) or quant.get("quant_method") != QUANT_METHOD:
        found = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise ModelLoadError(f"config.json: the weights are quantized with {found!r}, which llmasos cannot load; use "
                             "the unquantized checkpoint (llmasos quantizes it itself: quantization int8 or int4)")
    method, group_size = quant.get("method"), quant.get("group_size", 32)
    try:
        check_method(method, group_size)
    except ValueError as exc:
        raise ModelLoadError(f"config.json quantization_config: {exc}") from None
    return method, int(group_size)


def _layer_tensors(path: str, tensors: QuantizedTensors) -> dict[str, torch.Tensor]:
    if tensors.method == "int8":
        return {f"{path}.weight": tensors.qweight, f"{path}.scales": tensors.scales}
    return {f"{path}.qweight": tensors.qweight, f"{path}.scales": tensors.scales, f"{path}.zeros": tensors.zeros}


@torch.no_grad()
def save_quantized(model: nn.Module, config_json: dict, directory: str | Path, method: str | None = None,
                   group_size: int = 32, include_head: bool = True) -> Path:
    """Write `directory`/model.safetensors and config.json (`config_json` plus quantization_config).

    A model quantized with `quantize_model` is written as it is (its own method, group size and head). A float model
    is quantized layer by layer while writing when `method` is given, the same way `quantize_model` does, without
    packing anything for a kernel. Returns the directory."""
    own = getattr(model, "quantization", None)
    head = model.output_embeddings()
    if own is not None:  # what the model holds decides, not the arguments
        method, group_size, include_head = own["method"], own["group_size"], isinstance(head, QuantizedLinear)
    elif method is None:
        raise ValueError("save_quantized needs a quantized model (quantize_model) or a method: int8 or int4")
    check_method(method, group_size)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    targets = quantization_targets(model, include_head)
    embedding = model.input_embeddings()
    tied = isinstance(embedding, QuantizedEmbedding) or (
        include_head and not isinstance(head, QuantizedLinear) and float_weight(head) is embedding.weight)
    tensors: dict[str, torch.Tensor] = {}
    for path, role in targets.items():
        module = model.get_submodule(path)
        if isinstance(module, QuantizedLinear):
            quantized = module.quantized_tensors()
        else:
            quantized = quantize_weight(float_weight(module), HEAD_METHOD if role == "head" else method, group_size)
        tensors.update(_layer_tensors(path, quantized))
        if module.bias is not None:
            tensors[f"{path}.bias"] = module.bias
    skipped = tuple(f"{path}." for path in targets)
    if tied:
        skipped += (module_path(model, embedding) + ".",)
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.startswith(skipped) or id(tensor) in seen:  # tied weights are stored once, under the first name
            continue
        seen.add(id(tensor))
        tensors[name] = tensor
    save_file({name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()},
              str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = dict(config_json)
    config["quantization_config"] = quantization_config(method, group_size)
    dtype = str(next(p for p in model.parameters() if p.is_floating_point()).dtype).removeprefix("torch.")
    for key in ("torch_dtype", "dtype"):
        if key in config or key == "torch_dtype":
            config[key] = dtype
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return directory


def load_quantized(cls, config, directory: Path, dtype, device, method: str, group_size: int) -> nn.Module:
    """Build `cls(config)` with QuantizedLinear layers where the checkpoint holds quantized tensors and fill it:
    no float weight is materialized for those layers."""
    from llmasos.models.loader import check_safetensors, load_weights, resolve_device, resolve_dtype, weight_files

    files = weight_files(directory)
    headers = {file: check_safetensors(file) for file in files}
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, config, files, device)
    where = {name: file for file, header in headers.items() for name in header}
    with torch.device("meta"):
        model = cls(config)
    head_path = module_path(model, model.output_embeddings())
    embedding_path = module_path(model, model.input_embeddings())
    modules = dict(model.named_modules())
    layers: dict[str, tuple[int, int, bool]] = {}  # path -> (out, in, has bias)
    for name in sorted(where):
        if not name.endswith(".scales"):
            continue
        path = name.removesuffix(".scales")
        module = modules.get(path)
        if not isinstance(module, (nn.Linear, Conv1D)):
            raise ModelLoadError(f"{where[name].name}: quantized tensor {name!r} has no linear layer {path!r} in this "
                                 f"{config.model_type} model")
        out_features, in_features = float_weight(module).shape
        layers[path] = (out_features, in_features, module.bias is not None)
        set_module(model, path, nn.Module())  # a placeholder without tensors until the quantized layer is built
    tie_head = config.tie_word_embeddings and head_path in layers
    if tie_head:
        set_module(model, embedding_path, nn.Module())
    model.to(torch_dtype)
    model.to_empty(device=device)
    if config.tie_word_embeddings and not tie_head:
        model.tie_weights()
    quantized_names = {name for name in where if name.rpartition(".")[0] in layers}
    load_weights(model, {file: {name: info for name, info in header.items() if name not in quantized_names}
                         for file, header in headers.items()})
    for path, (out_features, in_features, has_bias) in layers.items():
        stored = _read_layer(path, where, out_features, in_features, group_size, has_bias)
        bias = stored.pop("bias", None)
        layer = QuantizedLinear.from_quantized(QuantizedTensors(**stored), in_features, bias, torch_dtype, device)
        set_module(model, path, layer)
    if tie_head:
        if model.get_submodule(head_path).method != HEAD_METHOD:
            raise ModelLoadError(f"{directory}: a tied output head must be stored {HEAD_METHOD}")
        tie_quantized_embeddings(model)
    if method == "w8a8":
        use_dynamic_activations(model)
    model.quantization = {"method": method, "group_size": group_size}
    model.eval()
    return model


def _read_layer(path: str, where: dict[str, Path], out_features: int, in_features: int, group_size: int,
                has_bias: bool) -> dict:
    """One layer's stored tensors, checked against the layer's shape; errors name the file and the tensor."""
    int4 = f"{path}.qweight" in where
    names = ("qweight", "scales", "zeros") if int4 else ("weight", "scales")
    padded_in = -(-in_features // group_size) * group_size
    expected = {"qweight": ((out_features, padded_in // 2), torch.uint8),
                "weight": ((out_features, in_features), torch.int8),
                "scales": ((out_features, padded_in // group_size) if int4 else (out_features,), None),
                "zeros": ((out_features, padded_in // group_size), None)}
    values: dict = {"method": "int4" if int4 else "int8", "group_size": group_size if int4 else None}
    for short in names + (("bias",) if has_bias else ()):
        name = f"{path}.{short}"
        if name not in where:
            raise ModelLoadError(f"quantized checkpoint is missing {name!r}")
        with safe_open(where[name], framework="pt", device="cpu") as handle:
            tensor = handle.get_tensor(name)
        shape, dtype = expected.get(short, ((out_features,), None))
        if tuple(tensor.shape) != shape or (dtype is not None and tensor.dtype != dtype):
            raise ModelLoadError(f"tensor {name!r} in {where[name].name} is {tensor.dtype} {list(tensor.shape)} but "
                                 f"this layer needs {dtype or 'float'} {list(shape)}: the weights do not match "
                                 "config.json")
        values["qweight" if short == "weight" else short] = tensor
    return values
