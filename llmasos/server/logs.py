"""The server's log: one access line per request (method, path, status, key name — never the key —, model, tokens,
latency), as text or as one JSON object a line (`--log-format json`), for uvicorn's own lines too."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from typing import Any

access_log = logging.getLogger("llmasos.access")

# The fields of an access line, in the order the text form shows them.
ACCESS_FIELDS = ("client", "method", "path", "status", "key", "model", "prompt_tokens", "completion_tokens",
                 "latency_ms", "error")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, and an access line's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        entry.update(getattr(record, "access", None) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")


def logging_config(level: str = "info", log_format: str = "text") -> dict[str, Any]:
    """A dictConfig for uvicorn (its `log_config`) that sends uvicorn's and LLMasOS's loggers to stderr in one
    format."""
    formatter = "json" if log_format == "json" else "text"
    level = level.upper()
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}, "text": {"()": TextFormatter}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": formatter,
                                "stream": "ext://sys.stderr"}},
        "loggers": {name: {"handlers": ["stderr"], "level": level, "propagate": False}
                    for name in ("uvicorn", "uvicorn.error", "llmasos")},
    }


def access_text(fields: dict[str, Any]) -> str:
    """The text form: 127.0.0.1:5100 "POST /v1/chat/completions" 200 key=app model=tiny prompt_tokens=12 ..."""
    head = f'{fields["client"]} "{fields["method"]} {fields["path"]}" {fields["status"]}'
    rest = " ".join(f"{name}={json.dumps(fields[name]) if name == 'error' else fields[name]}"
                    for name in ACCESS_FIELDS[4:] if fields.get(name) is not None)
    return f"{head} {rest}"


class AccessLogMiddleware:
    """Outermost: counts each request in the metrics (route template and status), times it, logs its access line
    once the last byte is sent (a stream's tokens are then final), and releases the leases the request holds on
    models (so an unload waits for streams to end)."""

    def __init__(self, app, state) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = {"code": 500}

        async def recording_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")  # the template that matched, not the raw path
            self.state.metrics.requests.labels(getattr(route, "path", "unmatched"), str(status["code"])).inc()
            request_state = scope.get("state") or {}
            for model_id in request_state.get("leases", ()):
                self.state.models.release(model_id)
            if access_log.isEnabledFor(logging.INFO) and scope["path"] != "/health":
                fields = _access_fields(scope, request_state, status["code"], started)
                access_log.info(access_text(fields), extra={"access": fields})


def _access_fields(scope, request_state: dict, status: int, started: float) -> dict[str, Any]:
    client = scope.get("client")
    key = request_state.get("key")
    job = request_state.get("job")
    usage = (job.prompt_tokens, job.completion_tokens) if job is not None else request_state.get("usage")
    return {"client": f"{client[0]}:{client[1]}" if client else None, "method": scope["method"],
            "path": scope["path"], "status": status, "key": key.name if key is not None else None,
            "model": request_state.get("model"), "prompt_tokens": usage[0] if usage else None,
            "completion_tokens": usage[1] if usage else None,
            "latency_ms": round((time.perf_counter() - started) * 1000, 1), "error": request_state.get("error")}
