"""`llmasos create` with `PARAMETER quantization int8|int4`: the base's weights (LoRA adapters merged first) quantized
once and stored as a new checkpoint directory beside the base's, so every later load reads int8 / packed int4
tensors directly. Written in staging and renamed into the store only when complete and validated, like every way in.

Also what `llmasos show` reports about a stored checkpoint: its quantization and the bytes its tensors take."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmasos.errors import LibraryError, LLMasOSError
from llmasos.library import store
from llmasos.library.registry import LibraryModel, add_model, copy_row, get_model, require_model

# Files the quantized checkpoint writes itself; everything else the base has (tokenizer, templates) is linked over.
_REWRITTEN = ("config.json", "model.safetensors.index.json")


def checkpoint_quantization(directory: Path) -> tuple[str, int] | None:
    """(method, group_size) of a checkpoint directory stored quantized by llmasos, else None."""
    from llmasos.models.loader import read_json_file
    from llmasos.models.quantized_checkpoint import stored_quantization

    try:
        return stored_quantization(read_json_file(directory / "config.json", required=False))
    except LLMasOSError:
        return None


def weight_bytes(directory: Path, files: list[dict[str, Any]]) -> int | None:
    """Sum of the tensor bytes in the checkpoint's safetensors files (their headers); None if one is unreadable."""
    from llmasos.models.loader import check_safetensors

    total = 0
    for entry in files:
        if not str(entry["path"]).endswith(".safetensors") or "/" in str(entry["path"]):
            continue
        try:
            header = check_safetensors(directory / entry["path"])
        except (LLMasOSError, OSError):
            return None
        total += sum(info["data_offsets"][1] - info["data_offsets"][0] for info in header.values())
    return total


def quantized_from_base(row: LibraryModel) -> tuple[str, int] | None:
    """The quantization a derived model added to its base (for `show --modelfile`); None if it shares its files."""
    if row.source_type != "derived" or not row.base_name or not row.directory:
        return None
    base = get_model(row.base_name)
    if base is None or base.directory == row.directory:
        return None
    return checkpoint_quantization(store.checkpoint_path(row.directory))


def create_quantized(name: str, modelfile, relative_to: Path) -> LibraryModel:
    """Create `name` FROM a library model with its weights quantized (the Modelfile's quantization parameters); the
    other instructions apply as for any derived model."""
    from llmasos.library.validate import inspect_adapter, inspect_checkpoint

    parameters = dict(modelfile.parameters)
    method = parameters.pop("quantization")
    group_size = parameters.pop("quantization_group_size", 32)
    from llmasos.library.modelfile import check_new_derived

    base = require_model(modelfile.base)
    check_new_derived(name, modelfile, base)
    base_directory = store.checkpoint_path(base.directory)
    config_json = _float_decoder_config(base, base_directory)
    adapters = [store.checkpoint_path(base.adapter)] if base.adapter else []
    if modelfile.adapter is not None:
        adapter = Path(modelfile.adapter).expanduser()
        adapter = adapter if adapter.is_absolute() else relative_to / adapter
        inspect_adapter(adapter, base_directory, base.name)
        adapters.append(adapter)
    with store.staging(name) as staged:
        hashes = _write_quantized(base_directory, config_json, adapters, method, group_size, staged)
        for entry in base.files:
            relative = str(entry["path"])
            if relative not in _REWRITTEN and not relative.endswith(".safetensors"):
                hashes[relative], _ = store.link_or_copy(base_directory / relative, staged / relative)
        info = inspect_checkpoint(staged)
        files = [store.file_entry(staged, relative, hashes[relative]) for relative in info.files]
        with store.lock(store.REGISTRY_LOCK):  # the base must still exist when the row naming it is added
            base = require_model(modelfile.base)
            if get_model(name) is not None:
                raise LibraryError(f"a model named {name!r} was just added by another process; choose another name")
            directory = store.place(staged, name)
            row = copy_row(
                base, name, source_type="derived", base_name=base.name, directory=directory, files=files,
                size_bytes=sum(int(entry["size"]) for entry in files), adapter=None,
                parameters={**(base.parameters or {}), **parameters},
                system=modelfile.system if modelfile.system is not None else base.system,
                chat_template=modelfile.template if modelfile.template is not None else base.chat_template,
                license=modelfile.license if modelfile.license is not None else base.license)
            try:
                add_model(row)
            except BaseException:
                store.remove_directory(directory)
                raise
    return row


def _float_decoder_config(base: LibraryModel, directory: Path) -> dict:
    from llmasos.models import MODEL_FAMILIES
    from llmasos.models.loader import read_config_json

    if not directory.is_dir():
        raise LibraryError(f"the files of {base.name!r} are missing from the store ({directory}); remove it with "
                           f"`llmasos rm {base.name}` and pull or import it again")
    try:
        config_json = read_config_json(directory)
    except LLMasOSError as exc:
        raise LibraryError(f"cannot quantize {base.name!r}: {exc}") from None
    if "quantization_config" in config_json:
        raise LibraryError(f"{base.name!r} is stored quantized already; create FROM its float base instead")
    if config_json.get("model_type") not in MODEL_FAMILIES:
        raise LibraryError(f"{base.name!r} is a {config_json.get('model_type')!r} model; quantization applies to "
                           f"decoder models ({', '.join(sorted(MODEL_FAMILIES))})")
    return config_json


def _write_quantized(base_directory: Path, config_json: dict, adapters: list[Path], method: str, group_size: int,
                     staged: Path) -> dict[str, str]:
    """Load the base in its own dtype on the CPU, merge the adapters, write the quantized tensors and config.json
    into `staged`; returns their sha256 by relative path."""
    import torch

    from llmasos.models.loader import checkpoint_dtype, load_model, read_config, weight_files
    from llmasos.models.quantized_checkpoint import save_quantized
    from llmasos.train.lora import apply_adapter

    try:
        stored = checkpoint_dtype(read_config(base_directory), weight_files(base_directory))  # not "auto": no bf16 cast
        model, _ = load_model(base_directory, dtype=stored, device="cpu")
        with torch.no_grad():
            for adapter in adapters:
                apply_adapter(model, adapter)
        save_quantized(model, config_json, staged, method=method, group_size=group_size)
    except LLMasOSError as exc:
        raise LibraryError(f"cannot quantize {base_directory.name}: {exc}") from None
    del model
    return {relative: store.sha256_file(staged / relative) for relative in ("model.safetensors", "config.json")}
