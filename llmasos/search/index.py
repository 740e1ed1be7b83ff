"""SemanticIndex: documents chunked, embedded by a library embedding model and kept in a usearch vector index with their
text and metadata; `query` embeds a text the same way and returns the most similar chunks by cosine similarity.

>>> index = SemanticIndex.create("notes", model="minilm", documents=["The cat sat.", {"text": "Dogs bark.", "id": 7}])
>>> index.query("a pet that barks", k=1)[0].id
'7'
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmasos.errors import SearchError
from llmasos.files import atomic_directory
from llmasos.search import store
from llmasos.search.chunking import Chunking
from llmasos.search.documents import Document
from llmasos.search.ingest import Progress, check_unique, chunk_rows, embed, gather, num_special_tokens
from llmasos.search.vectors import GraphSettings, VectorIndex

MAX_K = 1000


@dataclass
class Hit:
    """One chunk found by a query: its id, cosine similarity to the query, text and metadata (doc_id, chunk, source,
    line, offset, and the document's own extra fields)."""

    id: str
    score: float
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "score": self.score, "text": self.text, "metadata": self.metadata}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _model_reference(model: str | Path) -> str:
    """What the manifest records for a model given with its Embedder: a directory as an absolute path, else the
    name as given."""
    text = str(model)
    path = Path(text).expanduser()
    return str(path.resolve()) if ("/" in text or text.startswith(".")) and path.exists() else text


def load_embedder(model: str | Path):
    """The Embedder of a library name or directory, refusing a model that does not embed sentences."""
    from llmasos.embeddings import Embedder, is_embedding_model
    from llmasos.spec import resolve_spec

    spec = resolve_spec(str(model), device="cpu")
    if not is_embedding_model(spec.directory):
        raise SearchError(f"model {str(model)!r} is not an embedding model: an index needs a BERT-family sentence "
                          "encoder (e.g. all-MiniLM-L6-v2 imported with `llmasos import DIR --name minilm`)")
    return Embedder.load(spec, dtype="float32", device="cpu")


class SemanticIndex:
    """A named index under $LLMASOS_HOME/indexes. Build with `create`, reopen with `open`."""

    def __init__(self, name: str, manifest: dict[str, Any], vectors: VectorIndex, embedder=None) -> None:
        self.name, self.manifest, self.vectors = name, manifest, vectors
        self._embedder = embedder
        self.num_cut = 0  # chunks of the last create or add longer than the model reads (embedded from their start)
        self._reader: sqlite3.Connection | None = None  # the chunks database, read-only, opened on first search
        self._reader_lock = threading.Lock()

    def _changed(self, manifest: dict[str, Any], vectors: VectorIndex) -> None:
        """Take a new state (written here or by another process); the chunks database is reopened on next use."""
        with self._reader_lock:
            self.manifest, self.vectors = manifest, vectors
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    # --- opening ------------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, name: str, embedder=None) -> SemanticIndex:
        """The index as last written. `embedder`: an already loaded Embedder to use instead of loading the index's
        model (it must give vectors of the index's dimension)."""
        manifest = store.read_manifest(name)
        directory = store.index_directory(name)
        try:
            vectors = VectorIndex.load(directory, manifest["dimension"], GraphSettings(**manifest["graph"]))
        except (OSError, RuntimeError, ValueError, TypeError, KeyError) as exc:
            raise SearchError(f"index {name!r} is damaged: its vectors cannot be read ({exc}); remove it with "
                              "`llmasos index rm` and create it again") from None
        if len(vectors) != manifest["num_chunks"] or not (directory / store.CHUNKS_FILE).is_file():
            raise SearchError(f"index {name!r} is damaged: {len(vectors)} vectors for {manifest['num_chunks']} "
                              "chunks, or no chunks.sqlite; remove it with `llmasos index rm` and create it again")
        index = cls(name, manifest, vectors)
        if embedder is not None:
            index.check_embedder(embedder, adding=False)
            index._embedder = embedder
        return index

    @classmethod
    def create(cls, name: str, model: str | Path, documents: Iterable[str | Mapping[str, Any]] | None = None,
               data: str | Path | list[str | Path] | None = None, ids: list[str] | None = None,
               chunking: Chunking | None = None, graph: GraphSettings | None = None, embedder=None,
               progress: Progress | None = None) -> SemanticIndex:
        """Embed `documents` (strings or {"text", "id"?, ...} dicts) and/or the files at `data` (a .jsonl, .json or
        text file, a directory, or a list of those) with `model` (a library name or directory) into a new index
        `name`. Nothing is left on disk when this fails."""
        store.check_index_name(name)
        chunking = chunking or Chunking()
        if documents is None and data is None:
            raise SearchError("give the documents to index (documents=..., or data= a .jsonl file or a directory)")
        with store.locked(name):
            if store.exists(name):
                raise SearchError(f"index {name!r} already exists: add to it with `llmasos index add`, or remove it "
                                  "first with `llmasos index rm`")
            docs = gather(documents, data, ids)  # bad data is refused before the model is loaded
            if embedder is None:
                embedder = load_embedder(model)
                spec = embedder.spec  # a library model is recorded by name, a directory by its absolute path
                reference = spec.name if spec.library else str(Path(spec.path).resolve())
            else:
                reference = _model_reference(model)
            max_tokens = embedder.max_seq_length - num_special_tokens(embedder)
            now = _now()
            manifest = {"format": store.FORMAT_VERSION, "name": name, "model": reference,
                        "model_path": str(embedder.path) if embedder.path else None,
                        "dimension": embedder.dimension, "normalize": True, "metric": "cosine",
                        "chunking": chunking.resolved(max_tokens).to_dict(), "backend": "usearch",
                        "graph": dataclasses.asdict(graph or GraphSettings()), "num_chunks": 0, "num_documents": 0,
                        "next_document": 0, "created": now, "updated": now}
            index = cls(name, manifest, VectorIndex(embedder.dimension, GraphSettings(**manifest["graph"])),
                        embedder)
            with atomic_directory(store.index_directory(name), markers=(store.MANIFEST,)) as directory:
                store.create_chunks_table(directory / store.CHUNKS_FILE)
                _, manifest, vectors = index._write(directory, docs, remove_keys=[], replace=False, progress=progress)
            index._changed(manifest, vectors)
        return index

    @staticmethod
    def list_indexes() -> list[dict[str, Any]]:
        """Every index: name, model, dimension, chunks, documents, size_bytes, created, updated."""
        return store.list_indexes()

    @staticmethod
    def remove(name: str) -> None:
        """Remove index `name` whole (IndexNotFoundError when there is none)."""
        store.remove_index(name)

    # --- properties -----------------------------------------------------------------------------------------------

    @property
    def model(self) -> str:
        return self.manifest["model"]

    @property
    def dimension(self) -> int:
        return self.manifest["dimension"]

    @property
    def num_chunks(self) -> int:
        return self.manifest["num_chunks"]

    @property
    def directory(self) -> Path:
        return store.index_directory(self.name)

    @property
    def embedder(self):
        if self._embedder is None:
            embedder = load_embedder(self.model)
            self.check_embedder(embedder, adding=False)
            self._embedder = embedder
        return self._embedder

    def check_embedder(self, embedder, adding: bool, model_name: str | None = None) -> None:
        """Refuse an embedder whose vectors are not of this index's kind: another dimension always, another model
        (by directory) when adding, since one index must hold one model's vectors."""
        shown = model_name or (str(embedder.path) if embedder.path else "this embedder")
        if embedder.dimension != self.dimension:
            raise SearchError(f"index {self.name!r} holds {self.dimension}-dimensional vectors of model "
                              f"{self.model!r}; {shown!r} gives {embedder.dimension}-dimensional ones: use the "
                              "index's model, or create a new index with this one")
        recorded = self.manifest.get("model_path")
        if adding and recorded and embedder.path and Path(embedder.path).resolve() != Path(recorded).resolve():
            raise SearchError(f"index {self.name!r} was built with model {self.model!r}; adding with {shown!r} would "
                              "mix two models' vectors: add with the index's model, or create a new index")

    # --- changing -------------------------------------------------------------------------------------------------

    def add(self, documents: Iterable[str | Mapping[str, Any]] | None = None,
            data: str | Path | list[str | Path] | None = None,
            ids: list[str] | None = None, replace: bool = False, progress: Progress | None = None) -> list[str]:
        """Chunk, embed and add documents (see `create`); returns the new chunk ids. A document id already in the
        index is an error, unless `replace`, which removes that document's old chunks first."""
        docs = gather(documents, data, ids)
        embedder = self.embedder
        self.check_embedder(embedder, adding=True)
        with store.locked(self.name):
            self._reload()
            with self._rewrite() as directory:
                added, manifest, vectors = self._write(directory, docs, remove_keys=[], replace=replace,
                                                       progress=progress, embedder=embedder)
            self._changed(manifest, vectors)
        return added

    def delete(self, ids: Iterable[str] = (), source: str | Path | None = None) -> int:
        """Remove chunks by chunk id or document id, and/or every chunk from a source file (or from files under a
        source directory); returns how many chunks went. Ids that match nothing are an error."""
        ids = [str(value) for value in ids]
        if not ids and source is None:
            raise SearchError("give the ids to delete, or a source (a file or directory whose chunks go)")
        with store.locked(self.name):
            self._reload()
            connection = store.connect(self.directory / store.CHUNKS_FILE, read_only=True)
            try:
                keys, missing = store.matching_keys(connection, ids, source)
            finally:
                connection.close()
            if missing:
                raise SearchError(f"index {self.name!r} has no chunk or document with id {missing[0]!r}"
                                  + (f" (and {len(missing) - 1} more ids)" if len(missing) > 1 else ""))
            if source is not None and not keys:
                raise SearchError(f"index {self.name!r} has no chunks from {str(source)!r}")
            with self._rewrite() as directory:
                _, manifest, vectors = self._write(directory, [], remove_keys=keys, replace=False, progress=None)
            self._changed(manifest, vectors)
        return len(keys)

    def _reload(self) -> None:
        """Catch up with what another process wrote (called with the lock held)."""
        fresh = SemanticIndex.open(self.name)
        self._changed(fresh.manifest, fresh.vectors)

    def _rewrite(self):
        """A new directory for the index, starting as a copy of its chunks database, renamed into place."""
        from contextlib import contextmanager

        @contextmanager
        def rewrite():
            with atomic_directory(self.directory, markers=(store.MANIFEST,)) as directory:
                store.copy_chunks_table(self.directory / store.CHUNKS_FILE, directory / store.CHUNKS_FILE)
                yield directory

        return rewrite()

    def _write(self, directory: Path, docs: list[Document], remove_keys: list[int], replace: bool,
               progress: Progress | None, embedder=None) -> tuple[list[str], dict[str, Any], VectorIndex]:
        """Apply one change inside `directory` (a copy being built): chunks and vectors in, chunks and vectors out,
        then the vector file and the manifest. Returns the new chunk ids and the new state, which the caller takes
        (`_changed`) once the directory is in place."""
        if docs:  # a deletion needs no model
            embedder = embedder or self.embedder
        manifest = dict(self.manifest)
        vectors = VectorIndex(self.dimension, GraphSettings(**manifest["graph"]))
        connection = store.connect(directory / store.CHUNKS_FILE)
        try:
            next_document = manifest["next_document"]
            for document in docs:
                if not document.doc_id:
                    document.doc_id, next_document = str(next_document), next_document + 1
            check_unique([document.doc_id for document in docs])
            if replace and docs:
                doc_ids = [document.doc_id for document in docs]
                remove_keys = remove_keys + store.matching_keys(connection, doc_ids, None, docs_only=True)[0]
            elif docs:
                store.refuse_existing(connection, self.name, [d.doc_id for d in docs])
            rows = chunk_rows(docs, Chunking(**manifest["chunking"]), embedder)
            if docs and not rows:
                raise SearchError("there is nothing to index: every document is empty or only whitespace")
            if remove_keys:
                connection.executemany("delete from chunks where key = ?", [(key,) for key in remove_keys])
            keys = []
            try:
                for row in rows:
                    cursor = connection.execute("insert into chunks (id, doc_id, source, text, metadata) values "
                                                "(?, ?, ?, ?, ?)", row)
                    keys.append(cursor.lastrowid)
            except sqlite3.IntegrityError:
                raise SearchError(f"chunk id {row[0]!r} is already in index {self.name!r}: document ids must not "
                                  "look like another document's chunk ids (ID#N)") from None
            if rows:
                new_vectors, self.num_cut = embed([row[3] for row in rows], embedder, progress)
            else:
                new_vectors, self.num_cut = np.empty((0, self.dimension), dtype=np.float32), 0
            kept = self.vectors
            vectors.index = kept.index.copy() if len(kept) else vectors.index
            vectors.remove(remove_keys)
            vectors.add(np.asarray(keys, dtype=np.uint64), new_vectors)
            manifest["graph"] = dataclasses.asdict(vectors.tune())
            connection.commit()
            num_documents = connection.execute("select count(distinct doc_id) from chunks").fetchone()[0]
        finally:
            connection.close()
        vectors.save(directory)
        manifest.update(num_chunks=len(vectors), num_documents=num_documents, next_document=next_document,
                        updated=_now())
        store.write_manifest(directory, manifest)
        return [row[0] for row in rows], manifest, vectors

    # --- querying -------------------------------------------------------------------------------------------------

    def embed_query(self, text: str) -> tuple[np.ndarray, int]:
        """The query's unit vector (dimension,) and how many tokens it took."""
        ids = self.prepare_query(text)
        return self.embedder.encode_ids([ids], normalize=True)[0].numpy(), len(ids)

    def prepare_query(self, text: str) -> list[int]:
        """The query's token ids (empty or blank text is an error)."""
        if not isinstance(text, str) or not text.strip():
            raise SearchError("the query text must not be empty")
        return self.embedder.prepare([text])[0][0]

    def query(self, text: str, k: int = 5) -> list[Hit]:
        """The k chunks most similar to `text` (cosine similarity), best first."""
        return self.search(self.embed_query(text)[0], k)

    def search(self, vector: np.ndarray, k: int = 5) -> list[Hit]:
        """The k chunks most similar to a unit vector of the index's dimension, best first."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise SearchError(f"k must be an integer from 1 to {MAX_K}, got {k!r}")
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        if vector.shape[0] != self.dimension:
            raise SearchError(f"index {self.name!r} holds {self.dimension}-dimensional vectors; the query vector has "
                              f"{vector.shape[0]}")
        keys, scores = self.vectors.search(vector, k)
        if not len(keys):
            return []
        marks = ",".join("?" * len(keys))
        with self._reader_lock:
            if self._reader is None:  # kept open: opening costs more than the search (benchmarks/index_query.py)
                self._reader = store.connect(self.directory / store.CHUNKS_FILE, read_only=True)
            rows = {row["key"]: row for row in self._reader.execute(
                f"select key, id, text, metadata from chunks where key in ({marks})", [int(key) for key in keys])}
        return [Hit(rows[int(key)]["id"], float(score), rows[int(key)]["text"], json.loads(rows[int(key)]["metadata"]))
                for key, score in zip(keys, scores, strict=True) if int(key) in rows]
