"""The metering ledger in the database: one usage row per request, opened at admission under an idempotent record id
and moved to the request's cumulative token counts by later writes. A write of cumulative counts is idempotent: the
row takes max(old, new), and the key's quota counter and the admission's reservation move by exactly the difference
in the same transaction, so a write applied twice (a retried batch, a replayed journal) bills once. Every function
here blocks: call them from the metering writer's thread or another worker thread."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field

from sqlalchemy import Connection, case, delete, insert, select, update

from llmasos.db import bound_lock_wait, connection
from llmasos.server.auth import UsageRecord
from llmasos.server.limits_store import WINDOW_SECONDS, AdmissionRow, add_used_tokens, lock_counter, utcnow


@dataclass
class Entry:
    """A request's usage as the server knows it now: cumulative counts, so writing it twice changes nothing."""

    record_id: str
    key_name: str | None
    model: str
    route: str
    request_id: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    admission_id: int | None = None  # its row in `admissions`, whose reservation shrinks as tokens are billed
    complete: bool = False  # the request ended: the final write sets completed_at and releases the admission
    created_at: str = field(default_factory=lambda: utcnow().isoformat())

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Entry:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})


def _insert(db: Connection, entry: Entry, now: dt.datetime) -> None:
    db.execute(insert(UsageRecord).values(
        record_id=entry.record_id, key_name=entry.key_name, model=entry.model, route=entry.route,
        request_id=entry.request_id, created_at=dt.datetime.fromisoformat(entry.created_at),
        prompt_tokens=entry.prompt_tokens, completion_tokens=entry.completion_tokens, cost=entry.cost,
        completed_at=now if entry.complete else None))


def open_entry(db: Connection, entry: Entry) -> None:
    """Insert the request's row at admission, its prompt tokens billed from the start, in the admission's
    transaction (which holds the key's counter row already, and reserved the prompt's tokens less)."""
    _insert(db, entry, utcnow())
    if entry.key_name is not None:
        add_used_tokens(db, entry.key_name, entry.prompt_tokens + entry.completion_tokens)


def _write(db: Connection, entry: Entry, now: dt.datetime) -> int:
    """Bring the entry's row and its admission up to the entry's counts; returns the tokens newly billed, which the
    caller counts against the key's quota."""
    row = db.execute(select(UsageRecord.id, UsageRecord.prompt_tokens, UsageRecord.completion_tokens,
                            UsageRecord.cost, UsageRecord.completed_at)
                     .where(UsageRecord.record_id == entry.record_id).with_for_update()).first()
    if row is None:  # a keyless request's first write, or a journal replayed where its row never got written
        _insert(db, entry, now)
        prompt, completion = entry.prompt_tokens, entry.completion_tokens
        delta = prompt + completion
    else:
        prompt, completion = max(row.prompt_tokens, entry.prompt_tokens), max(row.completion_tokens,
                                                                              entry.completion_tokens)
        delta = prompt - row.prompt_tokens + completion - row.completion_tokens
        values: dict = {}
        if delta:
            values.update(prompt_tokens=prompt, completion_tokens=completion, cost=max(row.cost, entry.cost))
        if entry.complete and row.completed_at is None:
            values["completed_at"] = now
        if values:
            db.execute(update(UsageRecord).where(UsageRecord.id == row.id).values(**values))
    if entry.admission_id is not None and (delta or entry.complete):
        # The newly billed tokens come off the reservation (they count as used now: never twice against the quota);
        # the final write releases the admission, as limits_store.release did.
        values = {}
        if delta:
            reserved = AdmissionRow.reserved_tokens
            values["reserved_tokens"] = case((reserved > delta, reserved - delta), else_=0)
        if entry.complete:
            values.update(released_at=now, tokens=prompt + completion)
        db.execute(update(AdmissionRow).where(AdmissionRow.id == entry.admission_id,
                                              AdmissionRow.released_at.is_(None)).values(**values))
    return delta


def apply(entries: list[Entry], url: str | None = None) -> int:
    """Write a batch of entries in one transaction; returns the tokens newly billed. Idempotent."""
    now = utcnow()
    billed = 0
    with connection(url) as db:
        bound_lock_wait(db)  # never wait forever behind another transaction's lock
        # Lock order, the same in every writer, so that none deadlocks: first the keys' counters (shared by every
        # server; sorted), waiting for them before holding anything else — the lease renewer then never waits
        # behind this batch's wait — then this server's own rows, admissions in ascending id order as the renewer
        # takes them (limits_store.renew).
        by_key = dict.fromkeys(sorted({e.key_name for e in entries if e.key_name is not None}), 0)
        for key_name in by_key:
            lock_counter(db, key_name)
        for entry in sorted(entries, key=lambda e: (e.admission_id is None, e.admission_id or 0, e.record_id)):
            delta = _write(db, entry, now)
            billed += delta
            if entry.key_name is not None:
                by_key[entry.key_name] += delta
        for key_name, delta in by_key.items():
            add_used_tokens(db, key_name, delta)
    return billed


def forget_old_admissions(key_names: set[str], url: str | None = None) -> None:
    """Drop the keys' admissions that can no longer count (released out of the window, or lapsed): a short
    transaction of its own, outside the keys' locks; a failure only leaves them for next time."""
    if not key_names:
        return
    now = utcnow()
    old = now - dt.timedelta(seconds=WINDOW_SECONDS)
    lapsed = AdmissionRow.released_at.is_(None) & (AdmissionRow.expires_at < now)
    try:
        with connection(url) as db:
            bound_lock_wait(db)
            for key_name in sorted(key_names):
                db.execute(delete(AdmissionRow).where(AdmissionRow.key_name == key_name,
                                                      AdmissionRow.admitted_at < old,
                                                      (AdmissionRow.released_at < old) | lapsed))
    except Exception:  # noqa: BLE001 - housekeeping only
        pass
