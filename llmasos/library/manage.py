"""`llmasos rm` and `llmasos cp`, plus the human-readable figures `list` and `show` print.

Copies and derived models share their files with the original; a directory is deleted only when the last model that
uses it is removed, and a base cannot be removed while models derived from it exist."""

from __future__ import annotations

from typing import Any

from llmasos.errors import LibraryError
from llmasos.library import store
from llmasos.library.importer import collect_garbage
from llmasos.library.names import check_name
from llmasos.library.registry import LibraryModel, add_model, copy_row, delete_model, get_model, require_model
from llmasos.library.store import REGISTRY_LOCK


def remove_model(name: str) -> int:
    """Remove `name` from the library; return the bytes freed (0 when its files are still shared)."""
    check_name(name)
    with store.lock(REGISTRY_LOCK):  # no cp/create may start sharing the files between the delete and the cleanup
        row = delete_model(name)
        freed = 0
        if collect_garbage(row.directory):
            freed += int(row.size_bytes or 0)
        if row.adapter:
            collect_garbage(row.adapter)
    return freed


def copy_model(source: str, target: str) -> LibraryModel:
    """`target` becomes an independent name for `source`'s files and settings (nothing is copied on disk)."""
    check_name(source)
    check_name(target)
    with store.lock(REGISTRY_LOCK):
        row = require_model(source)
        if get_model(target) is not None:
            raise LibraryError(f"a model named {target!r} already exists: remove it first (`llmasos rm {target}`) or "
                               "choose another name")
        if not store.checkpoint_path(row.directory).is_dir():
            raise LibraryError(f"the files of {source!r} are missing from the store; remove it and pull or import it "
                               "again")
        copy = copy_row(row, target)
        add_model(copy)
    return copy


def human_count(count: int | None) -> str:
    if not count:
        return "-"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}" if count < 10 * scale else f"{count / scale:.0f}{unit}"
    return str(count)


def human_size(size: int | None) -> str:
    if not size:
        return "-"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def summary(row: LibraryModel) -> dict[str, Any]:
    """One `llmasos list --json` entry."""
    return {"name": row.name, "family": row.family, "parameters": row.num_parameters, "size_bytes": row.size_bytes,
            "context_length": row.context_length, "source": row.source_text()}


def details(row: LibraryModel) -> dict[str, Any]:
    """`llmasos show --json`: the registry row, the store path, and the chat template that applies."""
    from llmasos.chat_template import load_chat_templates

    data = row.to_dict()
    path = store.checkpoint_path(row.directory)
    data["path"] = str(path)
    data["source_text"] = row.source_text()
    template = row.chat_template
    if template is None and path.is_dir():
        import json

        config_path = path / "tokenizer_config.json"
        try:
            config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        except (OSError, ValueError):
            config = {}
        template = load_chat_templates(path, config if isinstance(config, dict) else {}).get("default")
    data["effective_chat_template"] = template
    data["chat_template_overridden"] = row.chat_template is not None
    return data
