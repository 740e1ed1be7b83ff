"""Faults for the metering tests: another connection holding the database's write lock, a small tmpfs to fill up."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import make_url


@contextlib.contextmanager
def write_lock_held(url: str) -> Iterator[None]:
    """Another connection holds the write lock until the block ends: SQLite `BEGIN IMMEDIATE` on the file;
    PostgreSQL the ledger's tables locked EXCLUSIVE (reads go on, every write waits)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        import sqlite3

        connection = sqlite3.connect(parsed.database, isolation_level=None, timeout=30)
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            connection.execute("ROLLBACK")
            connection.close()
        return
    import psycopg

    with psycopg.connect(parsed.set(drivername="postgresql").render_as_string(hide_password=False)) as connection:
        connection.execute("LOCK TABLE usage, key_counters, admissions IN EXCLUSIVE MODE")
        try:
            yield
        finally:
            connection.rollback()


class Tmpfs:
    """A small tmpfs mounted on `path` (needs root, or CAP_SYS_ADMIN): `fill()` takes every free byte, `free()`
    gives them back."""

    def __init__(self, path: Path, size_mb: int) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise OSError(f"cannot mount a tmpfs on {path}: {result.stderr.strip() or result.returncode}")
        self.filler = path / "filler"

    def fill(self) -> int:
        """Write until the file system is full; returns the bytes taken."""
        written = 0
        block = b"\0" * (64 << 10)
        with open(self.filler, "ab", buffering=0) as handle:
            try:
                while True:
                    written += handle.write(block)
            except OSError:
                pass
            try:  # the last partial blocks
                while True:
                    written += handle.write(b"\0" * 512)
            except OSError:
                pass
        return written

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


def can_mount() -> str | None:
    """None when a tmpfs can be mounted here, else the reason."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    return None


class Stream:
    """A streamed completion read in a thread, counting its completion tokens (logprobs=0: one entry per token) with
    the time each chunk arrived, so that a test can ask what the client had received at any moment."""

    def __init__(self, base_url: str, key: str, model: str, max_tokens: int, prompt: str = "To be") -> None:
        import threading

        self.body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                     "logprobs": 0, "temperature": 1.0, "stream_options": {"include_usage": True}}
        self.base_url, self.key = base_url, key
        self.request_id: str | None = None
        self.received: list[tuple[float, int]] = []  # (monotonic time, tokens so far)
        self.usage: dict | None = None
        self.done = False  # "[DONE]" arrived
        self.status: int | None = None
        self.error: BaseException | None = None
        self.finished_at: float | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    @property
    def tokens(self) -> int:
        return self.received[-1][1] if self.received else 0

    def tokens_at(self, moment: float) -> int:
        """Tokens the client had received by `moment` (time.monotonic())."""
        return max((n for at, n in self.received if at <= moment), default=0)

    def _read(self) -> None:
        import json
        import time

        import httpx

        count = 0
        try:
            with httpx.stream("POST", self.base_url + "/v1/completions", json=self.body, timeout=120,
                              headers={"Authorization": f"Bearer {self.key}"}) as response:
                self.status = response.status_code
                if response.status_code != 200:
                    response.read()
                    return
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        self.done = True
                        continue
                    event = json.loads(data)
                    self.request_id = event.get("id", self.request_id)
                    if event.get("usage"):
                        self.usage = event["usage"]
                    for choice in event.get("choices", []):
                        count += len((choice.get("logprobs") or {}).get("tokens") or [])
                    self.received.append((time.monotonic(), count))
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            self.error = exc
        finally:
            self.finished_at = time.monotonic()

    def join(self, timeout: float = 120.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the stream did not end in time"
