"""The on-disk store under $LLMASOS_HOME/models/: checkpoint directories with opaque ids, staging, downloads, locks.

Everything is written aside (`.staging/`, `.downloads/`) and renamed into `checkpoints/` only once complete and
validated, so a crash or a refused file never leaves a half-written model where the registry could point at it."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from llmasos.errors import LibraryError
from llmasos.home import models_dir

CHECKPOINTS = "checkpoints"
STAGING = ".staging"
DOWNLOADS = ".downloads"
LOCKS = ".locks"
# Held while rows that share directories change, so a directory is never deleted as a new model starts using it.
REGISTRY_LOCK = "registry"
_DIRECTORY_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,150}")
_CHUNK = 1 << 20

# The files the runtime reads; everything else in a checkpoint (pickles, optimizer states, ONNX, GGUF) stays out.
RUNTIME_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "chat_template.json", "model.safetensors.index.json",
    # sentence-transformers' pooling and normalisation set-up of embedding models
    "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
)
# sentence-transformers module folders, e.g. 1_Pooling/config.json, 2_Dense/model.safetensors
MODULE_FILE = re.compile(r"[0-9]{1,2}_[A-Za-z]+/(config\.json|model\.safetensors)")
_SAFETENSORS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.safetensors")
_TEMPLATE_NAME = re.compile(r"additional_chat_templates/[A-Za-z0-9][A-Za-z0-9._-]*\.jinja")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def is_runtime_file(relative: str) -> bool:
    """Whether a repo-relative path is one the runtime needs (and is a safe, plain name: no traversal possible)."""
    if relative in RUNTIME_FILES or _SAFETENSORS_NAME.fullmatch(relative):
        return ".." not in relative
    return bool(_TEMPLATE_NAME.fullmatch(relative) or MODULE_FILE.fullmatch(relative)) and ".." not in relative


def root() -> Path:
    return models_dir()


def _subdir(name: str) -> Path:
    path = root() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def checkpoint_path(directory: str) -> Path:
    """The path of a checkpoint directory id, refusing ids that are not plain names inside the store."""
    if not isinstance(directory, str) or not _DIRECTORY_ID.fullmatch(directory) or ".." in directory:
        raise LibraryError(f"the registry names a model directory {directory!r} that is not a store id; the database "
                           "may have been edited by hand")
    return root() / CHECKPOINTS / directory


def new_directory_id(name: str) -> str:
    slug = re.sub(r"[^a-z0-9._-]", "-", name.lower()).strip(".-")[:80] or "model"
    return f"{slug}-{secrets.token_hex(4)}"


@contextmanager
def staging(name: str) -> Iterator[Path]:
    """A fresh directory aside from the store; removed on exit unless `place` moved it into the store."""
    path = _subdir(STAGING) / new_directory_id(name)
    path.mkdir()
    try:
        yield path
    finally:
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)


def place(staged: Path, name: str, directory: str | None = None) -> str:
    """Rename a complete, validated staging directory into the store; return its directory id (a new one, or
    `directory`: the id a shared registry already names, filled on a server that lacks its files)."""
    directory = directory or new_directory_id(name)
    target = checkpoint_path(directory)
    _subdir(CHECKPOINTS)
    os.replace(staged, target)
    return directory


def remove_directory(directory: str) -> None:
    """Delete a checkpoint directory (callers check no model still uses it). Renamed aside first: never half-gone."""
    path = checkpoint_path(directory)
    if not path.exists():
        return
    trash = _subdir(STAGING) / f"removing-{directory}"
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def downloads_dir() -> Path:
    return _subdir(DOWNLOADS)


@contextmanager
def lock(key: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """An inter-process lock named by `key` (hashed into a file name), e.g. one per pulled model.
    `on_wait` is called once if another process holds it, before blocking until it is free."""
    from filelock import FileLock, Timeout

    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]
    file_lock = FileLock(str(_subdir(LOCKS) / f"{digest}.lock"))
    try:
        file_lock.acquire(timeout=0)
    except Timeout:
        if on_wait is not None:
            on_wait()
        file_lock.acquire()
    try:
        yield
    finally:
        file_lock.release()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file's content (what the Hub reports for files not stored in LFS)."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def copy_with_hash(source: Path, target: Path) -> str:
    """Copy bytes (following a symlinked source) and return the sha256 of exactly what was written."""
    digest = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    with source.open("rb") as reader, target.open("xb") as writer:
        while chunk := reader.read(_CHUNK):
            digest.update(chunk)
            writer.write(chunk)
        writer.flush()
        os.fsync(writer.fileno())
    return digest.hexdigest()


def link_or_copy(source: Path, target: Path) -> tuple[str, bool]:
    """Hard-link `source` (its real file) at `target` when both are on one filesystem, else copy.
    Returns (sha256 of the target's content, whether it was linked)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source.resolve(strict=True), target)
    except OSError:
        return copy_with_hash(source, target), False
    return sha256_file(target), True


def file_entry(directory: Path, relative: str, sha256: str) -> dict[str, object]:
    return {"path": relative, "sha256": sha256, "size": (directory / relative).stat().st_size}
