"""The models a server holds, as Ollama's API shows and changes them: GET /api/ps (what is loaded: memory, device,
expiry, requests in flight), POST /api/load (load now, with a keep_alive) and POST /api/stop (unload now, or once
the requests in flight are done). `llmasos ps`, `llmasos load` and `llmasos stop` call them.

A key sees and acts on the models it may use; loading is what its first request would do anyway, and a stopped
model loads again on the next request that names it."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

from fastapi import APIRouter, Request
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from llmasos.server.app import forbidden, parse_body
from llmasos.server.lifecycle import Slot, device_of, memory_of, not_found
from llmasos.server.protocol import APIError, KeepAlive, StrictModel, clip
from llmasos.server.state import ServerState


class ModelAction(KeepAlive):
    model: str = Field(min_length=1)


class LoadAdapter(StrictModel):
    lora_name: str = Field(min_length=1, max_length=128)
    lora_path: str = Field(min_length=1, max_length=4096)
    model: str | None = None  # the base; default: the one generating model loaded


class UnloadAdapter(StrictModel):
    lora_name: str = Field(min_length=1, max_length=128)


def adapter_directory(value: str, allowed_roots: tuple[str, ...]) -> str:
    """Where an adapter given to the API may be read from: a library model's adapter (a Modelfile ADAPTER line), or a
    directory inside one of the server's allowed roots (--lora-dir). Anything else is the request's 400."""
    from llmasos.library.names import is_valid_name

    if is_valid_name(value):
        from llmasos.errors import LLMasOSError
        from llmasos.library import resolve_model

        try:
            resolved = resolve_model(value)
        except LLMasOSError:
            resolved = None
        if resolved is not None and resolved.library:
            if resolved.adapter is None:
                raise APIError(400, f"library model {clip(value)!r} has no LoRA adapter (no ADAPTER line)",
                               param="lora_path")
            return str(resolved.adapter)
    path = Path(value).expanduser()
    try:
        path = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise APIError(400, "lora_path is neither a library model with an adapter nor an existing directory",
                       param="lora_path") from None
    for root in allowed_roots:
        if path.is_relative_to(Path(root).resolve()):
            return str(path)
    # No server path is quoted back: the operator knows the --lora-dir roots, a client needs not.
    raise APIError(400, "lora_path is outside the directories adapters may be loaded from (the server's "
                   "--lora-dir" + ("" if allowed_roots else ", and none is set") + "); library adapters are loaded "
                   "by model name", param="lora_path")


def ps_entry(slot: Slot) -> dict:
    served = slot.served
    memory = memory_of(served) if served is not None else {"weight_bytes": 0, "kv_cache_bytes": 0}
    device = device_of(served) if served is not None else None
    size = memory["weight_bytes"] + memory["kv_cache_bytes"]
    return {
        "name": slot.id, "model": slot.id, "state": slot.state, "device": device, "size": size,
        "size_vram": size if device and device.startswith("cuda") else 0, **memory,
        "in_flight": slot.in_flight,
        "loaded_at": dt.datetime.fromtimestamp(slot.loaded_at, dt.timezone.utc).isoformat(timespec="seconds")
        if slot.loaded_at else None,
        "keep_alive": -1 if slot.keep_alive == math.inf else slot.keep_alive,
        "expires_at": slot.expires_at(), "stopping": slot.stop_requested,
    }


def add_admin_routes(router: APIRouter, state: ServerState) -> None:
    def check_key(request: Request, model_id: str) -> None:
        key = request.state.key
        if key is not None and not key.allows(model_id):
            raise forbidden(key, model_id)

    @router.get("/api/ps")
    async def ps(request: Request):
        key = request.state.key
        return {"models": [ps_entry(slot) for slot in state.models.loaded_slots()
                           if key is None or key.allows(slot.id)]}

    @router.post("/api/load")
    async def load(request: Request):
        body: ModelAction = await parse_body(request, ModelAction)
        check_key(request, body.model)
        request.state.model = body.model
        slot = await state.models.load(body.model, body.keep_alive)
        return ps_entry(slot)

    @router.post("/api/stop")
    async def stop(request: Request):
        body: ModelAction = await parse_body(request, ModelAction)
        check_key(request, body.model)
        request.state.model = body.model
        if not await state.models.knows(body.model):
            raise not_found(body.model)
        slot = await state.models.stop(body.model)
        if slot is None:
            raise APIError(404, f"model {clip(body.model)!r} is not loaded", param="model", code="model_not_loaded")
        status = "unloading" if slot.stop_requested else "unloaded"
        return {"model": body.model, "status": status, "in_flight": slot.in_flight}

    def check_admin(request: Request) -> None:
        key = request.state.key
        if key is not None and not getattr(key, "admin", False):
            raise APIError(403, f"key {key.name!r} is not an admin key; loading and unloading adapters needs one "
                           "(`llmasos keys create --admin`)", type="permission_error", code="admin_required")

    @router.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        """vLLM's endpoint: serve a LoRA adapter unmerged on a loaded base, as model id `lora_name`. Admin keys."""
        check_admin(request)
        body: LoadAdapter = await parse_body(request, LoadAdapter)
        base = body.model
        if base is None:
            bases = [m.id for m in state.models.loaded().values() if m.task == "generate"]
            if len(bases) != 1:
                raise APIError(400, "name the base model the adapter applies to in 'model' (" +
                               (", ".join(bases) or "none is loaded") + ")", param="model")
            base = bases[0]
        if not await state.models.knows(base) or state.models.base_of(base) is not None:
            raise not_found(base)
        path = await run_in_threadpool(adapter_directory, body.lora_path, state.settings.lora_dirs)
        request.state.model = body.lora_name
        await state.models.load_adapter(body.lora_name, path, base)
        return {"object": "lora_adapter", "lora_name": body.lora_name, "parent": base, "status": "loaded"}

    @router.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        """Stop serving an adapter; requests in flight on it finish first. Admin keys."""
        check_admin(request)
        body: UnloadAdapter = await parse_body(request, UnloadAdapter)
        request.state.model = body.lora_name
        if not await state.models.unload_adapter(body.lora_name):
            raise APIError(404, f"no LoRA adapter named {clip(body.lora_name)!r} is loaded", param="lora_name",
                           code="model_not_found")
        return {"object": "lora_adapter", "lora_name": body.lora_name, "status": "unloaded"}
