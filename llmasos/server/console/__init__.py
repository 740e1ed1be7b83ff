"""The web console served at `/` by `llmasos serve`: server-rendered Jinja2 pages with a little plain JavaScript
(chat playground, keys, usage and spend, models, server, runs). `install_console` mounts it on the app."""

from llmasos.server.console.install import install_console

__all__ = ["install_console"]
