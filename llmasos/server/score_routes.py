"""POST /classify (vLLM's shape) for sequence classifiers, POST /v1/score (vLLM's) and POST /v1/rerank (Jina's and
Cohere's) for cross-encoders (one-label classifiers: sigmoid of the logit) and embedding models (cosine similarity),
and `ClassifierService`, which stands in a ServedModel for a classifier as EmbeddingService does for an encoder."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from llmasos.server.app import parse_body, use_model
from llmasos.server.embeddings_routes import EMBED_TASK, OneAtATimeService
from llmasos.server.protocol import APIError, ClassifyRequest, RerankRequest, ScoreRequest
from llmasos.server.state import ServedModel, ServerState
from llmasos.server.streaming import admit_metered, settle, usage_entry

CLASSIFY_TASK = "classify"
MAX_INPUTS = 2048


def is_classifier_directory(directory: str | Path | None) -> bool:
    """True for a checkpoint whose config.json names a *ForSequenceClassification architecture."""
    from llmasos.classification import is_classifier_checkpoint
    from llmasos.models.loader import read_json_file

    if directory is None or not Path(directory).is_dir():
        return False
    config = read_json_file(Path(directory) / "config.json", required=False)
    return bool(config) and is_classifier_checkpoint(config)


class ClassifierService(OneAtATimeService):
    """A SequenceClassifier behind the server: health, metrics, shutdown, one forward pass at a time."""

    def __init__(self, classifier) -> None:
        super().__init__()
        self.classifier = classifier
        self.model, self.tokenizer, self.config = classifier.model, classifier.tokenizer, classifier.config
        self.labels: list[str] = classifier.labels
        self.max_model_len: int = classifier.max_length

    def prepare(self, texts: list[str], pairs: list[str] | None = None) -> list[tuple[list[int], list[int]]]:
        """(input_ids, token_type_ids) of each text (or pair); a text over the model's length is a ValueError."""
        pairs = pairs if pairs is not None else [None] * len(texts)
        return [self.classifier.encode(text, pair) for text, pair in zip(texts, pairs, strict=True)]

    def logits(self, encoded: list[tuple[list[int], list[int]]], batch_size: int = 16) -> torch.Tensor:
        """(len(encoded), num_labels) float32 logits on the CPU."""
        from llmasos.train.dataset import Example
        from llmasos.train.tasks import pad_batch

        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.config.get("pad_token_id") or 0
        examples = [Example(ids, [], token_type_ids=types) for ids, types in encoded]

        def forward() -> list[torch.Tensor]:
            with torch.inference_mode():
                return [self.model(*pad_batch(examples[start:start + batch_size], pad_id,
                                              self.classifier.device)).float().cpu()
                        for start in range(0, len(examples), batch_size)]

        outputs = self.run(len(examples), forward)
        return torch.cat(outputs) if outputs else torch.empty(0, len(self.labels))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax over the labels; sigmoid for one label or a multi-label classifier (as vLLM and transformers)."""
        if logits.shape[-1] == 1 or self.config.get("problem_type") == "multi_label_classification":
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=-1)


def load_classifier_model(model_id: str, spec) -> ServedModel:
    """A ServedModel for a *ForSequenceClassification checkpoint; engine options do not apply to it."""
    from llmasos.classification import SequenceClassifier

    classifier = SequenceClassifier.load(spec, dtype="float32" if spec.dtype in ("auto", None) else spec.dtype,
                                         device=spec.device or "cpu")
    service = ClassifierService(classifier)
    return ServedModel(id=model_id, llm=service, async_llm=service, spec=spec, task=CLASSIFY_TASK)


def _texts(value: str | list[str], param: str) -> list[str]:
    texts = [value] if isinstance(value, str) else list(value)
    if not texts:
        raise APIError(400, f"{param} must not be empty", param=param)
    if len(texts) > MAX_INPUTS:
        raise APIError(400, f"at most {MAX_INPUTS} inputs per request, got {len(texts)}", param=param)
    if any(not text for text in texts):
        raise APIError(400, f"{param} must not hold empty strings", param=param)
    return texts


def _pairs(text_1: list[str], text_2: list[str], param_1: str = "text_1") -> list[str]:
    """text_1 broadcast to text_2's length (one to many), or as given when both have the same length."""
    if len(text_1) == 1:
        return text_1 * len(text_2)
    if len(text_1) != len(text_2):
        raise APIError(400, f"{param_1} has {len(text_1)} texts and text_2 {len(text_2)}: give one {param_1}, or as "
                       "many as text_2", param=param_1)
    return text_1


Scorer = Callable[[list[str], list[str]], tuple[Any, int, Callable[[], list[float]]]]


def _scorer(served: ServedModel, param: str) -> Scorer:
    """A blocking function (run in the thread pool) from (text_1, text_2) of equal length to (the token ids, the
    prompt tokens, the forward pass giving the scores): sigmoid(logit) of a one-label classifier on the pairs, or the
    cosine similarity of embeddings. Tokenizing first lets the request be admitted on its token count."""
    service = served.llm
    if served.task == CLASSIFY_TASK:
        if len(service.labels) != 1:
            raise APIError(400, f"model {served.id!r} is a classifier with {len(service.labels)} labels; scoring "
                           "needs a cross-encoder (one label), or use POST /classify", param="model",
                           code="model_not_supported")

        def score(first: list[str], second: list[str]):
            encoded = _checked(lambda: service.prepare(first, second), param)
            tokens = sum(len(ids) for ids, _ in encoded)
            return encoded, tokens, lambda: torch.sigmoid(service.logits(encoded)[:, 0]).tolist()

        return score

    def embed_score(first: list[str], second: list[str]):
        unique_first = list(dict.fromkeys(first))
        ids_1, length_1 = _checked(lambda: service.embedder.prepare(unique_first), param)
        ids_2, length_2 = _checked(lambda: service.embedder.prepare(second), param)
        tokens = sum(len(ids) for ids in ids_1) + sum(len(ids) for ids in ids_2)

        def run() -> list[float]:
            vectors_1 = service.encode_ids(ids_1, length_1)
            vectors_2 = service.encode_ids(ids_2, length_2)
            position = {text: i for i, text in enumerate(unique_first)}  # a repeated text_1 is embedded once
            rows = vectors_1[[position[text] for text in first]]
            return torch.nn.functional.cosine_similarity(rows, vectors_2, dim=-1).tolist()

        return ids_1 + ids_2, tokens, run

    return embed_score


def _checked(prepare: Callable[[], Any], param: str) -> Any:
    try:
        return prepare()
    except ValueError as exc:
        raise APIError(400, str(exc), param=param) from None


async def _metered(state: ServerState, request: Request, served: ServedModel, endpoint: str, prompt_tokens: int,
                   run: Callable[[], Any]) -> Any:
    """Admit the request, run the forward pass in the thread pool, and write its usage there (a database write)."""
    key = request.state.key
    request.state.usage = (prompt_tokens, 0)
    request_id = f"{endpoint}-{uuid.uuid4().hex}"
    entry = usage_entry(state, served, key, endpoint, request_id, prompt_tokens)
    admission = await admit_metered(state, key, entry, 0)
    try:
        return request_id, await run_in_threadpool(run)
    finally:
        await settle(state, admission, entry)
        state.metrics.prompt_tokens.labels(served.id).inc(prompt_tokens)


def _usage(prompt_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}


def add_score_routes(router: APIRouter, state: ServerState) -> None:
    async def classify(request: Request):
        body: ClassifyRequest = await parse_body(request, ClassifyRequest)
        texts = _texts(body.input, "input")
        served = await use_model(state, request, body.model, CLASSIFY_TASK, body.keep_alive)
        service: ClassifierService = served.llm
        encoded = await run_in_threadpool(_checked, lambda: service.prepare(texts), "input")
        prompt_tokens = sum(len(ids) for ids, _ in encoded)

        def run() -> torch.Tensor:
            return service.probabilities(service.logits(encoded))

        request_id, probs = await _metered(state, request, served, "classify", prompt_tokens, run)
        data = [{"index": i, "label": service.labels[int(row.argmax())], "probs": row.tolist(),
                 "num_classes": len(service.labels)} for i, row in enumerate(probs)]
        return JSONResponse({"id": f"classify-{request_id.split('-', 1)[1]}", "object": "list",
                             "created": int(time.time()), "model": served.id, "data": data,
                             "usage": _usage(prompt_tokens)}, headers=state.limiter.headers(request.state.key))

    async def score(request: Request):
        body: ScoreRequest = await parse_body(request, ScoreRequest)
        second = _texts(body.text_2, "text_2")
        first = _pairs(_texts(body.text_1, "text_1"), second)
        served = await use_model(state, request, body.model, (CLASSIFY_TASK, EMBED_TASK), body.keep_alive)
        scorer = _scorer(served, "text_1")
        _, prompt_tokens, run = await run_in_threadpool(scorer, first, second)
        request_id, scores = await _metered(state, request, served, "score", prompt_tokens, run)
        data = [{"index": i, "object": "score", "score": value} for i, value in enumerate(scores)]
        return JSONResponse({"id": request_id, "object": "list", "created": int(time.time()), "model": served.id,
                             "data": data, "usage": _usage(prompt_tokens)},
                            headers=state.limiter.headers(request.state.key))

    async def rerank(request: Request):
        body: RerankRequest = await parse_body(request, RerankRequest)
        if not body.query:
            raise APIError(400, "query must not be empty", param="query")
        documents = _texts(body.documents, "documents")
        if body.top_n is not None and body.top_n < 1:
            raise APIError(400, f"top_n must be at least 1, got {body.top_n}", param="top_n")
        served = await use_model(state, request, body.model, (CLASSIFY_TASK, EMBED_TASK), body.keep_alive)
        scorer = _scorer(served, "documents")
        _, prompt_tokens, run = await run_in_threadpool(scorer, [body.query] * len(documents), documents)
        request_id, scores = await _metered(state, request, served, "rerank", prompt_tokens, run)
        order = sorted(range(len(documents)), key=lambda i: -scores[i])[:body.top_n or len(documents)]
        results = [{"index": i, "relevance_score": scores[i]} | ({"document": {"text": documents[i]}}
                                                                   if body.return_documents else {}) for i in order]
        return JSONResponse({"id": request_id, "model": served.id, "results": results,
                             "usage": _usage(prompt_tokens)}, headers=state.limiter.headers(request.state.key))

    # vLLM serves these both with and without /v1 (and rerank on /v2 as Cohere's v2 API); the docs list /classify,
    # /v1/score and /v1/rerank.
    for path in ("/classify", "/v1/classify"):
        router.post(path)(classify)
    for path in ("/score", "/v1/score"):
        router.post(path)(score)
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        router.post(path)(rerank)
