"""POST /v1/embeddings (OpenAI's shape) for encoder models, and `EmbeddingService`, which stands in a ServedModel
where a generating model has its LLM and AsyncLLM: health, metrics, shutdown and one forward pass at a time."""

from __future__ import annotations

import base64
import threading
import uuid
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from llmasos.server.app import parse_body, use_model
from llmasos.server.protocol import APIError, EmbeddingRequest
from llmasos.server.state import ServedModel, ServerState
from llmasos.server.streaming import admit_metered, settle, usage_entry

EMBED_TASK = "embed"


class OneAtATimeService:
    """What stands in a ServedModel's LLM and AsyncLLM for a model that answers in one forward pass (an encoder, a
    classifier): health, the engine's gauges as far as it has them, shutdown, and `run`, which runs one batch at a
    time and counts what waits and what runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # one forward pass at a time
        self._count_lock = threading.Lock()
        self._stopped = False
        self._waiting = 0
        self._running = 0

    @property
    def is_alive(self) -> bool:
        return not self._stopped

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopped = True

    def metrics(self) -> dict[str, float | int]:
        """The engine's gauges, as far as a one-pass model has them (no KV cache, no preemption)."""
        return {"num_preemptions": 0, "prefix_cache_hit_rate": 0.0, "kv_cache_usage": 0.0,
                "num_running": self._running, "num_waiting": self._waiting}

    def run(self, count: int, forward):
        """`forward()` for a batch of `count` inputs, after the batches before it (blocking: a worker thread)."""
        with self._count_lock:
            self._waiting += count
        with self._lock:
            with self._count_lock:
                self._waiting -= count
                self._running = count
            try:
                return forward()
            finally:
                self._running = 0


class EmbeddingService(OneAtATimeService):
    """An Embedder behind the server. Requests run one batch at a time (the encoder is one forward pass)."""

    def __init__(self, embedder) -> None:
        super().__init__()
        self.embedder = embedder
        self.model, self.tokenizer, self.config = embedder.model, embedder.tokenizer, embedder.config
        self.max_model_len: int = embedder.max_seq_length

    def encode_ids(self, id_lists: list[list[int]], prompt_length: int):
        return self.run(len(id_lists), lambda: self.embedder.encode_ids(id_lists, prompt_length))


def load_embedding_model(model_id: str, spec) -> ServedModel:
    """A ServedModel for an encoder's spec; engine options (KV cache, batch sizes) do not apply to it."""
    from llmasos.embeddings import Embedder

    embedder = Embedder.load(Path(spec.path), dtype="float32" if spec.dtype == "auto" else spec.dtype,
                             device=spec.device)
    service = EmbeddingService(embedder)
    return ServedModel(id=model_id, llm=service, async_llm=service, spec=spec, task=EMBED_TASK)


def _inputs(body: EmbeddingRequest) -> list[str] | list[list[int]]:
    value = body.input
    if isinstance(value, str):
        value = [value]
    if not value:
        raise APIError(400, "input must not be empty", param="input")
    if all(isinstance(item, int) for item in value):
        return [list(value)]
    if any(isinstance(item, list) and not item for item in value):
        raise APIError(400, "input token lists must not be empty", param="input")
    if len(value) > 2048:
        raise APIError(400, f"at most 2048 inputs per request, got {len(value)}", param="input")
    return list(value)


def encode_vector(vector: list[float], encoding_format: str) -> list[float] | str:
    """float: the list; base64: little-endian float32 bytes, base64-encoded (what the openai client asks for)."""
    if encoding_format == "float":
        return vector
    import struct

    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def add_embedding_routes(router: APIRouter, state: ServerState) -> None:
    @router.post("/v1/embeddings")
    async def embeddings(request: Request):
        body: EmbeddingRequest = await parse_body(request, EmbeddingRequest)
        key = request.state.key
        served = await use_model(state, request, body.model, EMBED_TASK, body.keep_alive)
        service: EmbeddingService = served.llm
        if body.dimensions is not None and body.dimensions != service.embedder.dimension:
            raise APIError(400, f"dimensions={body.dimensions} is not supported: model {served.id!r} gives "
                           f"{service.embedder.dimension}-dimensional embeddings only", param="dimensions")
        try:
            id_lists, prompt_length = service.embedder.prepare(_inputs(body))
        except ValueError as exc:
            raise APIError(400, str(exc), param="input") from None
        prompt_tokens = sum(len(ids) for ids in id_lists)
        request.state.usage = (prompt_tokens, 0)
        request_id = f"embd-{uuid.uuid4().hex}"
        entry = usage_entry(state, served, key, "embeddings", request_id, prompt_tokens)
        admission = await admit_metered(state, key, entry, 0)  # database: off the loop
        try:
            vectors = (await run_in_threadpool(service.encode_ids, id_lists, prompt_length)).tolist()
        finally:
            await settle(state, admission, entry)
            state.metrics.prompt_tokens.labels(served.id).inc(prompt_tokens)
        data = [{"object": "embedding", "index": i, "embedding": encode_vector(v, body.encoding_format)}
                for i, v in enumerate(vectors)]
        return JSONResponse({"object": "list", "data": data, "model": served.id,
                             "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}},
                            headers=state.limiter.headers(key))
