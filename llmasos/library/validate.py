"""Check a checkpoint before it enters the store: config, safetensors headers against file sizes, tokenizer, template.

Uses the runtime's own loader checks, so whatever the store accepts, `LLM.load` can read. Nothing here writes."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from llmasos.errors import LibraryError, LLMasOSError
from llmasos.library.store import ADAPTER_FILES, MODULE_FILE, RUNTIME_FILES

_HF_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I8": "int8", "U8": "uint8"}


@dataclass
class CheckpointInfo:
    """What validation learned about a checkpoint directory."""

    family: str
    num_parameters: int
    dtype: str | None
    context_length: int
    files: list[str] = field(default_factory=list)  # relative paths the runtime needs, weights included
    has_chat_template: bool = False
    license: str | None = None


def runtime_files_in(directory: Path, weights: list[Path]) -> list[str]:
    """The relative paths to bring into the store: known runtime files present, the weights, extra templates."""
    names = [name for name in RUNTIME_FILES if (directory / name).is_file()]
    names += [weight.name for weight in weights]
    names += [str(path.relative_to(directory)) for path in sorted(directory.glob("*_*/*"))
              if MODULE_FILE.fullmatch(str(path.relative_to(directory))) and path.is_file()]
    extra = directory / "additional_chat_templates"
    if extra.is_dir():
        names += [f"additional_chat_templates/{path.name}" for path in sorted(extra.glob("*.jinja"))
                  if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*\.jinja", path.name)]
    return sorted(set(names))


def inspect_checkpoint(directory: Path) -> CheckpointInfo:
    """Validate `directory` as a runtime checkpoint; raise LibraryError naming the first problem."""
    from llmasos.models.loader import check_safetensors, resolve_directory, weight_files
    from llmasos.tokenizer import Tokenizer

    try:
        directory = resolve_directory(directory)
        config = _read_any_config(directory)
        weights = weight_files(directory)
        headers = {weight: check_safetensors(weight) for weight in weights}
        tokenizer = Tokenizer.from_dir(directory)
    except LLMasOSError as exc:
        raise LibraryError(f"refused {directory}: {exc}") from None
    counts: Counter[str] = Counter()
    num_parameters = 0
    for header in headers.values():
        for info in header.values():
            count = 1
            for dim in info["shape"]:
                count *= dim
            num_parameters += count
            counts[info["dtype"]] += count
    if num_parameters == 0:
        raise LibraryError(f"refused {directory}: the safetensors files hold no tensors")
    if tokenizer.vocab_size > config.vocab_size:
        raise LibraryError(f"refused {directory}: the tokenizer has {tokenizer.vocab_size} tokens but config.json's "
                           f"vocab_size is {config.vocab_size}; the tokenizer does not belong to these weights")
    dtype = config.torch_dtype or (_HF_DTYPES.get(counts.most_common(1)[0][0]) if counts else None)
    return CheckpointInfo(
        family=config.model_type, num_parameters=num_parameters, dtype=dtype,
        context_length=config.max_context_length, files=runtime_files_in(directory, weights),
        has_chat_template=tokenizer.chat_template is not None, license=read_license(directory))


def _read_any_config(directory: Path):
    """The decoder ModelConfig, or, for encoders (BERT family) and encoder-decoders (T5), a light view of the raw
    config with the fields validation reads; their own loaders check the rest."""
    import json
    from types import SimpleNamespace

    from llmasos.models.bert import ENCODER_FAMILIES
    from llmasos.models.loader import read_config
    from llmasos.models.t5 import SEQ2SEQ_FAMILIES

    path = directory / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        data = {}
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if model_type in ENCODER_FAMILIES or model_type in SEQ2SEQ_FAMILIES:
        vocab = data.get("vocab_size")
        if not isinstance(vocab, int) or vocab <= 0:
            raise LibraryError(f"{path}: vocab_size must be a positive integer")
        context = data.get("max_position_embeddings") or data.get("n_positions") or 512
        return SimpleNamespace(model_type=model_type, vocab_size=vocab, max_context_length=int(context),
                               torch_dtype=data.get("dtype") or data.get("torch_dtype"))
    return read_config(directory)


def read_license(directory: Path) -> str | None:
    """The `license:` of a model card's YAML front matter (README.md), if any."""
    readme = directory / "README.md"
    if not readme.is_file():
        return None
    try:
        text = readme.read_text(encoding="utf-8", errors="replace")[:20000]
    except OSError:
        return None
    if not text.startswith("---"):
        return None
    end = text.find("\n---", 3)
    if end < 0:
        return None
    import yaml

    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return None
    value = data.get("license") if isinstance(data, dict) else None
    return str(value) if isinstance(value, (str, int, float)) else None


def inspect_adapter(directory: Path, base_checkpoint: Path | None = None, base_name: str = "") -> list[str]:
    """Validate a LoRA adapter directory (adapter_config.json + adapter_model.safetensors); return its files. With
    `base_checkpoint`, its LoRA matrices must also fit that base's linear layers (read from config.json alone), so
    an adapter trained on another model is refused when it is imported, not at its first load."""
    from llmasos.models.loader import check_safetensors

    if not directory.is_dir():
        raise LibraryError(f"adapter directory {str(directory)!r} does not exist")
    for name in ADAPTER_FILES:
        if not (directory / name).is_file():
            raise LibraryError(f"{directory} is not a LoRA adapter: {name} is missing (save adapters with the trainer "
                               "or PEFT's `save_pretrained`, safetensors format)")
    try:
        config = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LibraryError(f"{directory / 'adapter_config.json'} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise LibraryError(f"{directory / 'adapter_config.json'} must hold a JSON object")
    try:
        header = check_safetensors(directory / "adapter_model.safetensors")
    except LLMasOSError as exc:
        raise LibraryError(f"refused adapter: {exc}") from None
    if base_checkpoint is not None:
        _check_adapter_fits(directory, header, base_checkpoint, base_name or base_checkpoint.name)
    return list(ADAPTER_FILES)


def _check_adapter_fits(directory: Path, header: dict[str, dict], base_checkpoint: Path, base_name: str) -> None:
    from llmasos.engine.lora import PEFT_PREFIX, checkpoint_targets

    try:
        targets = checkpoint_targets(base_checkpoint)
    except (LLMasOSError, KeyError, TypeError, ValueError):
        return  # a base whose layers cannot be listed from its config is checked when the adapter is merged
    for key, info in header.items():
        module, sep, kind = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if not sep or kind not in ("A.weight", "B.weight"):
            continue  # modules_to_save, embedding adapters: the merge checks them
        if module not in targets:
            raise LibraryError(f"refused adapter {directory}: its tensor {key!r} adapts {module!r}, which is not a "
                               f"linear layer of {base_name!r}; was it trained on another base model? (give the "
                               "right one with --base, or FROM in a Modelfile)")
        in_features, out_features = targets[module]
        shape = list(info.get("shape", []))
        expected = in_features if kind == "A.weight" else out_features
        if len(shape) != 2 or shape[1 if kind == "A.weight" else 0] != expected:
            raise LibraryError(f"refused adapter {directory}: {key!r} has shape {shape}, but {module!r} of "
                               f"{base_name!r} maps {in_features} -> {out_features} features; was it trained on "
                               "another base model?")
