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
