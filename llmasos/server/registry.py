"""Which servers of this LLMASOS_HOME are running and which library models they hold: one small JSON file per
server process under $LLMASOS_HOME/servers/, rewritten (atomically) whenever a model loads or unloads and removed
when the server exits. `llmasos rm` reads it to refuse removing a model that a running server holds."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmasos.files import process_alive
from llmasos.home import home


def _directory() -> Path:
    return home() / "servers"


class ServerRecord:
    """This process's entry: `update(models)` on every load and unload, `remove()` at exit."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.path = _directory() / f"{os.getpid()}.json"

    def update(self, models: list[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "url": self.url, "models": sorted(models)}), encoding="utf-8")
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def servers_holding(name: str) -> list[dict[str, Any]]:
    """The running servers of this home that hold library model `name` ({"pid", "url", "models"}); entries of
    processes that died without cleaning up are removed on the way."""
    found = []
    directory = _directory()
    if not directory.is_dir():
        return found
    for path in directory.glob("*.json"):
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            pid = int(entry["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not process_alive(pid):
            path.unlink(missing_ok=True)
            continue
        if name in entry.get("models", []):
            found.append(entry)
    return found
