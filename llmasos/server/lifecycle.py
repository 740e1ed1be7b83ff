"""Which models a running server holds, as Ollama does it: a model loads on its first request (any library model,
by name, unless the server was started for a fixed set), stays loaded for its `keep_alive` after its last request,
and is unloaded when that runs out, or to make room (least recently used first) once `max_loaded` are loaded.
A request holds a lease on its model from admission to its last byte, so nothing in flight is ever unloaded.

All state changes happen on the server's event loop; loading and unloading (seconds to minutes of disk, torch and
engine processes) run in worker threads, and every request for a model that is loading waits for the same load."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool

from llmasos.server.protocol import APIError, clip
from llmasos.server.state import ServedModel

log = logging.getLogger(__name__)

FOREVER = math.inf
DEFAULT_KEEP_ALIVE = 300.0  # Ollama's five minutes, for models loaded on demand
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def parse_keep_alive(value: Any) -> float:
    """Seconds to keep a model loaded after its last request: a number of seconds, a duration such as '5m', '1h30m',
    '90s' or '500ms', or a negative value for 'until stopped' (math.inf). 0 unloads as soon as the model is idle."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"keep_alive must be a number of seconds or a duration such as '5m', not {clip(value)!r}")
    if isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            negative = text.startswith("-")
            body = text.removeprefix("-")
            parts = _DURATION.findall(body)
            if not body or "".join(number + unit for number, unit in parts) != body:
                raise ValueError(f"keep_alive {clip(value)!r} is not a duration: use seconds (300), a duration such "
                                 "as '5m' or '1h', or -1 to keep the model loaded until it is stopped") from None
            seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
            seconds = -seconds if negative else seconds
    else:
        seconds = float(value)
    if math.isnan(seconds):
        raise ValueError("keep_alive must be a number of seconds, not NaN")
    return FOREVER if seconds < 0 else seconds


def describe_keep_alive(seconds: float) -> str:
    if seconds == FOREVER:
        return "until stopped"
    return f"{seconds:g} s"


@dataclass
class Slot:
    """One servable model: where it loads from, and whether (and how busily) it is loaded."""

    id: str
    source: Any  # a library name, a checkpoint directory or a ModelSpec
    default_keep_alive: float  # what a request without keep_alive gets
    keep_alive: float = 0.0  # what the latest request asked for
    pinned: bool = False  # named when the server started: listed even when unloaded, never forgotten
    served: ServedModel | None = None
    state: str = "unloaded"  # unloaded | loading | loaded | unloading
    busy: asyncio.Future | None = None  # the load or unload under way; every waiter awaits the same one
    in_flight: int = 0
    last_used: float = 0.0  # time.monotonic() of the last acquire or release: the LRU order
    expires: float | None = None  # monotonic deadline once idle; None while in flight or kept forever
    loaded_at: float | None = None  # wall clock
    stop_requested: bool = False

    def expires_at(self) -> str | None:
        """The wall-clock expiry as ISO 8601 (UTC), None while in flight or kept until stopped."""
        if self.expires is None:
            return None
        wall = time.time() + (self.expires - time.monotonic())
        return dt.datetime.fromtimestamp(wall, dt.timezone.utc).isoformat(timespec="seconds")


class ModelManager:
    """The models of one server. `models` are loaded already (by `llmasos serve` before it listens, or by the seed
    API) and are kept until stopped unless a request says otherwise; with `library=True` every library model can be
    served by its name and is loaded on its first request with `load_options` (resolve_spec's: dtype, device,
    quantization, engine options, engine_process)."""

    def __init__(self, models: dict[str, ServedModel] | None = None, *, library: bool = False,
                 load_options: dict[str, Any] | None = None, max_loaded: int | None = None,
                 keep_alive: float = DEFAULT_KEEP_ALIVE, loader: Callable[[Slot], ServedModel] | None = None) -> None:
        self.library = library
        self.load_options = dict(load_options or {})
        self.keep_alive = keep_alive
        self.max_loaded = max_loaded if max_loaded is not None else max(3, len(models or {}))
        if self.max_loaded < 1:
            raise ValueError(f"max_loaded must be at least 1, not {self.max_loaded}")
        self._loader = loader or self._load_from_source
        self._slots: dict[str, Slot] = {}
        # LoRA adapters served unmerged, by the model id a request names: adapter -> (its base's id, its directory).
        # They outlive their base's unloads: a base loaded again gets its adapters back.
        self._adapters: dict[str, tuple[str, str]] = {}
        # Library models made FROM a base with an ADAPTER line, served unmerged on their base while it is loaded:
        # their own spec (SYSTEM, PARAMETERs, TEMPLATE) applies to their requests.
        self._adapter_specs: dict[str, Any] = {}
        now = time.monotonic()
        for model_id, served in (models or {}).items():
            self._slots[model_id] = Slot(model_id, served.spec if served.spec is not None else model_id, FOREVER,
                                         FOREVER, pinned=True, served=served, state="loaded", last_used=now,
                                         loaded_at=time.time())
            self._note_adapters(model_id, served)
        self._reaper: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        # Told the library names of the loaded models after every load and unload (the server registry, which
        # `llmasos rm` reads). Called in a worker thread.
        self.on_change: Callable[[list[str]], None] | None = None

    def library_names(self) -> list[str]:
        """The library models loaded or loading now (under their library names, whatever they are served as)."""
        names = set()
        for slot in self._slots.values():
            spec = slot.served.spec if slot.served is not None else None
            if spec is not None and spec.library:
                names.add(spec.name)
            elif slot.state == "loading" and isinstance(slot.source, str):
                names.add(slot.source)
        return sorted(names)

    async def _changed(self) -> None:
        if self.on_change is not None:
            try:
                await run_in_threadpool(self.on_change, self.library_names())
            except OSError as exc:  # the registry is advisory: a failed write must not fail a load
                log.warning("could not update the server registry: %s", exc)

    # --- what is loaded -------------------------------------------------------------------------------------------

    def loaded(self) -> dict[str, ServedModel]:
        """The models loaded now (not those loading or unloading)."""
        return {slot.id: slot.served for slot in self._slots.values() if slot.state == "loaded"}

    def slot(self, model_id: str) -> Slot | None:
        return self._slots.get(model_id)

    def loaded_slots(self) -> list[Slot]:
        return [slot for slot in self._slots.values() if slot.state in ("loaded", "loading", "unloading")]

    def all_alive(self) -> bool:
        return all(served.async_llm.is_alive for served in self.loaded().values())

    def catalog(self) -> list[tuple[str, Slot | None, Any, str | None]]:
        """Every servable model as (id, its slot or None, its library row or None, the base's id for a LoRA adapter
        else None), sorted by id; an adapter shares its base's slot. Blocking when the server serves the library
        (reads the registry)."""
        rows: dict[str, Any] = {}
        if self.library:
            from llmasos.library.registry import list_models

            rows = {row.name: row for row in list_models()}
        ids = sorted({*rows, *(slot.id for slot in self._slots.values() if slot.pinned or slot.state != "unloaded")})
        entries = [(model_id, self._slots.get(model_id), rows.get(model_id), None) for model_id in ids
                   if model_id not in self._adapters]
        entries += [(name, self._slots.get(base), None, base) for name, (base, _) in sorted(self._adapters.items())]
        return entries

    # --- LoRA adapters ---------------------------------------------------------------------------------------------

    def base_of(self, model_id: str) -> str | None:
        """The base model id when `model_id` names a LoRA adapter, else None."""
        entry = self._adapters.get(model_id)
        return entry[0] if entry is not None else None

    def adapters(self) -> dict[str, tuple[str, str]]:
        return dict(self._adapters)

    def _note_adapters(self, base_id: str, served: ServedModel) -> None:
        if served.task != "generate" or not hasattr(served.llm, "list_loras"):
            return
        for name, path in served.llm.list_loras().items():
            self._adapters.setdefault(name, (base_id, str(path)))

    def adapter_spec(self, name: str) -> Any:
        """The spec of a library model served as an adapter on its base (None for plain adapters)."""
        return self._adapter_specs.get(name)

    async def adopt_derived(self, model_id: str) -> None:
        """A library model made FROM a base with an ADAPTER line, asked for while that base is loaded, is served
        unmerged on the base (one copy of the weights) instead of loading a merged copy. Nothing happens otherwise."""
        own = self._slots.get(model_id)
        if not self.library or model_id in self._adapters or (own is not None and (own.pinned
                                                                                 or own.state != "unloaded")):
            return  # not a library server, known already, or loaded merged on its own now
        candidates = [slot for slot in self._slots.values() if slot.state == "loaded" and slot.served is not None
                      and slot.served.task == "generate" and slot.served.spec is not None
                      and slot.served.spec.library]
        if not candidates:
            return
        row = await run_in_threadpool(_library_row, model_id)
        if row is None or not row.adapter or not row.base_name:
            return
        base = next((slot for slot in candidates if slot.served.spec.name == row.base_name), None)
        if base is None:
            return
        from llmasos.spec import resolve_spec

        spec = await run_in_threadpool(resolve_spec, model_id)
        if not spec.adapters or spec.quantization != base.served.spec.quantization:
            return
        if (own := self._slots.get(model_id)) is not None and own.state == "unloaded" and not own.pinned:
            del self._slots[model_id]  # from now on an adapter of the base
        await self.load_adapter(model_id, spec.adapters[0], base.id, derived=True)
        self._adapter_specs[model_id] = spec

    async def load_adapter(self, name: str, path: str, base_id: str, *, derived: bool = False) -> None:
        """Load a LoRA adapter onto a base (loading the base when needed); served as model id `name` from now on.
        `derived`: the library model `name` itself (adopt_derived), whose name it takes over."""
        if not derived and (name in self._slots or (self.library and name != base_id and await self.knows(name)
                                                    and name not in self._adapters)):
            raise APIError(400, f"{clip(name)!r} is the name of a model; give the adapter another name",
                           param="lora_name")
        known = self._adapters.get(name)
        if known is not None and known[0] != base_id:
            raise APIError(400, f"an adapter named {clip(name)!r} is already loaded on {known[0]!r}",
                           param="lora_name")
        served = await self.acquire(base_id)
        try:
            if served.task != "generate":
                raise APIError(400, f"{base_id!r} is not a generating model; LoRA adapters apply to those",
                               param="model")
            from llmasos.engine.lora import LoRAError

            try:
                await run_in_threadpool(served.llm.load_lora, name, path)
            except LoRAError as exc:  # its message names the directory: the client sees "lora_path" instead
                message = str(exc).replace(str(path), "lora_path")
                raise APIError(400, message, param="lora_path") from None
            self._adapters[name] = (base_id, str(path))
        finally:
            self.release(base_id)

    async def unload_adapter(self, name: str) -> bool:
        """Stop serving adapter `name` (requests in flight on it finish first); False when there is none."""
        entry = self._adapters.pop(name, None)
        self._adapter_specs.pop(name, None)
        if entry is None:
            return False
        slot = self._slots.get(entry[0])
        if slot is not None and slot.state == "loaded" and name in slot.served.llm.list_loras():
            await run_in_threadpool(slot.served.llm.unload_lora, name)
        return True

    async def knows(self, model_id: str) -> bool:
        """Whether this server can serve `model_id` (loaded or not)."""
        if model_id in self._slots or model_id in self._adapters:
            return True
        return self.library and await run_in_threadpool(_library_has, model_id)

    # --- leases ---------------------------------------------------------------------------------------------------

    async def acquire(self, model_id: str, keep_alive: float | None = None) -> ServedModel:
        """The model, loaded (waiting for its load when needed), with one more request in flight on it: every
        acquire must be followed by exactly one `release`. Raises a 404 APIError for a model this server cannot
        serve, a 503 when it cannot be loaded now."""
        slot = self._slots.get(model_id) or await self._discover(model_id)
        while slot.state != "loaded":
            if slot.busy is None:  # unloaded: this request starts the load
                slot.busy = asyncio.ensure_future(self._load(slot))
            await asyncio.shield(slot.busy)
            if self._slots.get(model_id) is not slot:  # forgotten meanwhile (removed from the library)
                raise not_found(model_id)
        slot.in_flight += 1
        slot.expires = None
        slot.stop_requested = False
        slot.last_used = time.monotonic()
        # Each request sets the model's keep_alive, its own or the default (as Ollama: it does not stick).
        slot.keep_alive = keep_alive if keep_alive is not None else slot.default_keep_alive
        return slot.served

    def release(self, model_id: str) -> None:
        slot = self._slots.get(model_id)
        if slot is None or slot.in_flight == 0:
            return
        slot.in_flight -= 1
        slot.last_used = time.monotonic()
        if slot.in_flight == 0:
            keep = 0.0 if slot.stop_requested else slot.keep_alive
            slot.expires = None if keep == FOREVER else slot.last_used + keep
            self._poke()

    async def load(self, model_id: str, keep_alive: float | None = None) -> Slot:
        """Load without a request (`llmasos load`): the keep_alive clock starts now."""
        await self.acquire(model_id, keep_alive)
        self.release(model_id)
        return self._slots[model_id]

    async def stop(self, model_id: str) -> Slot | None:
        """Unload now, or as soon as the requests in flight on it are done. None when the model is not loaded."""
        slot = self._slots.get(model_id)
        if slot is None or slot.state == "unloaded":
            return None
        if slot.busy is not None:  # a load or unload under way: act on its outcome
            try:
                await asyncio.shield(slot.busy)
            except APIError:
                return None
            if slot.state != "loaded":
                return None
        if slot.in_flight:
            slot.stop_requested = True
            return slot
        await self._begin_unload(slot)
        return slot

    # --- loading and unloading ------------------------------------------------------------------------------------

    async def _discover(self, model_id: str) -> Slot:
        """A library model seen for the first time (imported, pulled or trained after the server started)."""
        if not self.library:
            raise not_found(model_id)
        found = await run_in_threadpool(_library_has, model_id)
        if not found:
            raise not_found(model_id)
        return self._slots.setdefault(model_id, Slot(model_id, model_id, self.keep_alive, self.keep_alive))

    async def _load(self, slot: Slot) -> None:
        slot.state = "loading"
        try:
            await self._make_room(slot)
            started = time.monotonic()
            try:
                served = await run_in_threadpool(self._loader, slot)
            except APIError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure to load is this request's 503, and logged
                if self.library and not slot.pinned and not await run_in_threadpool(_library_has, slot.id):
                    self._slots.pop(slot.id, None)
                    raise not_found(slot.id) from None
                log.error("could not load model %s: %s", slot.id, exc)
                raise APIError(503, f"model {slot.id!r} could not be loaded: {clip(exc, 300)}", type="server_error",
                               code="model_load_failed") from None
            slot.served, slot.state, slot.loaded_at = served, "loaded", time.time()
            self._note_adapters(slot.id, served)
            slot.last_used, slot.expires = time.monotonic(), None
            log.info("loaded %s in %.1f s", slot.id, time.monotonic() - started)
            self._ensure_reaper()
            await self._changed()
        except BaseException:
            if slot.state == "loading":
                slot.state = "unloaded"
            raise
        finally:
            slot.busy = None

    def _load_from_source(self, slot: Slot) -> ServedModel:
        from llmasos.server.serving import load_served_model

        served = load_served_model(slot.source, slot.id, **self.load_options)
        # Adapters loaded at run time onto this base before it was unloaded come back with it.
        present = served.llm.list_loras() if served.task == "generate" else {}
        for name, (base_id, path) in list(self._adapters.items()):
            if base_id == slot.id and name not in present:
                served.llm.load_lora(name, path)
        return served

    async def _make_room(self, incoming: Slot) -> None:
        """Unload idle models, least recently used first, until `incoming` fits under max_loaded."""
        while True:
            others = [s for s in self._slots.values() if s is not incoming and s.state != "unloaded"]
            if len(others) < self.max_loaded:
                return
            idle = [s for s in others if s.state == "loaded" and s.in_flight == 0]
            if not idle:
                unloading = [s.busy for s in others if s.state == "unloading" and s.busy is not None]
                if unloading:  # room is being made already
                    await asyncio.shield(unloading[0])
                    continue
                raise APIError(503, f"{self.max_loaded} models are loaded and all are serving requests, so "
                               f"{incoming.id!r} cannot be loaded now; retry shortly (or raise "
                               "--max-loaded-models)", type="server_error", code="too_many_models",
                               headers={"Retry-After": "5"})
            victim = min(idle, key=lambda s: s.last_used)
            log.info("unloading %s to make room for %s", victim.id, incoming.id)
            await self._begin_unload(victim)

    async def _begin_unload(self, slot: Slot) -> None:
        served, slot.served = slot.served, None
        slot.state, slot.expires, slot.stop_requested = "unloading", None, False

        async def unload() -> None:
            try:
                await run_in_threadpool(served.async_llm.shutdown)
                log.info("unloaded %s", slot.id)
            finally:
                slot.state, slot.busy, slot.loaded_at = "unloaded", None, None
            await self._changed()

        slot.busy = asyncio.ensure_future(unload())
        await asyncio.shield(slot.busy)

    # --- expiry ---------------------------------------------------------------------------------------------------

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._wake = asyncio.Event()
            self._reaper = asyncio.ensure_future(self._reap())

    async def _reap(self) -> None:
        """Unload each idle model whose keep_alive ran out; sleeps until the next expiry (or a change)."""
        while True:
            now = time.monotonic()
            due = [s for s in self._slots.values()
                   if s.state == "loaded" and s.in_flight == 0 and s.expires is not None and s.expires <= now]
            for slot in due:
                try:
                    await self._begin_unload(slot)
                except Exception:  # noqa: BLE001 - the reaper must outlive one failed shutdown
                    log.exception("unloading %s failed", slot.id)
            deadlines = [s.expires for s in self._slots.values() if s.state == "loaded" and s.expires is not None]
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else 60.0
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=min(timeout, 60.0))
            except asyncio.TimeoutError:
                pass

    def ensure_running(self) -> None:
        """Start the expiry task on the running loop (the app's startup; acquire starts it too)."""
        self._ensure_reaper()

    def close(self) -> None:
        """Stop every loaded model's engine (the server is exiting). Safe from any thread once the loop stopped."""
        if self._reaper is not None:
            self._reaper.cancel()
        for slot in self._slots.values():
            served, slot.served, slot.state = slot.served, None, "unloaded"
            if served is not None:
                served.async_llm.shutdown()


def not_found(model_id: str) -> APIError:
    return APIError(404, f"the model {clip(model_id)!r} does not exist; GET /v1/models lists the models this server "
                    "can serve", param="model", code="model_not_found")


def _library_row(name: str):
    from llmasos.library.names import is_valid_name
    from llmasos.library.registry import get_model

    return get_model(name) if is_valid_name(name) else None


def _library_has(name: str) -> bool:
    from llmasos.library.names import is_valid_name
    from llmasos.library.registry import get_model

    return is_valid_name(name) and get_model(name) is not None


def memory_of(served: ServedModel) -> dict[str, int]:
    """Bytes of weights and KV cache, as the engine last reported them (an encoder: its parameters' bytes)."""
    if served.task != "generate":
        model = served.llm.model
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        return {"weight_bytes": weights, "kv_cache_bytes": 0}
    stats = served.llm.metrics()
    return {"weight_bytes": int(stats.get("weight_bytes", 0)), "kv_cache_bytes": int(stats.get("kv_cache_bytes", 0))}


def device_of(served: ServedModel) -> str:
    spec = served.spec
    device = getattr(spec, "device", None) if spec is not None else None
    return str(device or "cpu")
