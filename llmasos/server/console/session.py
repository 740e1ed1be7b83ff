"""Console sessions: an admin key is posted once to /console/login and becomes an HttpOnly, SameSite=Strict cookie
signed with a secret of this server process; every state-changing request of a session carries a CSRF token derived
from it. ConsoleMiddleware sits just outside AuthMiddleware and lets a session's requests through as its key."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse, RedirectResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers

from llmasos.server.auth import ApiKey, KeyInfo, utcnow
from llmasos.server.protocol import APIError
from llmasos.server.state import ServerState

COOKIE = "llmasos_console"
CSRF_HEADER = "x-csrf-token"
SESSION_SECONDS = 12 * 3600
MAX_SESSIONS = 10_000  # a keyless server makes one per cookieless page view: the oldest go first
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PUBLIC_PATHS = frozenset({"/login", "/console/login", "/favicon.ico"})
STATIC_PREFIX = "/console/static/"
PAGE_PATHS = frozenset({"/", "/keys", "/usage", "/models", "/server", "/runs"})


def is_admin(key: KeyInfo | None) -> bool:
    """Whether a key may open the console (None: a server without keys, open on loopback like the API). The one place
    that decides it: `api_keys.admin` (`llmasos keys create --admin`)."""
    return key is None or bool(getattr(key, "admin", False))


def is_console_path(path: str) -> bool:
    """Paths that belong to the console (pages, its JSON endpoints and static files), not to the API."""
    return path in PAGE_PATHS or path in PUBLIC_PATHS or path.startswith(("/console/", "/models/", "/runs/"))


@dataclass
class Session:
    key: KeyInfo | None
    expires: float


@dataclass
class Sessions:
    """The sessions of one server process; they end with it (the signing secret is never stored)."""

    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    _sessions: dict[str, Session] = field(default_factory=dict)

    def _sign(self, text: str) -> str:
        return hmac.new(self.secret, text.encode(), hashlib.sha256).hexdigest()

    def create(self, key: KeyInfo | None) -> str:
        """A new session for `key`; returns the cookie value."""
        now = time.time()
        self._sessions = {sid: s for sid, s in self._sessions.items() if s.expires > now}
        while len(self._sessions) >= MAX_SESSIONS:  # dicts keep insertion order: the first is the oldest
            self._sessions.pop(next(iter(self._sessions)))
        session_id = secrets.token_urlsafe(24)
        self._sessions[session_id] = Session(key, now + SESSION_SECONDS)
        return f"{session_id}.{self._sign('session:' + session_id)}"

    def lookup(self, cookie: str | None) -> tuple[str, Session] | None:
        if not cookie or "." not in cookie:
            return None
        session_id, _, signature = cookie.partition(".")
        if not hmac.compare_digest(signature, self._sign("session:" + session_id)):
            return None
        session = self._sessions.get(session_id)
        if session is None or session.expires <= time.time():
            return None
        return session_id, session

    def end(self, cookie: str | None) -> None:
        found = self.lookup(cookie)
        if found is not None:
            self._sessions.pop(found[0], None)

    def csrf_token(self, session_id: str) -> str:
        return self._sign("csrf:" + session_id)


def key_still_active(name: str) -> bool:
    """A session ends when its key is revoked or expires. Blocking (database)."""
    from llmasos.db import session as db_session

    now = utcnow()
    with db_session() as db:
        row = db.scalar(select(ApiKey.id).where(ApiKey.name == name, ApiKey.revoked_at.is_(None),
                                                (ApiKey.expires_at.is_(None)) | (ApiKey.expires_at > now)))
    return row is not None


def read_cookie(headers: Headers) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE:
            return value
    return None


class ConsoleMiddleware:
    """Decides console requests before AuthMiddleware: the login page and static files are open; a valid session
    (with its CSRF token on state-changing methods) passes as its key, to the console and to the API alike; a
    console page without a session goes to /login. Requests without the cookie to the API are AuthMiddleware's."""

    def __init__(self, app, state: ServerState, sessions: Sessions) -> None:
        self.app, self.state, self.sessions = app, state, sessions

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        scope_state = scope.setdefault("state", {})
        if path in PUBLIC_PATHS or path.startswith(STATIC_PREFIX):
            scope_state["console_open"] = True
            scope_state["key"] = None
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        found = self.sessions.lookup(read_cookie(headers))
        if found is not None and not headers.get("authorization"):
            session_id, session = found
            if session.key is None:  # made while the server had no keys: it ends with the first key
                ended = await run_in_threadpool(self.state.auth_required)
            else:
                ended = not await run_in_threadpool(key_still_active, session.key.name)
            if ended:
                self.sessions.end(read_cookie(headers))
                return await self._refuse(scope, receive, send, path)
            if method not in SAFE_METHODS and not hmac.compare_digest(
                    headers.get(CSRF_HEADER, ""), self.sessions.csrf_token(session_id)):
                error = APIError(403, "missing or wrong CSRF token: console requests that change state send the "
                                 "page's X-CSRF-Token header", type="permission_error", code="csrf_failed")
                scope_state["error"] = error.message
                return await JSONResponse(error.body(), status_code=403)(scope, receive, send)
            scope_state.update(console_open=True, key=session.key, console_session=session_id)
            return await self.app(scope, receive, send)
        if is_console_path(path):
            if await run_in_threadpool(self.state.auth_required):
                return await self._refuse(scope, receive, send, path)
            # No keys: open on loopback like the API (the guard already refused other Host names); a session is
            # still made, so that the CSRF token protects state changes.
            if method not in SAFE_METHODS:  # a state change needs the token of a page this browser opened
                error = APIError(403, "missing CSRF token: open a console page first; its requests carry the token",
                                 type="permission_error", code="csrf_failed")
                scope_state["error"] = error.message
                return await JSONResponse(error.body(), status_code=403)(scope, receive, send)
            cookie = self.sessions.create(None)
            session_id = cookie.partition(".")[0]
            scope_state.update(console_open=True, key=None, console_session=session_id, console_new_cookie=cookie)
            return await self.app(scope, receive, send)
        return await self.app(scope, receive, send)

    async def _refuse(self, scope, receive, send, path: str):
        if scope["method"] == "GET" and not path.startswith("/console/"):
            return await RedirectResponse("/login", status_code=303)(scope, receive, send)
        error = APIError(401, "the console needs a session: log in at /login with an admin key",
                         code="invalid_api_key")
        scope.setdefault("state", {})["error"] = error.message
        return await JSONResponse(error.body(), status_code=401)(scope, receive, send)


def cookie_header(value: str, max_age: int = SESSION_SECONDS, secure: bool = False) -> str:
    """Set-Cookie for a session: HttpOnly (no script reads it), SameSite=Strict (no other site sends it), and Secure
    when the console was reached over HTTPS (plain HTTP on loopback must still work)."""
    return f"{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}" + ("; Secure" if secure else "")
