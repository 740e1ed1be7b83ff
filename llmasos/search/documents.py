"""Documents to index: from a JSONL (or JSON) file of {"text": ..., "id": ..., other fields}, from a directory of
text, Markdown and JSONL files, or from Python strings and dicts. Extra fields become the chunks' metadata."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmasos.errors import SearchError, TrainingDataError
from llmasos.files import read_utf8

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
RECORD_SUFFIXES = (".jsonl", ".json")
# Metadata keys the index sets itself; a record may not bring its own.
RESERVED_KEYS = ("doc_id", "chunk", "source", "line", "offset")


@dataclass
class Document:
    """One document: its id, its text, and where it came from (source file, line of its record or 1 for a text
    file, character offset of the text in the file for text files)."""

    doc_id: str
    text: str
    source: str | None = None
    line: int | None = None
    base_offset: int | None = None  # the text's character offset in the source file (text files only)
    extra: dict[str, Any] = field(default_factory=dict)


def from_records(records: Iterable[str | Mapping[str, Any]], ids: list[str] | None = None,
                 metadata: list[Mapping[str, Any]] | None = None, where: str = "documents") -> list[Document]:
    """Documents from strings or {"text", "id"?, ...} dicts (Python callers). Without ids they get none yet: the
    index numbers them."""
    records = list(records)
    if ids is not None and len(ids) != len(records):
        raise SearchError(f"{len(ids)} ids for {len(records)} documents: give one id per document")
    if metadata is not None and len(metadata) != len(records):
        raise SearchError(f"{len(metadata)} metadata entries for {len(records)} documents: give one per document")
    documents = []
    for index, record in enumerate(records):
        label = f"{where}[{index}]"
        document = _document(record, label, source=None, line=None)
        if ids is not None:
            document.doc_id = _doc_id(ids[index], label)
        if metadata is not None:
            document.extra.update(_extra(dict(metadata[index]), label))
        documents.append(document)
    return documents


def _doc_id(value: Any, label: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
        raise SearchError(f"{label}: id must be a non-empty string or an integer, got {value!r}")
    return str(value)


def _extra(fields: dict[str, Any], label: str) -> dict[str, Any]:
    clashing = [key for key in fields if key in RESERVED_KEYS]
    if clashing:
        raise SearchError(f"{label}: field {clashing[0]!r} is set by the index itself ({', '.join(RESERVED_KEYS)}); "
                          "rename it")
    return fields


def _document(record: Any, label: str, source: str | None, line: int | None) -> Document:
    if isinstance(record, str):
        return Document("", record, source, line)
    if not isinstance(record, Mapping):
        raise SearchError(f"{label}: expected a string or an object with a \"text\" field, got "
                          f"{type(record).__name__}")
    fields = dict(record)
    text = fields.pop("text", None)
    if not isinstance(text, str):
        raise SearchError(f"{label}: needs a \"text\" field holding a string"
                          + ("" if text is None else f", got {type(text).__name__}"))
    doc_id = _doc_id(fields.pop("id"), label) if "id" in fields else ""
    return Document(doc_id, text, source, line, extra=_extra(fields, label))


def read_path(path: str | Path) -> list[Document]:
    """Documents from a .jsonl/.json file (one per record), a text file (one), or a directory (every such file in it,
    recursively, in name order). Records without an id get "FILE:LINE" (FILE relative to the directory given)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise SearchError(f"data {str(path)!r} does not exist: give a .jsonl file or a directory of text files")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + RECORD_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise SearchError(f"directory {str(path)!r} holds no {', '.join(TEXT_SUFFIXES + RECORD_SUFFIXES)} files")
        documents = []
        for file in files:
            documents.extend(_read_file(file, file.relative_to(path).as_posix()))
        return documents
    return _read_file(path, path.name)


def _read_file(path: Path, name: str) -> list[Document]:
    from llmasos.train.data import read_items

    source = str(path.resolve())
    suffix = path.suffix.lower()
    if suffix in RECORD_SUFFIXES:
        try:
            items = read_items(path, RECORD_SUFFIXES)
        except TrainingDataError as exc:  # the one reader of data files speaks of training
            raise SearchError(str(exc).replace("there is nothing to train on", "there is nothing to index")) from None
        documents = []
        for item, where in items:
            line = int(where.rsplit(" ", 1)[-1]) if where.rsplit(" ", 2)[-2] == "line" else None
            document = _document(item, where, source, line)
            document.doc_id = document.doc_id or f"{name}:{line if line is not None else len(documents)}"
            documents.append(document)
        return documents
    if suffix not in TEXT_SUFFIXES:
        raise SearchError(f"{path}: unsupported data format {suffix or '(no extension)'!r}; use a .jsonl or .json "
                          f"file of {{\"text\": ...}} records, a text file ({', '.join(TEXT_SUFFIXES)}) or a directory")
    text = read_utf8(path, SearchError)
    return [Document(name, text, source, line=1, base_offset=0)]
