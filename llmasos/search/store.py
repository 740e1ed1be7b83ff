"""Where semantic indexes live: $LLMASOS_HOME/indexes/<name>/ holding index.json (the manifest: embedding model, its
dimension, normalisation, chunking), chunks.sqlite (text and metadata of each chunk) and vectors.usearch. Names are
checked like library model names; every change writes a whole new directory and renames it into place."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmasos.errors import IndexNotFoundError, LibraryError, SearchError
from llmasos.home import home

MANIFEST = "index.json"
CHUNKS_FILE = "chunks.sqlite"
FORMAT_VERSION = 1
SCHEMA = """
create table chunks (
    key integer primary key autoincrement,  -- the vector's key in vectors.usearch; never reused
    id text not null unique,
    doc_id text not null,
    source text,
    text text not null,
    metadata text not null
);
create index chunks_doc_id on chunks(doc_id);
create index chunks_source on chunks(source);
"""


def indexes_dir() -> Path:
    path = home() / "indexes"
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_index_name(name: object) -> str:
    """`name` if it is a valid index name (the library's rule for model names), else SearchError."""
    from llmasos.library.names import check_name

    try:
        return check_name(name)
    except LibraryError as exc:
        raise SearchError(str(exc).replace("model name", "index name")) from None


def index_directory(name: str) -> Path:
    return indexes_dir() / check_index_name(name)


def exists(name: str) -> bool:
    return (index_directory(name) / MANIFEST).is_file()


def read_manifest(name: str) -> dict[str, Any]:
    path = index_directory(name) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        known = ", ".join(sorted(names())) or "none yet"
        raise IndexNotFoundError(f"index {name!r} does not exist (indexes: {known}); create it with `llmasos index "
                                 "create`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SearchError(f"index {name!r} is damaged: {path} cannot be read ({exc}); remove it with `llmasos index "
                          "rm` and create it again") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise SearchError(f"index {name!r} has format {manifest.get('format')!r}; this LLMasOS reads format "
                          f"{FORMAT_VERSION}: create it again")
    return manifest


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def names() -> list[str]:
    return sorted(path.name for path in indexes_dir().iterdir() if (path / MANIFEST).is_file())


def directory_size(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def index_row(name: str) -> dict[str, Any]:
    """Index `name` in brief: name, model, dimension, chunks, documents, size in bytes, created, updated."""
    manifest = read_manifest(name)
    return {"name": name, "model": manifest["model"], "dimension": manifest["dimension"],
            "chunks": manifest["num_chunks"], "documents": manifest["num_documents"],
            "size_bytes": directory_size(index_directory(name)), "created": manifest["created"],
            "updated": manifest["updated"]}


def list_indexes() -> list[dict[str, Any]]:
    """One `index_row` per index."""
    rows = []
    for name in names():
        try:
            rows.append(index_row(name))
        except (SearchError, OSError):
            continue  # removed meanwhile, or damaged: `index rm` still removes it
    return rows


def remove_index(name: str) -> None:
    """Remove the index whole: renamed aside first, so that no reader ever sees half of it."""
    directory = index_directory(name)
    with locked(name):
        if not directory.is_dir():
            read_manifest(name)  # raises IndexNotFoundError naming the indexes there are
        aside = directory.parent / f".old-{name}-{uuid.uuid4().hex[:8]}"
        directory.rename(aside)
        shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def locked(name: str) -> Iterator[None]:
    """One writer per index at a time, across processes (an advisory lock file beside it)."""
    from filelock import FileLock

    with FileLock(indexes_dir() / f".{check_index_name(name)}.lock"):
        yield


def connect(path: Path, read_only: bool = False) -> sqlite3.Connection:
    if read_only:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    else:
        connection = sqlite3.connect(path)
    connection.row_factory = sqlite3.Row
    return connection


def create_chunks_table(path: Path) -> None:
    connection = connect(path)
    try:
        connection.executescript(SCHEMA)
        connection.commit()
    finally:
        connection.close()


def copy_chunks_table(source: Path, target: Path) -> None:
    """A consistent copy of the chunks database (SQLite's backup API, not a file copy)."""
    reader, writer = connect(source, read_only=True), connect(target)
    try:
        reader.backup(writer)
    finally:
        reader.close()
        writer.close()
    os.chmod(target, 0o644)


def refuse_existing(connection: sqlite3.Connection, name: str, doc_ids: list[str]) -> None:
    for start in range(0, len(doc_ids), 500):
        part = doc_ids[start:start + 500]
        row = connection.execute(f"select doc_id from chunks where doc_id in ({','.join('?' * len(part))}) limit 1",
                                 part).fetchone()
        if row is not None:
            raise SearchError(f"document {row[0]!r} is already in index {name!r}: delete it first, or add with "
                              "--replace (replace=True) to swap in the new text")


def matching_keys(connection: sqlite3.Connection, ids: list[str], source: str | Path | None,
                   docs_only: bool = False) -> tuple[list[int], list[str]]:
    """Keys of chunks whose id or document id is in `ids`, or whose source is `source` or lies under it; and the ids
    that matched nothing."""
    keys: set[int] = set()
    missing = []
    for value in ids:
        query = "select key from chunks where doc_id = ?" + ("" if docs_only else " or id = ?")
        found = [row[0] for row in connection.execute(query, (value,) if docs_only else (value, value))]
        if not found:
            missing.append(value)
        keys.update(found)
    if source is not None:
        path = str(Path(source).expanduser().resolve())
        keys.update(row[0] for row in connection.execute(
            "select key from chunks where source = ? or substr(source, 1, ?) = ?", (path, len(path) + 1, path + "/")))
    return sorted(keys), missing
