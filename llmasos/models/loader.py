"""Load a Hugging Face checkpoint directory: config.json + safetensors (single or sharded) -> a CausalLM.

Weights are read only from safetensors; pickle checkpoints are refused without being opened."""

from __future__ import annotations

import functools
import json
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from llmasos.errors import ModelLoadError
from llmasos.models import CausalLM, ModelConfig, load_config, model_class

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_SAFETENSORS_ITEM_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                          "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def resolve_directory(path: str | Path) -> Path:
    directory = Path(path).expanduser()
    if not directory.exists():
        raise ModelLoadError(f"model directory {str(path)!r} does not exist")
    if not directory.is_dir():
        raise ModelLoadError(f"{str(path)!r} is not a directory: give the checkpoint's directory")
    return directory


def read_json_file(path: Path, required: bool = True) -> dict:
    """A JSON object from a checkpoint file; a missing optional file is {}. Errors name the file."""
    if not path.is_file():
        if required:
            raise ModelLoadError(f"{path} not found: a model directory needs a {path.name}")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def read_config_json(directory: str | Path) -> dict:
    """config.json of a checkpoint directory, as a dict."""
    return read_json_file(Path(directory).expanduser() / "config.json")


def read_config(directory: Path) -> ModelConfig:
    return load_config(read_config_json(directory))


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from the shard index when there is one."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index} is not a valid safetensors index: {exc}") from None
        names = sorted(set(weight_map.values()))
        for name in names:
            if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
                raise ModelLoadError(f"{index} names a shard outside the model directory: {name!r}")
        files = [directory / name for name in names]
        for file in files:
            if not file.is_file():
                raise ModelLoadError(f"{file} is listed in {index.name} but missing")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickles = [p.name for pattern in PICKLE_PATTERNS for p in directory.glob(pattern)]
    if pickles:
        raise ModelLoadError(
            f"{directory} holds only pickle weights ({', '.join(sorted(pickles))}), which can run code when loaded "
            "and are refused. Convert them to safetensors once in a trusted environment, e.g. "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`.")
    raise ModelLoadError(f"{directory} has no weights: expected model.safetensors or a sharded safetensors index")


def check_safetensors(file: Path) -> dict[str, dict]:
    """Validate a safetensors header against the file's size; return the tensor table. Names the file on failure."""
    size = file.stat().st_size
    try:
        with file.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ModelLoadError(f"{file} is truncated or not a safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8 or header_len > 100_000_000:
                raise ModelLoadError(f"{file} is truncated or corrupt: header claims {header_len} bytes")
            header = json.loads(handle.read(header_len))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{file} is corrupt: unreadable safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{file} is corrupt: safetensors header is not a table")
    header.pop("__metadata__", None)
    data_size = size - 8 - header_len
    end = 0
    for name, info in header.items():
        try:
            start, stop = info["data_offsets"]
            count = 1
            for dim in info["shape"]:
                count *= dim
            expected = count * _SAFETENSORS_ITEM_SIZE.get(info["dtype"], 0)
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(f"{file} is corrupt: bad header entry for tensor {name!r}") from None
        if stop < start or (expected and stop - start != expected):
            raise ModelLoadError(f"{file} is corrupt: tensor {name!r} has inconsistent offsets")
        end = max(end, stop)
    if end > data_size:
        raise ModelLoadError(f"{file} is truncated: its header needs {end} data bytes but the file holds {data_size}")
    try:  # safetensors' own header checks too (dtype names, overlapping offsets, bytes no tensor covers)
        with safe_open(file, framework="pt"):
            pass
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"{file} is corrupt: {exc}") from None
    return header


def checkpoint_dtype(config: ModelConfig, files: list[Path]) -> torch.dtype:
    """The dtype the checkpoint is stored in: config.json's torch_dtype, else that of its first tensor."""
    if config.torch_dtype in DTYPES:
        return DTYPES[config.torch_dtype]
    with safe_open(files[0], framework="pt") as handle:
        for key in handle.keys():
            found = handle.get_slice(key).get_dtype()
            return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(found, torch.float32)
    return torch.float32


@functools.cache
def cpu_supports_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (the avx512_bf16 or amx_bf16 flag of /proc/cpuinfo). Without it
    bf16 matmuls are emulated and slower than float32; AMX is not required (it faults in some VMs)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:  # not Linux: no reliable flag, stay with float32
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool({"avx512_bf16", "amx_bf16"} & set(line.partition(":")[2].split()))
    return False


def device_supports_bf16(device: str | torch.device) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_supports_bf16()


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig, files: list[Path],
                  device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype to run in. Explicit dtypes are kept. "auto" (vLLM's rule): a checkpoint stored in bfloat16 or
    float16 keeps its dtype; a float32 one runs in bfloat16 where `device` supports it (a CUDA GPU with bf16, a CPU
    with avx512_bf16 / amx_bf16), else in float16 on CUDA and float32 on a CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        stored = checkpoint_dtype(config, files)
        if stored != torch.float32:
            return stored
        if device_supports_bf16(device):
            return torch.bfloat16
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"dtype {dtype!r} is not supported; use float32, bfloat16, float16 or auto") from None


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelLoadError(f"device {str(device)!r} is not supported; use 'cpu' or 'cuda'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for but no CUDA GPU is available; use device='cpu'")
    if device.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"device {str(device)!r} is not supported; use 'cpu' or 'cuda'")
    return device


def load_model(path: str | Path, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu",
               quantization: str | None = None, group_size: int = 32) -> tuple[CausalLM, ModelConfig]:
    """A decoder checkpoint as (model in eval mode, config). `quantization` ("int8" or "int4" with `group_size` 32,
    64 or 128) quantizes a float checkpoint's weights after loading them (llmasos.models.quantization); a checkpoint
    stored quantized (config.json's quantization_config) loads straight into quantized layers."""
    from llmasos.models.quantization import check_method
    from llmasos.models.quantized_checkpoint import load_quantized, stored_quantization

    directory = resolve_directory(path)
    config = read_config(directory)
    if quantization is not None:
        try:
            check_method(quantization, group_size)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
    stored = stored_quantization(config.raw)
    if stored is not None:
        method, stored_group = stored
        if quantization is not None and (quantization != method or (method == "int4" and group_size != stored_group)):
            shown = method if method == "int8" else f"int4 with group size {stored_group}"
            raise ModelLoadError(f"{directory} is stored quantized ({shown}) and cannot be quantized again; load it "
                                 "without a quantization option, or quantize the float checkpoint instead")
        return load_quantized(model_class(config), config, directory, dtype, device, method, stored_group), config
    model = instantiate(model_class(config), config, directory, dtype, device)
    if quantization is not None:
        from llmasos.models.quantization import quantize_model

        quantize_model(model, quantization, group_size)
    return model, config


def instantiate(cls, config, directory: Path, dtype: str | torch.dtype, device: str | torch.device,
                configure=None):
    """Build `cls(config)` without allocating twice (on the meta device, then empty on the target device), fill it
    from the directory's safetensors with every name and shape checked, and return it in eval mode.
    `configure(config, headers)` may adjust the config from the checkpoint's tensor table first."""
    files = weight_files(directory)
    headers = {file: check_safetensors(file) for file in files}
    if configure is not None:
        configure(config, headers)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, config, files, device)
    with torch.device("meta"):
        model = cls(config)
    model.to(torch_dtype)
    model.to_empty(device=device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    load_weights(model, headers)
    model.eval()
    return model


def load_weights(model: CausalLM, headers: dict[Path, dict[str, dict]]) -> None:
    """Copy every checkpoint tensor into its parameter, checking names and shapes; all parameters must be covered."""
    params = dict(model.named_parameters(remove_duplicate=False))
    sources = model.sanitize({name: name for header in headers.values() for name in header})
    tied = model.config.tie_word_embeddings
    loaded: set[str] = set()
    unexpected: list[str] = []
    by_file = {file: set(header) for file, header in headers.items()}
    for file, names in by_file.items():
        renamed = {source: target for target, source in sources.items() if source in names}
        with safe_open(file, framework="pt", device="cpu") as handle:
            for source, target in renamed.items():
                if target.endswith(model.ignored_weight_suffixes) or (tied and target == "lm_head.weight"):
                    continue
                param = params.get(target)
                if param is None:
                    unexpected.append(source)
                    continue
                shape = tuple(headers[file][source]["shape"])
                if shape != tuple(param.shape):
                    raise ModelLoadError(
                        f"tensor {source!r} in {file.name} has shape {list(shape)} but the config needs "
                        f"{list(param.shape)}: the weights do not match config.json")
                with torch.no_grad():
                    param.copy_(handle.get_tensor(source))
                loaded.add(target)
    if tied:
        loaded.add("lm_head.weight")
        if "lm_head.weight" not in params:
            loaded.discard("lm_head.weight")
    missing = sorted(set(params) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"checkpoint is missing weights: {shown}")
    if unexpected:
        shown = ", ".join(sorted(unexpected)[:5])
        raise ModelLoadError(f"checkpoint has weights this {model.config.model_type} model does not use: {shown}")
