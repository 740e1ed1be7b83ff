"""The metering ledger without a server, on SQLite and PostgreSQL: rows from admission, batched cumulative writes that
bill once however often they are applied, a journal that takes the entries while the database is locked and is
replayed once when it returns (also a dead server's journal), fail-closed admission, and admission that costs the
same with a million usage rows."""

from __future__ import annotations

import shutil
import statistics
import time

import pytest
from sqlalchemy import func, select, text
from support_faults import write_lock_held

from llmasos.db import connection, database_url, dispose_all
from llmasos.server import auth, ledger_store
from llmasos.server.ledger import Journal, Ledger, read_journal, replay_dead_journals
from llmasos.server.ledger_store import Entry
from llmasos.server.limits_store import AdmissionRow
from llmasos.server.metering import Limiter
from llmasos.server.protocol import APIError

DATABASES = ("sqlite", "postgresql")


@pytest.fixture(scope="module", autouse=True)
def short_waits():
    """A writer behind another's lock fails after 0.3 s (not SQLite's 10 s busy timeout or PostgreSQL's 5 s)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLMASOS_SQLITE_BUSY_TIMEOUT", "0.3")
        patch.setenv("LLMASOS_DB_LOCK_TIMEOUT", "0.3")
        dispose_all()  # connections are made again, with these settings
        yield
    dispose_all()


def key(name: str, **limits) -> auth.KeyInfo:
    return auth.lookup_key(auth.create_key(name, **limits))


def entry(info: auth.KeyInfo | None, record_id: str, prompt_tokens: int) -> Entry:
    return Entry(record_id=record_id, key_name=info.name if info else None, model="m", route="completions",
                 request_id=record_id, prompt_tokens=prompt_tokens, cost=prompt_tokens * 1e-6)


def rows(key_name: str) -> dict[str, tuple[int, int, bool]]:
    """record id -> (prompt tokens, completion tokens, complete)."""
    with connection() as db:
        found = db.execute(select(auth.UsageRecord.record_id, auth.UsageRecord.prompt_tokens,
                                  auth.UsageRecord.completion_tokens, auth.UsageRecord.completed_at)
                           .where(auth.UsageRecord.key_name == key_name)).all()
    return {r: (p, c, done is not None) for r, p, c, done in found}


def reservations(key_name: str) -> dict[int, tuple[int, bool]]:
    """admission id -> (reserved tokens, released)."""
    with connection() as db:
        found = db.execute(select(AdmissionRow.id, AdmissionRow.reserved_tokens, AdmissionRow.released_at)
                           .where(AdmissionRow.key_name == key_name)).all()
    return {i: (r, released is not None) for i, r, released in found}


def billed(key_name: str) -> int:
    return sum(p + c for p, c, _ in rows(key_name).values())


def wait_for(condition, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_rows_exist_from_admission_and_batched_cumulative_writes_bill_once(home, tmp_path):
    limiter = Limiter()
    ledger = Ledger(journal_directory=tmp_path / "journal", flush_interval=0.3, on_released=limiter.forget)
    info = key("batched", token_quota=10_000)
    entries = [entry(info, f"batched-{i}", 4) for i in range(5)]
    admissions = [limiter.admit(info, 4, 50, entry=e) for e in entries]
    for e in entries:
        ledger.open(e, written=True)
    # From admission: each row holds its prompt tokens, the quota counted them, the reservation holds the rest.
    assert rows("batched") == {e.record_id: (4, 0, False) for e in entries}
    assert auth.tokens_used("batched") == 20
    assert sorted(reservations("batched").values()) == [(50, False)] * 5
    for step in range(1, 11):  # 50 updates of 5 running requests: a handful of batches, not 50 transactions
        for e in entries:
            ledger.update(e, completion_tokens=step)
        time.sleep(0.02)
    wait_for(lambda: ledger.pending() == 0)
    assert 1 <= ledger.batches <= 4, ledger.batches
    assert rows("batched") == {e.record_id: (4, 10, False) for e in entries}
    assert sorted(reservations("batched").values()) == [(40, False)] * 5  # in flight: counted once, as used
    assert auth.tokens_used("batched") == 70 == billed("batched")
    for _ in range(2):  # the same cumulative writes again (a retried batch): nothing moves
        assert ledger_store.apply([Entry(**e.to_json()) for e in entries]) == 0
    stale = Entry(**{**entries[0].to_json(), "completion_tokens": 3})  # an older write arriving late
    assert ledger_store.apply([stale]) == 0
    assert auth.tokens_used("batched") == 70 == billed("batched")
    futures = []
    for e, admission in zip(entries, admissions, strict=True):
        ledger.update(e, completion_tokens=12)
        futures.append(ledger.finish(e))
        limiter.release_here(admission, 16)
    assert all(f.result(timeout=10) for f in futures)
    assert rows("batched") == {e.record_id: (4, 12, True) for e in entries}
    assert all(released for _, released in reservations("batched").values())
    assert auth.tokens_used("batched") == 80 == billed("batched")
    assert not limiter._live  # the releases reached the database: no lease is renewed any more
    ledger.close()


def test_a_locked_database_sends_the_bills_to_the_journal_and_they_are_replayed_once(home, tmp_path):
    limiter = Limiter()
    ledger = Ledger(journal_directory=tmp_path / "journal", flush_interval=0.1, on_released=limiter.forget)
    info = key("journaled", token_quota=1000)
    entries = [entry(info, f"journaled-{i}", 5) for i in range(3)]
    admissions = [limiter.admit(info, 5, 100, entry=e) for e in entries]
    for e in entries:
        ledger.open(e, written=True)
    with write_lock_held(database_url()):
        with pytest.raises(APIError) as refused:  # fail closed: no new metered work while the ledger is locked
            limiter.admit(info, 5, 10, entry=entry(info, "refused", 5))
        assert refused.value.status == 503 and refused.value.type == "service_unavailable"
        assert refused.value.headers["Retry-After"] and "metering database" in refused.value.message
        for i, e in enumerate(entries):
            ledger.update(e, completion_tokens=10 * (i + 1))
        futures = [ledger.finish(e) for e in entries[:2]]  # two end while the lock is held
        for admission in admissions[:2]:
            limiter.release_here(admission, 0)
        assert all(f.result(timeout=10) for f in futures)  # durable: in the journal
        assert ledger.failures >= 1 and ledger.journal_writes >= 1
        journal = ledger.journal.path
        assert journal is not None and journal.exists()
        assert {e.record_id: e.completion_tokens for e in read_journal(journal)} == \
            {"journaled-0": 10, "journaled-1": 20, "journaled-2": 30}
        assert billed("journaled") == 15  # nothing reached the database yet
    wait_for(lambda: ledger.pending() == 0 and not journal.exists())
    assert ledger.replayed == 3  # its own journal, replayed once the entries were in the database
    assert rows("journaled") == {"journaled-0": (5, 10, True), "journaled-1": (5, 20, True),
                                 "journaled-2": (5, 30, False)}
    assert auth.tokens_used("journaled") == 75 == billed("journaled")
    assert "refused" not in rows("journaled")
    ledger.update(entries[2], completion_tokens=31)
    assert ledger.finish(entries[2]).result(timeout=10)
    limiter.release_here(admissions[2], 0)
    assert auth.tokens_used("journaled") == 76 == billed("journaled")
    ledger.close()


def test_a_dead_servers_journal_is_replayed_once_and_a_live_ones_is_left_alone(home, tmp_path):
    limiter = Limiter()
    info = key("crashed", max_concurrency=2, token_quota=500)
    entries = [entry(info, f"crashed-{i}", 7) for i in range(2)]
    for e in entries:
        limiter.admit(info, 7, 100, entry=e)
    limiter._live.clear()  # its server is gone
    directory = tmp_path / "journal"
    dead = Journal(directory)
    entries[0].completion_tokens, entries[1].completion_tokens = 40, 60
    dead.write(entries)
    entries[0].completion_tokens = 45
    dead.write(entries[:1])
    saved = tmp_path / "copy.jsonl"
    shutil.copy(dead.path, saved)
    dead_path = dead.path
    live = Journal(directory)  # a running server's journal: its lock is held
    live.write([entry(None, "live-0", 3)])
    dead._drop()  # the process died: its lock is gone, its file stays
    assert replay_dead_journals(directory) == 2
    assert not dead_path.exists() and live.path.exists()
    assert rows("crashed") == {"crashed-0": (7, 45, True), "crashed-1": (7, 60, True)}
    assert all(released for _, released in reservations("crashed").values())  # replay is final: released
    assert auth.tokens_used("crashed") == 119 == billed("crashed")
    shutil.copy(saved, dead_path)  # the same journal once more (a replay that died before deleting it)
    assert replay_dead_journals(directory) == 2
    assert auth.tokens_used("crashed") == 119 == billed("crashed")
    with connection() as db:
        assert db.scalar(select(func.count()).select_from(auth.UsageRecord)
                         .where(auth.UsageRecord.record_id == "live-0")) == 0
    live.remove()


def test_a_key_with_a_million_usage_rows_admits_in_under_10_ms(home):
    info = key("busy", token_quota=10**12, rpm=10**6, max_concurrency=1000)
    with connection() as db:
        if db.dialect.name == "sqlite":
            db.execute(text(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000000) "
                "INSERT INTO usage (key_name, model, route, request_id, created_at, prompt_tokens, completion_tokens,"
                " cost, completed_at) SELECT 'busy', 'm', 'completions', 'old-' || i, '2026-01-01', 3, 4, 0.0, "
                "'2026-01-01' FROM n"))
        else:
            db.execute(text(
                "INSERT INTO usage (key_name, model, route, request_id, created_at, prompt_tokens, completion_tokens,"
                " cost, completed_at) SELECT 'busy', 'm', 'completions', 'old-' || i, '2026-01-01', 3, 4, 0.0, "
                "'2026-01-01' FROM generate_series(1, 1000000) AS i"))
            db.execute(text("ANALYZE usage"))
        db.execute(text("UPDATE key_counters SET used_tokens = 7000000 WHERE key_name = 'busy'"))
    limiter = Limiter()
    seconds = []
    for i in range(21):
        e = entry(info, f"busy-new-{i}", 3)
        start = time.perf_counter()
        admission = limiter.admit(info, 3, 4, entry=e)
        seconds.append(time.perf_counter() - start)
        limiter.release(admission, 3)
    assert statistics.median(seconds[1:]) < 0.010, seconds  # the first one warms the connection pool
    assert auth.tokens_used("busy") == 7_000_000 + 21 * 3
