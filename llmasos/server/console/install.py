"""Mount the console on an app: its pages and JSON endpoints, its static files, and ConsoleMiddleware (sessions and
CSRF) just outside AuthMiddleware."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from starlette.staticfiles import StaticFiles

from llmasos.server.console.render import HERE
from llmasos.server.console.session import ConsoleMiddleware, Sessions
from llmasos.server.state import ServerState


def install_console(app: FastAPI, state: ServerState) -> None:
    """Call after AuthMiddleware is added (so this middleware runs before it) and before the browser guard."""
    from llmasos.server.console.api import add_api
    from llmasos.server.console.pages import add_pages

    router = APIRouter(include_in_schema=False)
    add_pages(router, state)
    add_api(router, state)
    app.include_router(router)
    app.mount("/console/static", StaticFiles(directory=HERE / "static"), name="console-static")
    from llmasos.server.console.launcher import Launcher
    from llmasos.server.console.pulls import Pulls

    app.state.console_launcher = Launcher()
    app.state.console_pulls = Pulls()
    app.router.on_shutdown.append(app.state.console_launcher.close)  # runs started here stop with the server
    sessions = Sessions()
    app.state.console_sessions = sessions
    app.add_middleware(ConsoleMiddleware, state=state, sessions=sessions)
