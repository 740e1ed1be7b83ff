"""GET /openapi.json: FastAPI's schema of the routes, completed with the request bodies the routes read themselves
(parse_body, so that every bad body is an OpenAI-shaped 400) and the error body every route may answer with."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

REF_TEMPLATE = "#/components/schemas/{model}"


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def request_models() -> dict[str, type[BaseModel]]:
    """The JSON body each POST route parses, by path."""
    from llmasos.server.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
    from llmasos.server.tokenize_routes import DetokenizeRequest, TokenizeRequest

    return {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
            "/v1/embeddings": EmbeddingRequest, "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest}


def build_openapi(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    bodies = request_models()
    models = [(model, "validation") for model in [*bodies.values(), ErrorResponse]]
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
