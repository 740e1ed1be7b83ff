"""create_app: the FastAPI application — body limits, OpenAI-shaped errors, authentication of every request except
GET /health, and the model, usage, health and metrics routes (generation routes live in openai_routes.py)."""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import math
from typing import Any

import msgspec
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from llmasos.engine.async_llm import EngineDeadError
from llmasos.server.auth import KeyInfo, lookup_key, usage_summary
from llmasos.server.lifecycle import ModelManager, not_found
from llmasos.server.metering import metering_unavailable
from llmasos.server.protocol import APIError, clip
from llmasos.server.state import ServedModel, ServerSettings, ServerState

log = logging.getLogger(__name__)
CLIENT_CLOSED = 499  # nginx's "client closed request": recorded in metrics, never seen by the client


class BodyLimitMiddleware:
    """Refuse bodies over the limit with 413, whether announced by Content-Length or streamed in chunks."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_large = APIError(413, f"request body exceeds {self.max_bytes} bytes", code="request_too_large")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            scope.setdefault("state", {})["error"] = too_large.message
            return await JSONResponse(too_large.body(), status_code=413)(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise too_large
            return message

        return await self.app(scope, limited_receive, send)


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


# The JSON parser: json.loads, guarded. Measured against msgspec (already a dependency): msgspec rejects deep nesting
# only at the interpreter's recursion limit (~1,000 levels, as a RecursionError), refuses a lone "\ud800" as
# "Input data was truncated" without naming the field, and rejects integers past 64 bits as a whole-body error; the
# standard parser plus one iterative walk of the result names the field of every refusal, for ~13 ms parsing and ~8 ms
# walking a 1.5 MB body of token ids (msgspec: ~9 ms). json.loads itself stops at the recursion limit
# (RecursionError) and at Python's 4,300-digit int-str limit (ValueError); the walk then holds nesting to
# MAX_JSON_DEPTH, integers to 64 bits and every string to valid UTF-8.
MAX_OBJECT_MEMBERS = 4096  # no object of the API holds more (logit_bias takes 1,024); token ids come in arrays
MAX_JSON_DEPTH = 64  # tool schemas in chat_template_kwargs nest ~10 levels; 600 made a template log 3,000 lines
_INT_RANGE = (-(2 ** 63), 2 ** 64)  # int64 and uint64: no field of the API takes more, and torch takes no more


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _path(parts: tuple) -> str:
    return ".".join(clip(part, 40) for part in parts) or "body"


def _bad_string(text: str, parts: tuple) -> APIError | None:
    """Strings must encode to UTF-8: a lone surrogate ("\\ud800") would break the tokenizer or the response."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        param = _path(parts)
        return APIError(400, f"invalid value for {param}: the string is not valid UTF-8 (a lone surrogate at "
                        f"character {exc.start})", param=param)
    return None


def check_json(data: Any) -> None:
    """Raise a 400 APIError naming the field for nesting past MAX_JSON_DEPTH, a string that is not valid UTF-8, an
    integer past 64 bits or an infinite number. Iterative, so that no input can exhaust the stack."""
    stack = [(data, (), 1)]
    while stack:
        node, parts, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"request body is nested deeper than {MAX_JSON_DEPTH} levels (at "
                           f"{clip(_path(parts))})", param=_path(parts[:1]) if parts else None)
        if type(node) is list and node and set(map(type, node)) == {int} \
                and _INT_RANGE[0] <= min(node) and max(node) < _INT_RANGE[1]:
            continue  # token ids: the common large body, checked at C speed
        if isinstance(node, dict) and len(node) > MAX_OBJECT_MEMBERS:  # before walking or validating 150k keys
            param = _path(parts) or None
            raise APIError(400, f"an object in the request body has {len(node)} members; at most "
                           f"{MAX_OBJECT_MEMBERS} are allowed" + (f" (at {clip(param)})" if param else ""),
                           param=clip(param) if param else None)
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if isinstance(key, str) and (error := _bad_string(key, (*parts, key))) is not None:
                raise error
            kind = type(value)
            if kind is dict or kind is list:
                stack.append((value, (*parts, key), depth + 1))
            elif kind is str:
                if (error := _bad_string(value, (*parts, key))) is not None:
                    raise error
            elif kind is int and not _INT_RANGE[0] <= value < _INT_RANGE[1]:
                param = _path((*parts, key))
                raise APIError(400, f"invalid value for {param}: integer out of range", param=param)
            elif kind is float and not math.isfinite(value):
                param = _path((*parts, key))
                raise APIError(400, f"invalid value for {param}: number out of range", param=param)


def _validation_message(errors: list) -> tuple[str | None, str]:
    """The param and message of pydantic's first error. A union's alternatives ('str', 'list[int]', 'TextPart') are
    dropped from the path, and a value that none of them accepts is described by the alternatives."""
    locs = [[part for part in error["loc"] if part != "body"] for error in errors]
    loc = locs[0]
    cut = next((i for i, part in enumerate(loc) if isinstance(part, str) and ("[" in part or part in _UNION_TAGS)),
               None)
    param = ".".join(clip(part, 40) for part in loc[:cut]) or None
    if cut is None:
        message = errors[0]["msg"].removeprefix("Value error, ")
    else:
        tags = dict.fromkeys(str(other[cut]) for other in locs if len(other) > cut and other[:cut] == loc[:cut])
        message = f"expected one of {', '.join(tags)}"
    return param, (f"invalid value for {param}: {message}" if param else message)


_UNION_TAGS = {"str", "int", "float", "bool", "none", "TextPart", "StreamOptions", "ChatMessage"}


async def parse_body(request: Request, model: type[BaseModel]) -> Any:
    """Read and validate a JSON body; every failure is a 400 naming the field (499 when the client hangs up)."""
    try:
        raw = await request.body()
    except ClientDisconnect:  # nobody reads the answer; the 499 is for the metrics, and no traceback for the log
        raise APIError(CLIENT_CLOSED, "the client closed the connection before sending the whole body",
                       code="client_closed") from None
    try:
        # msgspec's C decoder first (2-3x json's on large bodies, all of it on the event loop); anything it refuses
        # is parsed again by json for a precise message (depth, NaN, integers, UTF-8).
        data = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError, ValueError):
        data = _parse_precisely(raw)
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    check_json(data)
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as exc:
        param, message = _validation_message(exc.errors())
        raise APIError(400, message, param=param) from None


def _parse_precisely(raw: bytes) -> Any:
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise APIError(400, f"request body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc.msg}") from None
    except UnicodeDecodeError:
        raise APIError(400, "request body is not valid JSON: it is not valid UTF-8") from None
    except ValueError as exc:  # Python's int-str limit (4,300 digits), NaN, Infinity
        reason = "an integer is too long" if "digits" in str(exc) else clip(exc)
        raise APIError(400, f"request body is not valid JSON: {reason}") from None


def authenticate(state: ServerState, authorization: str) -> KeyInfo | None:
    """The key of a request (None when the server runs without keys), or a 401 APIError. Blocking (database)."""
    if not state.auth_required():
        return None
    scheme, _, secret = authorization.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>' (`llmasos keys create --name NAME` "
                       "makes one)", code="invalid_api_key")
    key = lookup_key(secret.strip())
    if key is None:
        raise APIError(401, "incorrect, revoked or expired API key provided", code="invalid_api_key")
    return key


class AuthMiddleware:
    """Default deny: once a key exists, every request but GET /health needs a valid key, decided before routing, so
    that no spelling of a path ('//v1/models', '/V1/MODELS', '%2f', '..') and no route added later answers without
    one. The key is left in the request's state for the routes. The web console's ConsoleMiddleware, just outside,
    decides its login page, static files and session requests (marked `console_open`) itself."""

    def __init__(self, app, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope.get("state", {}).get("console_open"):  # the console's login, static files or a valid session
            return await self.app(scope, receive, send)
        key = None
        if scope["path"] != "/health":
            headers = Headers(scope=scope)
            if hmac.compare_digest(headers.get("authorization", "").encode("utf-8", "surrogatepass"),
                                   f"Bearer {self.state.internal_token}".encode()):
                scope.setdefault("state", {})["key"] = None  # this process's own Service
                return await self.app(scope, receive, send)
            try:
                try:
                    key = await run_in_threadpool(authenticate, self.state, headers.get("authorization", ""))
                except SQLAlchemyError as exc:  # fail closed: no key can be checked, so nothing is served
                    raise metering_unavailable(exc) from None
            except APIError as error:
                scope.setdefault("state", {})["error"] = error.message  # for the access log
                return await error_response(error)(scope, receive, send)
        scope.setdefault("state", {})["key"] = key
        return await self.app(scope, receive, send)


def forbidden(key: KeyInfo, model_id: str) -> APIError:
    return APIError(403, f"key {key.name!r} is not allowed to use model {clip(model_id)!r}", type="permission_error",
                    param="model", code="model_not_allowed")


_SERVES = {"embed": "is an embedding model: it serves POST /v1/embeddings (and /v1/score, /v1/rerank)",
           "classify": "is a sequence classifier: it serves POST /classify (and, with one label, /v1/score and "
                       "/v1/rerank)",
           "generate": "generates text: it serves completions and chat",
           "seq2seq": "is an encoder-decoder (seq2seq) model: it serves POST /v1/completions, with its input as the "
                      "prompt"}
_WANTED = {("generate",): "completions or chat", ("embed",): "embeddings", ("classify",): "classification",
           ("generate", "seq2seq"): "completions or chat"}


def wrong_kind_message(model_id: str, served_task: str, wanted: tuple[str, ...]) -> str:
    """The 400 for a route asked of the wrong kind of model, naming the routes the model does serve."""
    if served_task == "generate" and wanted == ("embed",):
        return (f"model {model_id!r} generates text and has no embeddings; serve an encoder (a BERT-family "
                "sentence-transformers model) for POST /v1/embeddings")
    if served_task == "generate" and wanted == ("classify",):
        return (f"model {model_id!r} generates text and is not a sequence classifier; serve a "
                "*ForSequenceClassification checkpoint for POST /classify")
    if served_task == "seq2seq" and wanted == ("generate",):
        return (f"model {model_id!r} is an encoder-decoder (seq2seq) model without a chat template, so it serves no "
                "chat; send its input as the prompt of POST /v1/completions")
    if served_task in ("generate", "seq2seq") and wanted not in (("generate",), ("generate", "seq2seq")):
        return (f"model {model_id!r} generates text and cannot score text pairs; serve a cross-encoder (a one-label "
                "sequence classifier) or an embedding model for POST /v1/score and /v1/rerank")
    serves = _SERVES.get(served_task, f"serves {served_task!r} requests")
    return f"model {model_id!r} {serves}, not {_WANTED.get(wanted, 'scores')}"


async def use_model(state: ServerState, request: Request, model_id: str, task: str | tuple[str, ...] | None = None,
                    keep_alive: float | None = None) -> ServedModel:
    """The model a request names, loaded (waiting for its load when needed), leased to the request until its last
    byte is sent (AccessLogMiddleware releases the lease). 404 for a model this server cannot serve, 403 for one the
    key may not use (decided before anything is loaded), 400 for the wrong kind of model."""
    key = request.state.key
    if key is not None and not key.allows(model_id):
        if not await state.models.knows(model_id):
            raise not_found(model_id)
        raise forbidden(key, model_id)
    await state.models.adopt_derived(model_id)  # a library model with an ADAPTER line whose base is loaded
    base = state.models.base_of(model_id)  # a LoRA adapter: served unmerged on its base
    served = await state.models.acquire(base or model_id, keep_alive)
    derived = state.models.adapter_spec(model_id)
    if derived is not None:  # the derived model's own system prompt, template and defaults, on the base's engine
        served = dataclasses.replace(served, spec=derived)
    scope_state = request.scope.setdefault("state", {})
    scope_state.setdefault("leases", []).append(served.id)
    scope_state["model"] = model_id
    scope_state["lora"] = model_id if base is not None else None
    wanted = (task,) if isinstance(task, str) else task
    if wanted is not None and served.task not in wanted:  # e.g. a completion asked of an embedding model
        raise APIError(400, wrong_kind_message(model_id, served.task, wanted), param="model",
                       code="model_not_supported")
    return served


def create_app(models: dict[str, ServedModel] | ModelManager, settings: ServerSettings | None = None) -> FastAPI:
    """The app over `models`: a ModelManager (what `llmasos serve` builds), or a dict of loaded models, which are then
    all the server serves, kept loaded until stopped."""
    settings = settings or ServerSettings()
    if not isinstance(models, ModelManager):
        models = ModelManager(models)
    app = FastAPI(title="LLMasOS", docs_url=None, redoc_url=None, openapi_url="/openapi.json")  # behind AuthMiddleware
    from llmasos.server.openapi import install_openapi

    install_openapi(app)
    state = ServerState(models=models, settings=settings)
    app.state.llmasos = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        # The access log line of the request carries the message (already clipped to what the client sees).
        request.scope.setdefault("state", {})["error"] = exc.message
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError):
        param, message = _validation_message(exc.errors() or [{"loc": (), "msg": "invalid request"}])
        return error_response(APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(_request: Request, exc: EngineDeadError):
        log.error("generation failed: %s", exc)  # the request was in flight when its engine went away
        return error_response(APIError(500, "the model's engine stopped while generating this request; it is "
                                       "being restarted, retry shortly", type="server_error", code="engine_died"))

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, exc: Exception):
        log.exception("internal error")  # details go to the log, never to the client
        return error_response(APIError(500, "internal server error", type="server_error"))

    async def start_metering() -> None:
        await run_in_threadpool(state.ledger.start)

    async def stop_metering() -> None:  # the last usage entries of a server that stops: written or journaled
        await run_in_threadpool(state.ledger.close)

    app.router.add_event_handler("startup", start_metering)
    app.router.add_event_handler("shutdown", stop_metering)

    @app.get("/health")
    async def health():
        state.models.ensure_running()
        alive = state.models.all_alive()
        return JSONResponse({"status": "ok" if alive else "unavailable"}, status_code=200 if alive else 503,
                            headers={"x-llmasos-instance": state.instance_id})

    protected = APIRouter()  # AuthMiddleware guards every route but /health

    @protected.get("/metrics")
    async def metrics():
        state.metrics.refresh(state.models.loaded())
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @protected.get("/v1/models")
    async def list_models(request: Request):
        """Every model this server can serve (the whole library when it serves the library); `loaded` marks those
        in memory now, which answer without a load."""
        key = request.state.key
        catalog = await run_in_threadpool(state.models.catalog)
        return {"object": "list", "data": [model_card(*entry) for entry in catalog
                                           if key is None or key.allows(entry[0])]}

    @protected.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        key = request.state.key
        catalog = await run_in_threadpool(state.models.catalog)
        for entry in catalog:
            if entry[0] == model_id:
                if key is not None and not key.allows(model_id):
                    raise forbidden(key, model_id)
                return model_card(*entry)
        raise not_found(model_id)

    from llmasos.server.admin_routes import add_admin_routes

    add_admin_routes(protected, state)

    @protected.get("/v1/usage")
    async def usage(request: Request):
        key = request.state.key
        if key is None:
            raise APIError(400, "usage is per API key; this server runs without keys")
        return {"object": "list", "data": await run_in_threadpool(usage_summary, key.name)}  # database: off the loop

    from llmasos.server.openai_routes import add_generation_routes

    add_generation_routes(protected, state)
    from llmasos.server.embeddings_routes import add_embedding_routes

    add_embedding_routes(protected, state)
    from llmasos.server.score_routes import add_score_routes

    add_score_routes(protected, state)
    from llmasos.server.index_routes import add_index_routes

    add_index_routes(protected, state)
    from llmasos.server.tokenize_routes import add_tokenize_routes

    add_tokenize_routes(protected, state)
    app.include_router(protected)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(AuthMiddleware, state=state)  # outside the body limit: strangers get 401, not 413
    from llmasos.server.console import install_console

    install_console(app, state)  # the web console at /: its session middleware runs just before AuthMiddleware
    from llmasos.server.guard import install_guard

    install_guard(app, state)  # outside auth: Host, CORS preflight and JSON Content-Type come before the key
    from llmasos.server.logs import AccessLogMiddleware

    # Outermost: every request is counted (by route template and status) and logged, and its leases released.
    app.add_middleware(AccessLogMiddleware, state=state)
    return app


def model_card(model_id: str, slot, row, parent: str | None = None) -> dict:
    """OpenAI's model object, with `loaded`, the context length (of the engine when loaded, else the library's) and,
    for a LoRA adapter, `parent`: its base (vLLM's field), whose slot it shares."""
    served = slot.served if slot is not None else None
    created = served.created if served is not None else \
        int(row.created_at.timestamp()) if row is not None and row.created_at else 0
    max_model_len = served.max_model_len if served is not None else row.context_length if row is not None else None
    return {"id": model_id, "object": "model", "created": created, "owned_by": "llmasos", "root": model_id,
            "parent": parent, "max_model_len": max_model_len,
            "loaded": slot is not None and slot.state == "loaded"}
