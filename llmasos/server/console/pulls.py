"""Pulls started from the console's models page: `llmasos pull`'s own function in a worker thread, with a progress
object that keeps bytes per file where the page can poll them (GET /console/api/pulls/ID)."""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field
from typing import Any

from llmasos.library.progress import DownloadProgress

MAX_PULLING = 2


class PolledProgress(DownloadProgress):
    """DownloadProgress without a terminal: each file's bar writes its byte counts into `files`."""

    def __init__(self) -> None:
        super().__init__(enabled=False)
        self.files: dict[str, list[int | None]] = {}  # description -> [completed, total]
        self.message = ""
        self._lock = threading.Lock()

    def note(self, message: str) -> None:
        self.message = message

    def bar(self, description: str) -> type:
        owner = self

        class PolledBar:
            def __init__(self, *_args: Any, total: int | None = None, initial: int = 0, **_kwargs: Any) -> None:
                with owner._lock:
                    owner.files[description] = [initial, total]

            def update(self, n: int | float | None = 1) -> None:
                with owner._lock:
                    owner.files[description][0] += int(n or 0)

            def close(self) -> None:
                pass

            def __enter__(self) -> PolledBar:
                return self

            def __exit__(self, *exc_info: object) -> None:
                return None

        return PolledBar

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"file": name, "completed": done, "total": total} for name, (done, total) in self.files.items()]


@dataclass
class PullJob:
    id: str
    spec: str
    name: str | None
    progress: PolledProgress = field(default_factory=PolledProgress)
    status: str = "pulling"  # pulling, done, failed
    result: str = ""

    def to_dict(self) -> dict[str, Any]:
        files = self.progress.snapshot()
        totals = [f["total"] for f in files]
        return {"id": self.id, "spec": self.spec, "status": self.status, "result": self.result,
                "message": self.progress.message, "files": files,
                "completed": sum(f["completed"] for f in files),
                "total": sum(totals) if totals and None not in totals else None}


class Pulls:
    def __init__(self) -> None:
        self.jobs: dict[str, PullJob] = {}
        self._lock = threading.Lock()

    def start(self, spec: str, name: str | None) -> PullJob:
        from llmasos.library.pull import parse_spec

        parse_spec(spec, name)  # a LibraryError names a bad spec now, not in the thread
        with self._lock:
            if sum(job.status == "pulling" for job in self.jobs.values()) >= MAX_PULLING:
                raise ValueError(f"{MAX_PULLING} pulls are running already; wait for one to finish")
            job = PullJob(secrets.token_hex(8), spec, name)
            self.jobs[job.id] = job
        threading.Thread(target=self._run, args=(job,), name=f"console-pull-{job.id}", daemon=True).start()
        return job

    def _run(self, job: PullJob) -> None:
        from llmasos.errors import LibraryError
        from llmasos.library.pull import pull

        try:
            row, outcome = pull(job.spec, job.name, progress=job.progress)
            job.result, job.status = f"{outcome}: {row.name}", "done"
        except LibraryError as exc:
            job.result, job.status = str(exc), "failed"
        except Exception as exc:  # reported on the page; the server goes on
            job.result, job.status = f"the pull failed: {exc}", "failed"
