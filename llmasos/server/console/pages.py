"""The console's pages (GET, server-rendered): chat playground, keys, usage and spend (with CSV export), models,
server, runs. Database reads and rendering run in the thread pool; the pages' JavaScript lives in static/."""

from __future__ import annotations

import csv
import io
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from llmasos.server.console import queries
from llmasos.server.console.render import SECURITY_HEADERS, page
from llmasos.server.protocol import APIError
from llmasos.server.state import ServerState

CHART_WIDTH, CHART_HEIGHT = 600, 120


def bar_chart(values: list[float], labels: list[str]) -> dict[str, Any]:
    """Bars of an SVG chart drawn by the template (no script): x, y, width, height per value, scaled to the max."""
    top = max(values, default=0) or 1
    width = CHART_WIDTH / max(1, len(values))
    bars = [{"x": round(i * width, 2), "width": round(max(1.0, width - 1), 2),
             "height": round(value / top * (CHART_HEIGHT - 14), 2), "label": label, "value": value}
            for i, (value, label) in enumerate(zip(values, labels, strict=True))]
    for bar in bars:
        bar["y"] = round(CHART_HEIGHT - bar["height"], 2)
    return {"bars": bars, "max": top, "width": CHART_WIDTH, "height": CHART_HEIGHT,
            "first": labels[0] if labels else "", "last": labels[-1] if labels else ""}


def _filters(request: Request) -> tuple[str | None, str | None]:
    """The usage page's key and model filters (absent or 'all': no filter)."""
    key, model = request.query_params.get("key"), request.query_params.get("model")
    return (None if key in (None, "*") else key), (None if model in (None, "", "*") else model)


def _date_range(request: Request):
    try:
        return queries.date_range(request.query_params.get("start"), request.query_params.get("end"))
    except ValueError as exc:
        raise APIError(400, str(exc), param="start") from None


def add_pages(router: APIRouter, state: ServerState) -> None:
    def allowed(request: Request, model_id: str) -> bool:
        key = request.state.key
        return key is None or key.allows(model_id)

    @router.get("/login")
    async def login_page(request: Request):
        if not await run_in_threadpool(state.auth_required):
            return RedirectResponse("/", status_code=303)
        return await page(request, "login.html", title="Log in")

    @router.get("/")
    async def chat_page(request: Request):
        catalog = await run_in_threadpool(state.models.catalog)
        models = [{"id": model_id, "loaded": slot is not None and slot.state == "loaded",
                   "parent": parent[0] if parent else None}
                  for model_id, slot, _row, *parent in catalog if allowed(request, model_id)]
        return await page(request, "chat.html", title="Chat", models=models)

    @router.get("/keys")
    async def keys_page(request: Request):
        from llmasos.server.auth import list_keys

        def read():
            return list_keys(), queries.usage_by_key()

        keys, usage = await run_in_threadpool(read)
        empty = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost": 0.0, "last_used": None}
        rows = [{**key, "usage": usage.get(key["name"], empty)} for key in reversed(keys)]
        return await page(request, "keys.html", title="Keys", keys=rows)

    @router.get("/usage")
    async def usage_page(request: Request):
        start, end = _date_range(request)
        key, model = _filters(request)

        def read():
            return (queries.usage_by_key_and_model(start, end, key, model),
                    queries.usage_by_day(start, end, key, model), prices(), queries.usage_names())

        rows, days, price_rows, (key_names, model_names) = await run_in_threadpool(read)
        labels = [day["day"] for day in days]
        charts = [(title, bar_chart([day[field] for day in days], labels)) for title, field in
                  (("Requests", "requests"), ("Prompt tokens", "prompt_tokens"),
                   ("Completion tokens", "completion_tokens"), ("Cost ($)", "cost"))]
        by_model: dict[str, dict[str, Any]] = {}
        for row in rows:
            total = by_model.setdefault(row["model"], {"model": row["model"], "requests": 0, "prompt_tokens": 0,
                                                       "completion_tokens": 0, "cost": 0.0})
            for field in ("requests", "prompt_tokens", "completion_tokens", "cost"):
                total[field] += row[field]
        return await page(request, "usage.html", title="Usage", rows=rows, by_model=list(by_model.values()),
                          charts=charts, start=start.isoformat(), end=end.isoformat(), prices=price_rows,
                          total_cost=sum(row["cost"] for row in rows), key_names=key_names, model_names=model_names,
                          key=key, model=model)

    def prices() -> list[dict[str, Any]]:
        """$ per 1M tokens of every model this server can serve (library rows give the parameter count)."""
        table = state.settings.price_table
        out = []
        for model_id, slot, row, *_parent in state.models.catalog():
            served = slot.served if slot is not None else None
            num_parameters = served.num_parameters if served is not None else int(getattr(row, "num_parameters", 0)
                                                                                   or 0)
            price = table.price(model_id, num_parameters)
            out.append({"model": model_id, "input": price.input, "output": price.output,
                        "custom": model_id in table.overrides})
        return out

    @router.get("/console/usage.csv")
    async def usage_csv(request: Request):
        start, end = _date_range(request)
        rows = await run_in_threadpool(queries.usage_by_key_and_model, start, end, *_filters(request))
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["key", "model", "requests", "prompt_tokens", "completion_tokens", "cost"])
        for row in rows:  # a leading =, +, - or @ would be a formula to a spreadsheet: quote it as text
            cells = [row["key"] or "", row["model"], row["requests"], row["prompt_tokens"], row["completion_tokens"],
                     f"{row['cost']:.8f}"]
            writer.writerow(["'" + c if isinstance(c, str) and c[:1] in ("=", "+", "-", "@") else c for c in cells])
        filename = f"llmasos-usage-{start.isoformat()}-{end.isoformat()}.csv"
        return Response(buffer.getvalue(), media_type="text/csv",
                        headers={**SECURITY_HEADERS, "content-disposition": f'attachment; filename="{filename}"'})

    @router.get("/models")
    async def models_page(request: Request):
        from llmasos.library.manage import summary
        from llmasos.library.registry import list_models
        from llmasos.server.admin_routes import ps_entry

        library = [summary(row) | {"dtype": row.dtype, "format": row.format}
                   for row in await run_in_threadpool(list_models) if allowed(request, row.name)]
        loaded = [ps_entry(slot) for slot in state.models.loaded_slots() if allowed(request, slot.id)]
        return await page(request, "models.html", title="Models", library=library, loaded=loaded,
                          serves_library=state.models.library)

    @router.get("/models/{name:path}")
    async def model_page(request: Request, name: str):
        from llmasos.library.manage import details
        from llmasos.library.modelfile import render_modelfile
        from llmasos.library.names import is_valid_name
        from llmasos.library.registry import get_model
        from llmasos.server.lifecycle import not_found

        def read():
            row = get_model(name) if is_valid_name(name) else None
            if row is None or not allowed(request, name):
                return None
            data = details(row)
            return data, render_modelfile(row)

        found = await run_in_threadpool(read)
        if found is None:
            raise not_found(name)
        data, modelfile = found
        template = data.pop("effective_chat_template", None)
        config = data.pop("config", None)
        return await page(request, "model.html", title=name, name=name, data=data, template=template,
                          config=config, modelfile=modelfile)

    @router.get("/server")
    async def server_page(request: Request):
        return await page(request, "server.html", title="Server")

    @router.get("/runs")
    async def runs_page(request: Request):
        root = queries.runs_directory()
        runs = await run_in_threadpool(queries.find_runs, root)
        evaluations = await run_in_threadpool(queries.find_evaluations, root)
        launched = request.app.state.console_launcher.runs
        names = {run["name"] for run in runs}
        for name in launched:  # started here, no step logged yet
            if name not in names:
                runs.insert(0, {"name": name, "step": None, "loss": None, "checkpoints": [], "finished": False})
        for run in runs:
            run["status"] = launched[run["name"]].status() if run["name"] in launched else \
                "finished" if run["finished"] else "running or stopped"
        from llmasos.library.registry import list_models

        models = [row.name for row in await run_in_threadpool(list_models) if allowed(request, row.name)]
        return await page(request, "runs.html", title="Runs", runs=runs, root=str(root), models=models,
                          evaluations=evaluations)

    @router.get("/runs/{name:path}")
    async def run_page(request: Request, name: str):
        root = queries.runs_directory()
        directory = await run_in_threadpool(queries.resolve_run, root, name)
        if directory is None:
            raise APIError(404, f"no run named {name!r} under {root}", type="not_found_error")
        arguments = await run_in_threadpool(queries.run_arguments, directory)
        checkpoints = sorted(p.name for p in directory.glob("checkpoint-*") if p.is_dir())
        outputs = [str(directory / part) for part in ("final", "adapter") if (directory / part).is_dir()]
        return await page(request, "run.html", title=name, name=name, directory=str(directory),
                          arguments=arguments, checkpoints=checkpoints, outputs=outputs)
