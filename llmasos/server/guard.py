"""The browser guard, pure ASGI middleware: on a server without keys only loopback (or --allowed-hosts) Host headers
are served (no DNS rebinding); request bodies must be JSON (no cross-origin text/plain POST); CORS answers only the
--cors-origin origins. GET /health is exempt from the Host check: probes send the pod's IP as Host."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders

from llmasos.server.protocol import APIError
from llmasos.server.state import ServerState

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
PROBE_PATHS = frozenset({"/health"})  # liveness and readiness probes: Kubernetes sends Host = the pod's IP
PREFLIGHT_MAX_AGE = "600"


def host_name(host_header: str) -> str:
    """The name of a Host header without its port, lower case: 'LOCALHOST:8000' -> 'localhost', '[::1]:80' ->
    '[::1]'."""
    host = host_header.strip().lower()
    if host.startswith("["):
        address, _, rest = host[1:].partition("]")
        return f"[{address}]" if not rest or rest.startswith(":") else host  # '[::1].evil.example' stays whole
    return host.partition(":")[0]


def bind_host_name(bind: str) -> str | None:
    """The Host name a bind address answers to by itself, or None for a wildcard bind (0.0.0.0, ::)."""
    bind = bind.strip().lower()
    if bind in ("", "0.0.0.0", "::", "[::]"):
        return None
    return f"[{bind}]" if ":" in bind and not bind.startswith("[") else bind


def host_allowed(host_header: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a Host header names this server: a loopback name, or one of `allowed` ('*' all, '.example.com' or
    '*.example.com' that domain and its subdomains)."""
    if "*" in allowed:
        return True
    if not host_header:
        return False
    name = host_name(host_header)
    if name in LOOPBACK_HOSTS:
        return True
    for entry in allowed:
        entry = entry.lower()
        if entry.startswith("*."):
            entry = entry[1:]
        if name == entry or (entry.startswith(".") and (name.endswith(entry) or name == entry[1:])):
            return True
    return False


def normalize_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


class BrowserGuard:
    """In order: the Host check (keyless servers, every path but the probes), CORS preflights (answered here, before
    authentication, since browsers never send keys on a preflight), the JSON Content-Type on bodies, and
    Access-Control-Allow-Origin on the responses to configured origins. Unknown origins get no CORS header at all."""

    def __init__(self, app, state: ServerState) -> None:
        self.app, self.state = app, state
        settings = state.settings
        bind = bind_host_name(settings.host)
        self.allowed_hosts = tuple(settings.allowed_hosts) + ((bind,) if bind else ())
        self.cors_origins = frozenset(normalize_origin(o) for o in settings.cors_origins)

    def cors_value(self, origin: str | None) -> str | None:
        """Access-Control-Allow-Origin for this Origin, or None when it is not configured."""
        if not origin:
            return None
        if "*" in self.cors_origins:
            return "*"
        return origin if normalize_origin(origin) in self.cors_origins else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        allow_origin = self.cors_value(headers.get("origin"))

        async def cors_send(message):
            if message["type"] == "http.response.start" and allow_origin is not None:
                response_headers = MutableHeaders(scope=message)
                response_headers["access-control-allow-origin"] = allow_origin
                response_headers["access-control-expose-headers"] = "retry-after"
                if allow_origin != "*":
                    response_headers.add_vary_header("origin")
            await send(message)

        async def refuse(error: APIError):
            scope.setdefault("state", {})["error"] = error.message  # for the access log
            response = JSONResponse(error.body(), status_code=error.status, headers=error.headers)
            return await response(scope, receive, cors_send)

        if (scope["path"] not in PROBE_PATHS and not host_allowed(headers.get("host"), self.allowed_hosts)
                and not await run_in_threadpool(self.state.auth_required)):  # the database, once a second at most
            return await refuse(APIError(
                400, f"Host {headers.get('host', '')!r} is not served: a server without API keys answers only "
                "localhost, 127.0.0.1 and [::1] (DNS rebinding guard); pass --allowed-hosts NAME to serve another "
                "name, or create a key", code="host_not_allowed"))
        method = scope["method"]
        if method == "OPTIONS" and "origin" in headers and "access-control-request-method" in headers:
            if allow_origin is None:
                return await refuse(APIError(
                    403, f"origin {headers['origin']!r} is not allowed: pass --cors-origin {headers['origin']} to "
                    "serve browser pages from it", type="permission_error", code="cors_origin_not_allowed"))
            preflight = {"access-control-allow-methods": "GET, POST, OPTIONS",
                         "access-control-allow-headers": headers.get("access-control-request-headers",
                                                                     "authorization, content-type"),
                         "access-control-max-age": PREFLIGHT_MAX_AGE}
            return await Response(status_code=204, headers=preflight)(scope, receive, cors_send)
        if method in BODY_METHODS:
            media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
            if media_type != "application/json":
                return await refuse(APIError(
                    415, f"request bodies must be JSON sent with 'Content-Type: application/json' (got "
                    f"{media_type or 'none'!r})", code="unsupported_media_type"))
        return await self.app(scope, receive, cors_send)


def install_guard(app: FastAPI, state: ServerState) -> None:
    """Add the guard; create_app calls this after the auth middleware, so the guard runs before authentication."""
    app.add_middleware(BrowserGuard, state=state)
