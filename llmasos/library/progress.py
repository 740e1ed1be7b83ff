"""Download progress for `llmasos pull`: a rich progress bar per file, fed by huggingface_hub through a tqdm-like class.

On a terminal the bars update live; elsewhere (logs, CI) rich prints their final state once when the pull ends."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn


class DownloadProgress:
    """Rich progress bars on stderr; `bar(name)` gives the class huggingface_hub's `http_get` takes as `tqdm_class`."""

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                  TransferSpeedColumn(), TimeRemainingColumn(), console=self.console,
                                  disable=not enabled)

    def __enter__(self) -> DownloadProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._progress.stop()

    def note(self, message: str) -> None:
        if self.enabled:
            self.console.print(escape(message), highlight=False)

    def bar(self, description: str) -> type:
        progress = self._progress
        label = escape(description)

        class FileBar:
            """The part of tqdm's interface `http_get` uses: construction with total/initial, update, context."""

            def __init__(self, *_args: Any, total: int | None = None, initial: int = 0, **_kwargs: Any) -> None:
                self.task = progress.add_task(label, total=total, completed=initial)

            def update(self, n: int | float | None = 1) -> None:
                progress.advance(self.task, n or 0)

            def close(self) -> None:
                pass

            def __enter__(self) -> FileBar:
                return self

            def __exit__(self, *exc_info: object) -> None:
                return None

        return FileBar
