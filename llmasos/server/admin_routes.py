"""The models a server holds, as Ollama's API shows and changes them: GET /api/ps (what is loaded: memory, device,
expiry, requests in flight), POST /api/load (load now, with a keep_alive) and POST /api/stop (unload now, or once
the requests in flight are done). `llmasos ps`, `llmasos load` and `llmasos stop` call them.

A key sees and acts on the models it may use; loading is what its first request would do anyway, and a stopped
model loads again on the next request that names it."""

from __future__ import annotations

import datetime as dt
import math

from fastapi import APIRouter, Request
from pydantic import Field

from llmasos.server.app import forbidden, parse_body
from llmasos.server.lifecycle import Slot, device_of, memory_of, not_found
from llmasos.server.protocol import APIError, KeepAlive, clip
from llmasos.server.state import ServerState


class ModelAction(KeepAlive):
    model: str = Field(min_length=1)


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
