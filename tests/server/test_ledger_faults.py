"""Metering under faults on a real server (SQLite, where these faults live): another connection holds the database's
write lock past the busy timeout while streams run, and the disk of LLMASOS_HOME (database and journal) fills up
while streams run. Every admitted client completes without an error, new metered work is refused with a 503 while
the database cannot be written, /health keeps answering, and once the fault is gone the billed tokens equal the
delivered tokens exactly, per key, with the quota never overrun."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import MODEL, assert_error, start_service, wait_until
from support_faults import Stream, Tmpfs, can_mount, write_lock_held

from llmasos.db import database_url, dispose_all, session
from llmasos.server import auth

DATABASES = ("sqlite",)  # these faults are SQLite's: its file's write lock and the disk it lives on
FLUSH = 0.2  # the metering writer's interval in these tests
BUSY = 0.5  # SQLite busy timeout: the lock below is held far longer


def billed_by_key() -> dict[str, tuple[int, int]]:
    from sqlalchemy import func, select

    usage = auth.UsageRecord
    with session() as db:
        found = db.execute(select(usage.key_name, func.sum(usage.prompt_tokens), func.sum(usage.completion_tokens))
                           .group_by(usage.key_name)).all()
    return {name: (int(p), int(c)) for name, p, c in found}


def rows_of(key_name: str) -> int:
    from sqlalchemy import func, select

    with session() as db:
        return db.scalar(select(func.count(auth.UsageRecord.id)).where(auth.UsageRecord.key_name == key_name))


def delivered_by_key(streams: list[tuple[str, Stream]]) -> dict[str, tuple[int, int]]:
    totals: dict[str, list[int]] = {}
    for name, stream in streams:
        total = totals.setdefault(name, [0, 0])
        total[0] += stream.usage["prompt_tokens"]
        total[1] += stream.tokens
    return {name: (p, c) for name, (p, c) in totals.items()}


def truncate_wal(database: Path) -> None:
    """Checkpoint SQLite's write-ahead log and cut it to nothing, so that every later write needs new disk space."""
    import sqlite3

    connection = sqlite3.connect(database, timeout=30)
    try:
        for _ in range(50):
            busy, _, _ = connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if not busy:
                return
            time.sleep(0.05)
        raise AssertionError("the write-ahead log could not be truncated")
    finally:
        connection.close()


def use_home(patch: pytest.MonkeyPatch, path: Path) -> None:
    patch.setenv("LLMASOS_HOME", str(path))
    patch.delenv("LLMASOS_DATABASE_URL", raising=False)
    patch.setenv("LLMASOS_METERING_FLUSH", str(FLUSH))
    patch.setenv("LLMASOS_SQLITE_BUSY_TIMEOUT", str(BUSY))
    dispose_all()


def assert_all_delivered(streams: list[tuple[str, Stream]]) -> None:
    for name, stream in streams:
        assert stream.error is None and stream.status == 200 and stream.done, (name, stream.status, stream.error)
        assert stream.tokens == stream.usage["completion_tokens"] <= stream.body["max_tokens"], name


def wait_settled(service, journal: Path) -> None:
    ledger = service._state.ledger
    wait_until(lambda: ledger.pending() == 0 and not list(journal.glob("*.jsonl")), timeout=30)


def test_a_write_lock_held_past_the_busy_timeout_loses_no_bill_and_fails_no_client(tmp_path, long_checkpoint):
    with pytest.MonkeyPatch.context() as patch:
        use_home(patch, tmp_path / "home")
        keys = {"lock-a": auth.create_key("lock-a"), "lock-b": auth.create_key("lock-b", token_quota=20_000)}
        service = start_service({MODEL: long_checkpoint})
        try:
            plan = [("lock-a", 40), ("lock-b", 80), ("lock-a", 160), ("lock-b", 320), ("lock-a", 900)]
            streams = [(name, Stream(service.base_url, keys[name], MODEL, n)) for name, n in plan]
            # and one answer that is not streamed (on main, those came back as 500s when their usage write failed)
            whole = ThreadPoolExecutor(1).submit(
                httpx.post, service.base_url + "/v1/completions", timeout=120,
                headers={"Authorization": f"Bearer {keys['lock-b']}"},
                json={"model": MODEL, "prompt": "To be", "max_tokens": 150, "ignore_eos": True})
            wait_until(lambda: all(s.tokens for _, s in streams), timeout=60)
            wait_until(lambda: rows_of("lock-b") == 3, timeout=30)  # all admitted: their rows exist already
            health: list[float] = []
            with write_lock_held(database_url()):
                locked_at = time.monotonic()
                refused = httpx.post(service.base_url + "/v1/completions", timeout=30,
                                     headers={"Authorization": f"Bearer {keys['lock-a']}"},
                                     json={"model": MODEL, "prompt": "x", "max_tokens": 1})
                assert_error(refused, 503, "service_unavailable", "metering_unavailable")
                assert int(refused.headers["retry-after"]) >= 1
                assert "metering database" in refused.json()["error"]["message"]
                while time.monotonic() - locked_at < 3.0:  # six busy timeouts, fifteen flush intervals
                    start = time.monotonic()
                    assert httpx.get(service.base_url + "/health", timeout=5).status_code == 200
                    health.append(time.monotonic() - start)
                    time.sleep(0.1)
                unlocked_at = time.monotonic()
            for _, stream in streams:
                stream.join()
            assert_all_delivered(streams)
            ended_while_locked = [s for _, s in streams if locked_at < s.finished_at < unlocked_at]
            assert ended_while_locked, "no stream ended while the lock was held: the fault did not bite"
            ledger = service._state.ledger
            wait_settled(service, tmp_path / "home" / "metering-journal")
            assert ledger.failures >= 1 and ledger.journal_writes >= 1 and ledger.replayed >= 1
            answer = whole.result(timeout=120)
            assert answer.status_code == 200, answer.text
            delivered = delivered_by_key(streams)
            usage = answer.json()["usage"]
            assert usage["completion_tokens"] == 150
            delivered["lock-b"] = (delivered["lock-b"][0] + usage["prompt_tokens"], delivered["lock-b"][1] + 150)
            assert billed_by_key() == delivered
            for name in keys:
                assert auth.tokens_used(name) == sum(billed_by_key()[name])
            assert max(health) < 0.5, health
        finally:
            service.stop()
            dispose_all()


def test_a_full_disk_loses_no_bill_and_fails_no_client(tmp_path, long_checkpoint):
    reason = can_mount()
    if reason:
        pytest.skip(reason)
    try:
        disk = Tmpfs(tmp_path / "home", 48)
    except OSError as exc:
        pytest.skip(str(exc))
    try:
        with pytest.MonkeyPatch.context() as patch:
            use_home(patch, disk.path)
            quota = 3000
            keys = {"full-q": auth.create_key("full-q", token_quota=quota), "full-f": auth.create_key("full-f")}
            service = start_service({MODEL: long_checkpoint})
            try:
                plan = [("full-q", 60), ("full-f", 120), ("full-q", 400), ("full-f", 500), ("full-q", 1500),
                        ("full-q", 2000)]
                streams = [(name, Stream(service.base_url, keys[name], MODEL, n)) for name, n in plan]
                wait_until(lambda: all(s.tokens or s.status not in (None, 200) for _, s in streams), timeout=60)
                refused_on_quota = [(n, s) for n, s in streams if s.status == 429]
                streams = [(n, s) for n, s in streams if s.status == 200]
                truncate_wal(disk.path / "llmasos.db")  # else SQLite may write into WAL space it has already
                taken = disk.fill()
                assert taken > 0
                full_at = time.monotonic()
                answer = httpx.post(service.base_url + "/v1/completions", timeout=30,
                                    headers={"Authorization": f"Bearer {keys['full-f']}"},
                                    json={"model": MODEL, "prompt": "x", "max_tokens": 1})
                if answer.status_code != 200:  # refused before any work (fail closed), never a 500
                    assert_error(answer, 503, "service_unavailable", "metering_unavailable")
                ledger = service._state.ledger
                # Full until a usage write failed and a running stream ended (its final write with it).
                wait_until(lambda: ledger.failures >= 1 and any((s.finished_at or 0) > full_at for _, s in streams),
                           timeout=60)
                time.sleep(max(0.0, 1.0 - (time.monotonic() - full_at)))
                disk.free()
                freed_at = time.monotonic()
                for _, stream in streams:
                    stream.join()
                assert_all_delivered(streams)
                assert any(full_at < s.finished_at < freed_at for _, s in streams), "no stream ended while full"
                wait_settled(service, disk.path / "metering-journal")
                billed, delivered = billed_by_key(), delivered_by_key(streams)
                if answer.status_code == 200:
                    usage = answer.json()["usage"]
                    delivered["full-f"] = (delivered["full-f"][0] + usage["prompt_tokens"],
                                           delivered["full-f"][1] + usage["completion_tokens"])
                assert billed == delivered
                assert auth.tokens_used("full-q") == sum(billed["full-q"]) <= quota
                assert len(refused_on_quota) + len(streams) == len(plan)
            finally:
                service.stop()
                dispose_all()
    finally:
        disk.unmount()
