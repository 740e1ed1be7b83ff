"""The console's JSON endpoints: log in and out, create and revoke keys, remove and copy library models, live server
stats and a run's metrics. State changes pass ConsoleMiddleware's CSRF check first; bodies are JSON (the guard)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from llmasos.server.app import parse_body
from llmasos.server.console import queries
from llmasos.server.console import session as console_session
from llmasos.server.console.session import cookie_header, read_cookie
from llmasos.server.protocol import APIError
from llmasos.server.state import ServerState


class Login(BaseModel):
    key: str = Field(min_length=1, max_length=256)


class NewKey(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    max_concurrency: int | None = Field(default=None, ge=1)
    token_quota: int | None = Field(default=None, ge=1)
    models: list[str] | None = None
    admin: bool = False


class KeyName(BaseModel):
    name: str = Field(min_length=1, max_length=64)


class ModelName(BaseModel):
    name: str = Field(min_length=1, max_length=256)


class NewRun(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    model: str = Field(min_length=1, max_length=256)
    method: str = "lora"
    data: str = Field(min_length=1)
    max_steps: int | None = Field(default=None, ge=1, le=100_000)
    learning_rate: float | None = Field(default=None, gt=0, le=1)


class PullRequest(BaseModel):
    spec: str = Field(min_length=1, max_length=300)
    name: str | None = Field(default=None, max_length=256)


class ModelCopy(BaseModel):
    source: str = Field(min_length=1, max_length=256)
    target: str = Field(min_length=1, max_length=256)


def histogram_quantiles(histogram, model_id: str, quantiles=(0.5, 0.95)) -> dict[str, float | None]:
    """Upper bucket bounds holding each quantile of a Prometheus histogram's observations for one model."""
    buckets = [(float(s.labels["le"]), s.value) for metric in histogram.collect() for s in metric.samples
               if s.name.endswith("_bucket") and s.labels.get("model") == model_id]
    buckets.sort()
    total = buckets[-1][1] if buckets else 0
    out: dict[str, float | None] = {}
    for q in quantiles:
        out[f"p{round(q * 100)}"] = next((le for le, count in buckets if count >= q * total), None) if total else None
    return out


def counter_value(counter, model_id: str) -> float:
    return sum(s.value for metric in counter.collect() for s in metric.samples
               if s.name.endswith("_total") and s.labels.get("model") == model_id)


def add_api(router: APIRouter, state: ServerState) -> None:
    @router.post("/console/login")
    async def login(request: Request):
        from llmasos.server.auth import lookup_key

        body: Login = await parse_body(request, Login)
        key = await run_in_threadpool(lookup_key, body.key.strip())
        if key is None:
            raise APIError(401, "incorrect, revoked or expired API key", code="invalid_api_key")
        if not console_session.is_admin(key):
            raise APIError(403, f"key {key.name!r} is not an admin key: the console needs one (`llmasos keys create "
                           "--admin --name NAME`)", type="permission_error", code="not_admin")
        cookie = request.app.state.console_sessions.create(key)
        return JSONResponse({"ok": True, "key": key.name},
                            headers={"set-cookie": cookie_header(cookie, secure=request.url.scheme == "https")})

    @router.post("/console/logout")
    async def logout(request: Request):
        request.app.state.console_sessions.end(read_cookie(request.headers))
        return JSONResponse({"ok": True}, headers={"set-cookie": cookie_header("", max_age=0)})

    @router.post("/console/api/keys")
    async def create(request: Request):
        from llmasos.server.auth import create_key

        body: NewKey = await parse_body(request, NewKey)
        options: dict[str, Any] = {"admin": True} if body.admin else {}
        try:
            secret = await run_in_threadpool(lambda: create_key(
                body.name, token_quota=body.token_quota, rpm=body.rpm, tpm=body.tpm,
                max_concurrency=body.max_concurrency, models=[m for m in body.models or [] if m] or None, **options))
        except ValueError as exc:
            raise APIError(400, str(exc), param="name") from None
        except TypeError:
            raise APIError(400, "this server's database has no admin keys yet (api_keys.admin)", param="admin") \
                from None
        return {"name": body.name, "key": secret}

    @router.post("/console/api/keys/revoke")
    async def revoke(request: Request):
        from llmasos.server.auth import revoke_key

        body: KeyName = await parse_body(request, KeyName)
        try:
            await run_in_threadpool(revoke_key, body.name)
        except ValueError as exc:
            raise APIError(404, str(exc), param="name", type="not_found_error") from None
        return {"name": body.name, "revoked": True}

    @router.post("/console/api/models/remove")
    async def remove(request: Request):
        from llmasos.errors import LibraryError
        from llmasos.library.manage import remove_model

        body: ModelName = await parse_body(request, ModelName)
        if state.models.slot(body.name) is not None and state.models.slot(body.name).state != "unloaded":
            raise APIError(409, f"model {body.name!r} is loaded; stop it first", param="name")
        try:
            freed = await run_in_threadpool(remove_model, body.name)
        except LibraryError as exc:
            raise APIError(400, str(exc), param="name") from None
        return {"name": body.name, "removed": True, "freed_bytes": freed}

    @router.post("/console/api/models/copy")
    async def copy(request: Request):
        from llmasos.errors import LibraryError
        from llmasos.library.manage import copy_model

        body: ModelCopy = await parse_body(request, ModelCopy)
        try:
            await run_in_threadpool(copy_model, body.source, body.target)
        except LibraryError as exc:
            raise APIError(400, str(exc), param="target") from None
        return {"source": body.source, "target": body.target}

    @router.post("/console/api/models/pull")
    async def start_pull(request: Request):
        """Pull a catalog model or Hub repo in a worker thread; the page polls /console/api/pulls/ID."""
        from llmasos.errors import LibraryError

        body: PullRequest = await parse_body(request, PullRequest)
        try:
            job = await run_in_threadpool(request.app.state.console_pulls.start, body.spec.strip(),
                                          (body.name or "").strip() or None)
        except (LibraryError, ValueError) as exc:
            raise APIError(400, str(exc), param="spec") from None
        return job.to_dict()

    @router.get("/console/api/pulls/{job_id}")
    async def pull_status(request: Request, job_id: str):
        job = request.app.state.console_pulls.jobs.get(job_id)
        if job is None:
            raise APIError(404, f"no pull {job_id!r} on this server", type="not_found_error")
        return job.to_dict()

    @router.get("/console/api/stats")
    async def stats(request: Request):
        """What the Server page polls: per loaded model, the engine's last reported counters (never waits for a
        step), the generated-token counter (the page derives tokens/s) and TTFT / inter-token percentiles."""
        key = request.state.key
        models = []
        for model_id, served in state.models.loaded().items():
            if served.task != "generate" or (key is not None and not key.allows(model_id)):
                continue
            engine = served.llm.metrics()
            models.append({
                "model": model_id, "running": engine.get("num_running", 0), "waiting": engine.get("num_waiting", 0),
                "kv_cache_usage": engine.get("kv_cache_usage", 0.0),
                "prefix_cache_hit_rate": engine.get("prefix_cache_hit_rate", 0.0),
                "preemptions": engine.get("num_preemptions", 0), "weight_bytes": engine.get("weight_bytes", 0),
                "kv_cache_bytes": engine.get("kv_cache_bytes", 0),
                "generation_tokens": counter_value(state.metrics.generation_tokens, model_id),
                "prompt_tokens": counter_value(state.metrics.prompt_tokens, model_id),
                "ttft": histogram_quantiles(state.metrics.ttft, model_id),
                "itl": histogram_quantiles(state.metrics.itl, model_id)})
        return {"time": time.time(), "models": models}

    @router.post("/console/api/runs")
    async def start_run(request: Request):
        """Start `llmasos train` on an uploaded JSONL file (LoRA or full fine-tune of a library model)."""
        from llmasos.home import home
        from llmasos.server.console.launcher import shell_line

        body: NewRun = await parse_body(request, NewRun)
        key = request.state.key
        if key is not None and not key.allows(body.model):
            raise APIError(403, f"key {key.name!r} may not use model {body.model!r}", type="permission_error")
        launcher = request.app.state.console_launcher
        try:
            run = await run_in_threadpool(launcher.start, home(), queries.runs_directory(), body.name, body.model,
                                          body.method, body.data, body.max_steps, body.learning_rate)
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        return {"name": run.name, "status": run.status(), "command": shell_line(run.command)}

    @router.post("/console/api/runs/cancel")
    async def cancel_run(request: Request):
        body: KeyName = await parse_body(request, KeyName)
        try:
            run = request.app.state.console_launcher.cancel(body.name)
        except KeyError:
            raise APIError(404, f"no run named {body.name!r} was started by this server", type="not_found_error") \
                from None
        return {"name": run.name, "status": run.status()}

    @router.get("/console/api/runs/{name:path}")
    async def run_metrics(request: Request, name: str):
        from llmasos.server.console.launcher import LOG_FILE, shell_line

        root = queries.runs_directory()
        directory = await run_in_threadpool(queries.resolve_run, root, name)
        if directory is None:
            raise APIError(404, f"no run named {name!r}", type="not_found_error")
        records = await run_in_threadpool(queries.read_metrics, directory / "metrics.jsonl")
        launched = request.app.state.console_launcher.runs.get(name)
        answer: dict[str, Any] = {"name": name, "records": records, "status": None, "command": None, "log": None}
        if launched is not None:
            answer.update(status=launched.status(), command=shell_line(launched.command))
            if answer["status"] != "running":
                log = await run_in_threadpool(queries.tail, directory / LOG_FILE)
                answer["log"] = log
        return answer
