"""`llmasos import`: validate a local checkpoint directory, then copy or hard-link its runtime files into the store.

Also the last step every way into the library shares (import, pull, the bundled default model): validate the staged
files, rename them into the store, then write the registry row; if any step fails, the store is left as it was."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmasos.errors import LibraryError
from llmasos.library import store
from llmasos.library.names import check_name, is_valid_name
from llmasos.library.registry import LibraryModel, add_model, directory_users, get_model, replace_model, utcnow
from llmasos.library.validate import CheckpointInfo, inspect_checkpoint


def build_row(name: str, directory: str, info: CheckpointInfo, files: list[dict[str, Any]], *, source_type: str,
              **fields: Any) -> LibraryModel:
    values: dict[str, Any] = dict(
        name=name, source_type=source_type, source_repo=None, source_revision=None, source_commit=None,
        source_path=None, base_name=None, directory=directory, files=files, format="safetensors",
        family=info.family, num_parameters=info.num_parameters, dtype=info.dtype,
        context_length=info.context_length, size_bytes=sum(int(entry["size"]) for entry in files),
        chat_template=None, parameters={}, system=None, license=info.license, adapter=None, created_at=utcnow())
    values.update(fields)
    return LibraryModel(**values)


def register_staged(staged: Path, name: str, hashes: dict[str, str], *, source_type: str, replace: bool = False,
                    **fields: Any) -> LibraryModel:
    """Validate a complete staging directory, move it into the store and register it under `name`.

    `hashes` maps each relative path to the sha256 the caller computed while writing it. With `replace`, an existing
    model of that name is updated in place (its old files are removed once no model uses them)."""
    info = inspect_checkpoint(staged)
    missing = sorted(set(info.files) - set(hashes))
    if missing:
        raise LibraryError(f"internal: no checksum recorded for {', '.join(missing)}")
    files = [store.file_entry(staged, relative, hashes[relative]) for relative in info.files]
    if fields.get("license") is None:
        fields.pop("license", None)
    directory = store.place(staged, name)
    row = build_row(name, directory, info, files, source_type=source_type, **fields)
    with store.lock(store.REGISTRY_LOCK):
        try:
            old_directory = replace_model(row) if replace else add_model(row)
        except BaseException:
            store.remove_directory(directory)
            raise
        if old_directory and old_directory != directory:
            collect_garbage(old_directory)
    return row


def collect_garbage(directory: str) -> bool:
    """Remove a checkpoint directory that no model uses any more; return whether it was removed."""
    if directory_users(directory):
        return False
    store.remove_directory(directory)
    return True


def import_directory(source: str | Path, name: str, *, link: bool = False, source_type: str = "local",
                     license: str | None = None, base: str | None = None) -> tuple[LibraryModel, bool]:
    """Import the checkpoint at `source` as `name`. Returns the new row and whether files were hard-linked.

    A PEFT LoRA adapter directory becomes a model derived from its base (as a Modelfile `FROM base` + `ADAPTER dir`
    would make it): the base is `base`, else the library model its adapter_config.json names; served merged alone, or
    unmerged on its base (`llmasos serve --lora`). Without a base in the library it is refused with the way to add one.

    Everything is checked before anything is written: the name, then the checkpoint (config, every safetensors header
    against its file size, the tokenizer), then that the name is free."""
    check_name(name)
    source_dir = Path(source).expanduser()
    if is_adapter_directory(source_dir):
        base = base or _adapter_base(source_dir)
        if base is not None and _library_has(base):
            from llmasos.library.modelfile import Modelfile, create_from_modelfile

            return create_from_modelfile(name, Modelfile(base=base, adapter=str(source_dir.resolve()))), False
        if base is not None:
            raise LibraryError(f"refused {source_dir}: it is a LoRA adapter for {base!r}, which is not in the "
                               f"library; add it first (`llmasos pull` or `llmasos import`), then import again "
                               "with --base NAME")
    refuse_adapter(source_dir)
    info = inspect_checkpoint(source_dir)
    if get_model(name) is not None:
        raise LibraryError(f"a model named {name!r} already exists: remove it first (`llmasos rm {name}`) or choose "
                           "another name with --name")
    if not link:  # before a byte is copied: a full disk is named with the sizes, not found halfway
        from llmasos.files import check_free_space

        needed = sum((source_dir / relative).stat().st_size for relative in info.files)
        check_free_space(store.root(), needed, f"importing {name!r}")
    linked_any = False
    with store.staging(name) as staged:
        hashes: dict[str, str] = {}
        for relative in info.files:
            if link:
                hashes[relative], linked = store.link_or_copy(source_dir / relative, staged / relative)
                linked_any = linked_any or linked
            else:
                hashes[relative] = store.copy_with_hash(source_dir / relative, staged / relative)
        fields: dict[str, Any] = {"source_path": str(source_dir.resolve())}
        if license is not None:
            fields["license"] = license
        row = register_staged(staged, name, hashes, source_type=source_type, **fields)
    return row, linked_any


def is_adapter_directory(directory: Path) -> bool:
    return not (directory / "config.json").exists() and (directory / "adapter_config.json").is_file()


def _adapter_base(directory: Path) -> str | None:
    """The library name adapter_config.json gives as its base, if it is one."""
    try:
        config = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return base if isinstance(base, str) and is_valid_name(base) and _library_has(base) else None


def refuse_adapter(directory: Path) -> None:
    """A PEFT LoRA adapter (adapter_config.json, no config.json) is not a model: say so, name the base it was trained
    on, and show the Modelfile that serves base + adapter (`llmasos create`)."""
    if (directory / "config.json").exists() or not (directory / "adapter_config.json").is_file():
        return
    try:
        config = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        config = {}
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    kind = config.get("peft_type", "LORA") if isinstance(config, dict) else "LORA"
    if kind != "LORA":
        raise LibraryError(f"refused {directory}: it is a PEFT {kind} adapter (adapter_config.json), not a model; "
                           "LLMasOS applies LoRA adapters only, to a base model in the library")
    from_name, add_base = "BASE", "`llmasos import BASE_DIR --name BASE` or `llmasos pull REPO --name BASE`"
    if isinstance(base, str) and base:
        trained_on = f"it was trained on {base!r} (base_model_name_or_path in adapter_config.json)"
        if _library_has(base):  # trained from a library model: the trainer records its name
            from_name, add_base = base, None
        elif Path(base).expanduser().is_dir():
            add_base = f"`llmasos import {base} --name BASE`"
        else:
            add_base = f"`llmasos pull {base} --name BASE` (or `llmasos import` its directory)"
    else:
        trained_on = "adapter_config.json does not name its base model (base_model_name_or_path)"
    steps = f"Add the base model first with {add_base}, then create" if add_base else "Create"
    raise LibraryError(
        f"refused {directory}: it is a LoRA adapter (adapter_config.json + adapter weights), not a model, so there "
        f"is no config.json to import; {trained_on}. {steps} a model that applies the adapter with a Modelfile "
        f"holding the two lines\n    FROM {from_name}\n    ADAPTER {directory.resolve()}\n"
        "and `llmasos create NAME -f Modelfile` — or import it again with `--base BASE`")


def _library_has(name: str) -> bool:
    try:
        return get_model(check_name(name)) is not None
    except LibraryError:
        return False
