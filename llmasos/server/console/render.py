"""Page rendering: one autoescaping Jinja2 environment over the console's templates, security headers (a CSP without
inline scripts or styles), and the session cookie a keyless server hands out with its pages."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from llmasos.server.console.session import cookie_header

HERE = Path(__file__).parent
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff",
                    "referrer-policy": "no-referrer", "x-frame-options": "DENY", "cache-control": "no-store"}
PAGES = (("/", "Chat"), ("/keys", "Keys"), ("/usage", "Usage"), ("/models", "Models"), ("/server", "Server"),
         ("/runs", "Runs"))


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    from llmasos.library.manage import human_count, human_size

    env.filters.update(human_size=human_size, human_count=human_count)
    return env


def _render(name: str, context: dict[str, Any]) -> str:
    return environment().get_template(name).render(**context)


async def page(request: Request, template_name: str, /, **context: Any) -> HTMLResponse:
    """Render a template off the event loop, with the session's CSRF token, the navigation and the security
    headers."""
    sessions = request.app.state.console_sessions
    scope_state = request.scope.get("state", {})
    session_id = scope_state.get("console_session")
    key = scope_state.get("key")
    context = {"csrf_token": sessions.csrf_token(session_id) if session_id else "", "pages": PAGES,
               "path": request.url.path, "key_name": key.name if key is not None else None, **context}
    html = await run_in_threadpool(_render, template_name, context)
    response = HTMLResponse(html, headers=SECURITY_HEADERS)
    if new_cookie := scope_state.get("console_new_cookie"):
        response.headers["set-cookie"] = cookie_header(new_cookie, secure=request.url.scheme == "https")
    return response
