"""Turning documents into what an index stores: their chunks' rows (id, doc_id, source, text, metadata) and the chunks'
unit vectors, embedded a slice at a time so that a progress bar can follow."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llmasos.errors import SearchError
from llmasos.search.chunking import Chunking, split
from llmasos.search.documents import Document, from_records, read_path

Progress = Callable[[int, int], None]  # (chunks embedded so far, chunks in all)
EMBED_SLICE = 128  # chunks embedded between two progress reports


def num_special_tokens(embedder) -> int:
    return len(embedder.tokenize([""])[0])


def gather(documents, data, ids) -> list[Document]:
    """The documents given in Python and those read from `data` (a path, or a list of paths)."""
    if ids is not None and documents is None:
        raise SearchError("ids= names documents given as documents=, not files given as data=")
    docs = [] if documents is None else from_records(documents, ids=ids)
    paths = [] if data is None else [data] if isinstance(data, (str, Path)) else list(data)
    for path in paths:
        docs.extend(read_path(path))
    if not docs:
        raise SearchError("there is nothing to index: no documents were given")
    return docs


def check_unique(doc_ids: list[str]) -> None:
    seen: set[str] = set()
    for doc_id in doc_ids:
        if doc_id in seen:
            raise SearchError(f"document id {doc_id!r} is given twice: each document needs its own id")
        seen.add(doc_id)


def chunk_rows(docs: list[Document], chunking: Chunking, embedder) -> list[tuple[str, str, str | None, str, str]]:
    """(id, doc_id, source, text, metadata JSON) of every chunk of `docs`."""
    import tokenizers

    tokenizer = None
    if chunking.unit == "tokens" and docs:
        tokenizer = tokenizers.Tokenizer.from_str(embedder.tokenizer.backend.to_str())
        tokenizer.no_truncation()
        tokenizer.no_padding()
    rows = []
    for document in docs:
        text = document.text
        spans = split(text, chunking, tokenizer)
        for number, (start, end) in enumerate(spans):
            chunk_id = document.doc_id if len(spans) == 1 else f"{document.doc_id}#{number}"
            metadata: dict[str, Any] = {"doc_id": document.doc_id, "chunk": number}
            if document.source is not None:
                metadata["source"] = document.source
            if document.base_offset is not None:  # a text file: the line and offset of the chunk in the file
                metadata["line"] = (document.line or 1) + text.count("\n", 0, start)
                metadata["offset"] = document.base_offset + start
            else:  # a record: its line in the file, and the chunk's offset in its text
                if document.line is not None:
                    metadata["line"] = document.line
                metadata["offset"] = start
            metadata.update(document.extra)
            rows.append((chunk_id, document.doc_id, document.source, text[start:end], json.dumps(metadata)))
    return rows


def embed(texts: list[str], embedder, progress: Progress | None) -> tuple[np.ndarray, int]:
    """(len(texts), dimension) float32 unit vectors, embedded a slice at a time so that progress can be shown; and how
    many texts reached the model's length (embedded from their first max_seq_length tokens only)."""
    result = np.empty((len(texts), embedder.dimension), dtype=np.float32)
    num_cut = 0
    if progress is not None:
        progress(0, len(texts))
    for start in range(0, len(texts), EMBED_SLICE):
        part = texts[start:start + EMBED_SLICE]
        id_lists, prompt_length = embedder.prepare(part)
        num_cut += sum(len(ids) >= embedder.max_seq_length for ids in id_lists)
        vectors = embedder.encode_ids(id_lists, prompt_length, batch_size=32, normalize=True)
        result[start:start + len(part)] = vectors.numpy()
        if progress is not None:
            progress(start + len(part), len(texts))
    return result, num_cut
