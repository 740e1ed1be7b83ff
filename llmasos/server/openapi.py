"""GET /openapi.json: FastAPI's schema of the routes, completed with the request bodies the routes read themselves
(parse_body, so that every bad body is an OpenAI-shaped 400), the JSON the routes answer with, and the error body
every route may answer with. The response models here only describe; the routes build their answers as dicts."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import models_json_schema

REF_TEMPLATE = "#/components/schemas/{model}"


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Described(BaseModel):
    model_config = ConfigDict(extra="allow")  # fields may be added; the ones named here must be there


class Usage(Described):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(Described):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(Described):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class CompletionResponse(Described):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(Described):
    role: Literal["assistant"]
    content: str | None


class ChatChoice(Described):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None
    finish_reason: str | None


class ChatCompletionResponse(Described):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Embedding(Described):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32


class EmbeddingUsage(Described):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(Described):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(Described):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(Described):
    object: Literal["list"]
    data: list[ModelCard]


class IndexHit(Described):
    id: str
    score: float
    text: str
    metadata: dict[str, Any]


class IndexQueryResponse(Described):
    object: Literal["list"]
    index: str
    model: str
    data: list[IndexHit]
    usage: EmbeddingUsage


class IndexCard(Described):
    id: str
    object: Literal["index"]
    model: str
    dimension: int
    chunks: int
    size_bytes: int


class IndexList(Described):
    object: Literal["list"]
    data: list[IndexCard]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]


def request_models() -> dict[str, type[BaseModel]]:
    """The JSON body each POST route parses, by path."""
    from llmasos.server.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, IndexQueryRequest
    from llmasos.server.tokenize_routes import DetokenizeRequest, TokenizeRequest

    return {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
            "/v1/embeddings": EmbeddingRequest, "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest,
            "/v1/indexes/{name}/query": IndexQueryRequest}


# The JSON each route answers with (what FastAPI cannot see in a route that returns a JSONResponse), by path and
# method; True where `stream: true` turns the answer into server-sent events.
RESPONSES: dict[tuple[str, str], tuple[type[BaseModel], bool]] = {
    ("/v1/completions", "post"): (CompletionResponse, True),
    ("/v1/chat/completions", "post"): (ChatCompletionResponse, True),
    ("/v1/embeddings", "post"): (EmbeddingResponse, False),
    ("/v1/models", "get"): (ModelList, False),
    ("/v1/models/{model_id}", "get"): (ModelCard, False),
    ("/v1/indexes", "get"): (IndexList, False),
    ("/v1/indexes/{name}", "get"): (IndexCard, False),
    ("/v1/indexes/{name}/query", "post"): (IndexQueryResponse, False),
    ("/health", "get"): (Health, False),
}


# One event of a `stream: true` answer: a chunk (the answer's id, object, created, model and choices) or "[DONE]".
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
    {"const": "[DONE]"},
    {"type": "string", "contentMediaType": "application/json", "contentSchema": {
        "type": "object", "required": ["id", "object", "created", "model", "choices"],
        "properties": {"choices": {"type": "array"}, "usage": {"$ref": "#/components/schemas/Usage"}}}},
]}}}


def build_openapi(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    bodies = request_models()
    answers = [model for model, _ in RESPONSES.values()]
    models = [(model, mode) for model in [*bodies.values(), ErrorResponse] for mode in ["validation"]]
    models += [(model, "serialization") for model in answers]
    refs, definitions = models_json_schema(models, ref_template=REF_TEMPLATE)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(definitions.get("$defs", {}))
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422s: this server answers 400 instead
        components.pop(name, None)
    error = {"description": "OpenAI-shaped error",
             "content": {"application/json": {"schema": refs[(ErrorResponse, "validation")]}}}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            if path == "/health":
                operation["security"] = []  # the one route AuthMiddleware lets through without a key
            else:
                responses.setdefault("4XX", error)
                responses.setdefault("5XX", error)
            if (path, method) in RESPONSES:
                model, streams = RESPONSES[path, method]
                content = {"application/json": {"schema": refs[(model, "serialization")]}}
                if streams:
                    content["text/event-stream"] = {"schema": SSE_EVENT}
                responses["200"] = {"description": "Successful Response", "content": content}
                if path == "/health":
                    responses["503"] = {"description": "An engine is down", "content": content}
            if path == "/metrics":
                responses["200"] = {"description": "Prometheus metrics",
                                    "content": {"text/plain": {"schema": {"type": "string"}}}}
            if method == "post" and path in bodies:
                operation["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": refs[(bodies[path], "validation")]}}}
    if any(path != "/health" for path in schema.get("paths", {})):
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}]
    return schema


def install_openapi(app: FastAPI) -> None:
    """Serve the completed schema (built once, on first request) at the app's openapi_url."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi
