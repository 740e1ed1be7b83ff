"""The metering ledger in the database: one usage row per request, opened at admission under an idempotent record id
and moved to the request's cumulative token counts by later writes. A write of cumulative counts is idempotent: the
row takes max(old, new), and the key's quota counter and the admission's reservation move by exactly the difference
in the same transaction, so a write applied twice (a retried batch, a replayed journal) bills once. Every function
here blocks: call them from the metering writer's thread or another worker thread."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field

from sqlalchemy import Connection, bindparam, case, delete, insert, select, update

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


def _row(entry: Entry, now: dt.datetime) -> dict:
    return dict(record_id=entry.record_id, key_name=entry.key_name, model=entry.model, route=entry.route,
                request_id=entry.request_id, created_at=dt.datetime.fromisoformat(entry.created_at),
                prompt_tokens=entry.prompt_tokens, completion_tokens=entry.completion_tokens, cost=entry.cost,
                completed_at=now if entry.complete else None)


def open_entry(db: Connection, entry: Entry) -> None:
    """Insert the request's row at admission, its prompt tokens billed from the start, in the admission's
    transaction (whose first statement counted them on the key's counter, and which reserved them less)."""
    db.execute(insert(UsageRecord).values(**_row(entry, utcnow())))


# One statement each for a whole batch (executemany): the batch holds its keys' counters while it runs.
_UPDATE_ROW = update(UsageRecord).where(UsageRecord.id == bindparam("row_id")).values(
    prompt_tokens=bindparam("new_prompt"), completion_tokens=bindparam("new_completion"), cost=bindparam("new_cost"),
    completed_at=bindparam("new_completed_at"))
_RESERVED = AdmissionRow.reserved_tokens
_RESERVE_LESS = case((_RESERVED > bindparam("delta"), _RESERVED - bindparam("delta")), else_=0)
_LIVE_ADMISSION = (AdmissionRow.id == bindparam("admission"), AdmissionRow.released_at.is_(None))
_UPDATE_RUNNING = update(AdmissionRow).where(*_LIVE_ADMISSION).values(reserved_tokens=_RESERVE_LESS)
_RELEASE = update(AdmissionRow).where(*_LIVE_ADMISSION).values(
    reserved_tokens=_RESERVE_LESS, released_at=bindparam("released_at"), tokens=bindparam("total"))


def apply(entries: list[Entry], url: str | None = None) -> int:
    """Write a batch of entries (one entry per record) in one transaction; returns the tokens newly billed.
    Idempotent: each row takes max(old, new) and the key's counter and the admission's reservation move by exactly
    the difference; a final entry marks its row complete and releases its admission, as limits_store.release did."""
    now = utcnow()
    billed = 0
    entries = sorted(entries, key=lambda e: (e.admission_id is None, e.admission_id or 0, e.record_id))
    with connection(url) as db:
        bound_lock_wait(db)  # never wait forever behind another transaction's lock
        # Lock order, the same in every writer, so that none deadlocks: first the keys' counters (shared by every
        # server; sorted), waiting for them before holding anything else — the lease renewer then never waits
        # behind this batch's wait — then this server's own rows, admissions in ascending id order as the renewer
        # takes them (limits_store.renew).
        by_key = dict.fromkeys(sorted({e.key_name for e in entries if e.key_name is not None}), 0)
        for key_name in by_key:
            lock_counter(db, key_name)
        usage = UsageRecord
        found = {row.record_id: row for row in db.execute(
            select(usage.id, usage.record_id, usage.prompt_tokens, usage.completion_tokens, usage.cost,
                   usage.completed_at).where(usage.record_id.in_([e.record_id for e in entries]))
            .order_by(usage.id).with_for_update())}
        inserts, row_updates, running, released = [], [], [], []
        for entry in entries:
            row = found.get(entry.record_id)
            if row is None:  # a keyless request's first write, or a journal replayed where its row never got written
                inserts.append(_row(entry, now))
                prompt, completion = entry.prompt_tokens, entry.completion_tokens
                delta = prompt + completion
            else:
                prompt = max(row.prompt_tokens, entry.prompt_tokens)
                completion = max(row.completion_tokens, entry.completion_tokens)
                delta = prompt - row.prompt_tokens + completion - row.completion_tokens
                completed_at = row.completed_at or (now if entry.complete else None)
                if delta or completed_at != row.completed_at:
                    row_updates.append({"row_id": row.id, "new_prompt": prompt, "new_completion": completion,
                                        "new_cost": max(row.cost, entry.cost) if delta else row.cost,
                                        "new_completed_at": completed_at})
            billed += delta
            if entry.key_name is not None:
                by_key[entry.key_name] += delta
            if entry.admission_id is not None and entry.complete:
                released.append({"admission": entry.admission_id, "delta": delta, "released_at": now,
                                  "total": prompt + completion})
            elif entry.admission_id is not None and delta:
                running.append({"admission": entry.admission_id, "delta": delta})
        for statement, rows in ((insert(usage), inserts), (_UPDATE_ROW, row_updates), (_UPDATE_RUNNING, running),
                                (_RELEASE, released)):
            if rows:  # one row: a plain execute (executemany's pipeline costs more for one)
                db.execute(statement, rows[0] if len(rows) == 1 else rows)
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
