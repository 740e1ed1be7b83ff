"""GET /v1/indexes and POST /v1/indexes/{name}/query: the semantic indexes under $LLMASOS_HOME, queried with their
embedding model — the served one when this server serves the index's model (one forward pass at a time, metered as
that model), else one loaded for the index on first use. Keyed, admitted and metered like POST /v1/embeddings."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from llmasos.errors import IndexNotFoundError, SearchError
from llmasos.server.app import forbidden, parse_body, use_model
from llmasos.server.embeddings_routes import EMBED_TASK, EmbeddingService
from llmasos.server.protocol import APIError, IndexQueryRequest, clip
from llmasos.server.score_routes import _metered, _usage
from llmasos.server.state import ServedModel, ServerState

log = logging.getLogger(__name__)

DEFAULT_K = 5


def shown_model(model: str) -> str:
    """An index's model as clients see it (and as usage rows and key allow-lists name it): a library name as it is, a
    directory by its last two path parts, so that no local path reaches a client."""
    path = Path(model)
    return "/".join(path.parts[-2:]) if path.is_absolute() else model


def _search_error(exc: SearchError, param: str | None = None) -> APIError:
    if isinstance(exc, IndexNotFoundError):
        return APIError(404, str(exc).split(" (indexes:")[0] + "; GET /v1/indexes lists the indexes",
                        type="not_found_error", param="name", code="index_not_found")
    return APIError(400, str(exc), param=param)


def index_card(row: dict[str, Any]) -> dict[str, Any]:
    """One index as GET /v1/indexes shows it."""
    return {"id": row["name"], "object": "index", "model": shown_model(row["model"]), "dimension": row["dimension"],
            "chunks": row["chunks"], "documents": row["documents"], "size_bytes": row["size_bytes"],
            "created": row["created"], "updated": row["updated"]}


class IndexCache:
    """Opened indexes, reopened when their manifest changes (every write renames a new directory into place), and the
    embedding models loaded for indexes whose model the server does not serve."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._indexes: dict[str, tuple[tuple[int, int], Any]] = {}
        self._models: dict[str, ServedModel] = {}
        self._model_lock = threading.Lock()

    def index(self, name: str):
        """The index as last written (blocking: call from the thread pool)."""
        from llmasos.search import SemanticIndex
        from llmasos.search.store import MANIFEST, index_directory

        try:
            stat = os.stat(index_directory(name) / MANIFEST)
            stamp = (stat.st_ino, stat.st_mtime_ns)
        except FileNotFoundError:
            stamp = (0, 0)
        with self._lock:
            cached = self._indexes.get(name)
            if cached is not None and cached[0] == stamp:
                return cached[1]
        opened = SemanticIndex.open(name)
        with self._lock:
            self._indexes[name] = (stamp, opened)
        return opened

    def model(self, model: str) -> ServedModel:
        """An embedding model loaded for indexes (blocking, once per model)."""
        from llmasos.search.index import load_embedder

        with self._model_lock:
            served = self._models.get(model)
            if served is None:
                embedder = load_embedder(model)  # refuses a model that does not embed, as the CLI does
                service = EmbeddingService(embedder)
                served = ServedModel(id=shown_model(model), llm=service, async_llm=service, spec=embedder.spec,
                                     task=EMBED_TASK)
                self._models[model] = served
            return served


def add_index_routes(router: APIRouter, state: ServerState) -> None:
    cache = IndexCache()

    async def embedding_model(request: Request, model: str) -> ServedModel:
        if await state.models.knows(model):
            return await use_model(state, request, model, EMBED_TASK)
        key = request.state.key
        if key is not None and not key.allows(shown_model(model)):
            raise forbidden(key, shown_model(model))
        try:
            return await run_in_threadpool(cache.model, model)
        except ValueError:
            log.exception("loading the embedding model of an index failed")  # the reason may name local paths
            raise APIError(503, f"the index's embedding model {clip(shown_model(model))!r} cannot be loaded; the "
                           "server's log says why", type="server_error", code="model_unavailable") from None

    @router.get("/v1/indexes")
    async def list_indexes():
        from llmasos.search.store import list_indexes as rows

        return {"object": "list", "data": [index_card(row) for row in await run_in_threadpool(rows)]}

    @router.get("/v1/indexes/{name}")
    async def get_index(name: str):
        from llmasos.search.store import index_row

        try:
            return index_card(await run_in_threadpool(index_row, name))
        except SearchError as exc:
            raise _search_error(exc, param="name") from None

    @router.post("/v1/indexes/{name}/query")
    async def query_index(name: str, request: Request):
        from llmasos.search.index import MAX_K

        body: IndexQueryRequest = await parse_body(request, IndexQueryRequest)
        param = "top_k" if body.top_k is not None else "k"
        k = body.top_k if body.top_k is not None else body.k if body.k is not None else DEFAULT_K
        if not 1 <= k <= MAX_K:
            raise APIError(400, f"{param} must be from 1 to {MAX_K}, got {k}", param=param)
        if not body.query.strip():
            raise APIError(400, "query must not be empty", param="query")
        try:
            index = await run_in_threadpool(cache.index, name)
        except SearchError as exc:
            raise _search_error(exc, param="name") from None
        served = await embedding_model(request, index.model)
        service = served.llm
        embedder = service.embedder
        if embedder.dimension != index.dimension:
            raise APIError(400, f"index {name!r} holds {index.dimension}-dimensional vectors, but model "
                           f"{clip(served.id)!r} gives {embedder.dimension}-dimensional ones: the index was built "
                           "with another model; create it again with this one", param="name",
                           code="embedding_dimension_mismatch")
        try:
            ids = await run_in_threadpool(lambda: embedder.prepare([body.query])[0][0])
        except ValueError as exc:
            raise APIError(400, str(exc), param="query") from None

        def run():
            vector = service.run(1, lambda: embedder.encode_ids([ids], normalize=True))[0].numpy()
            return index.search(vector, k)

        request_id, hits = await _metered(state, request, served, "index_query", len(ids), run)
        return JSONResponse({"id": request_id, "object": "list", "created": int(time.time()), "index": name,
                             "model": served.id, "data": [hit.to_dict() for hit in hits],
                             "usage": _usage(len(ids))}, headers=state.limiter.headers(request.state.key))
