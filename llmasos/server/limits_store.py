"""Per-key limits kept in the database, so that every server sharing it enforces them together, exactly.

Two tables: `key_counters` (one row per key: tokens used so far, kept in step with the usage rows; its row lock
serializes the admissions of one key across all replicas) and `admissions` (one row per admitted request: when, how
many sequences, how many tokens it reserves against the quota, and a lease that its server renews while the request
runs — a crashed server's reservations lapse when their lease expires). Each admission is one transaction that starts
with `UPDATE key_counters ... RETURNING` (a row lock in PostgreSQL, the write lock in SQLite), counts the key's window,
then inserts its row or refuses. Every function here blocks: call them from a worker thread."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Connection,
    DateTime,
    Index,
    Integer,
    String,
    case,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.orm import Mapped, mapped_column

from llmasos.db import Base, bound_lock_wait, connection

WINDOW_SECONDS = 60.0


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class KeyCounter(Base):
    __tablename__ = "key_counters"

    key_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    used_tokens: Mapped[int] = mapped_column(BigInteger, default=0)  # prompt + completion tokens metered so far
    touched_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)  # last admission (the lock)


class AdmissionRow(Base):
    __tablename__ = "admissions"
    __table_args__ = (Index("ix_admissions_key_admitted", "key_name", "admitted_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_name: Mapped[str] = mapped_column(String(64))
    admitted_at: Mapped[dt.datetime] = mapped_column(DateTime)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime)  # the lease; renewed while the request runs
    released_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    sequences: Mapped[int] = mapped_column(Integer, default=1)
    reserved_tokens: Mapped[int] = mapped_column(Integer, default=0)  # held against the quota until released
    tokens: Mapped[int] = mapped_column(Integer, default=0)  # tokens it used, counted in the tpm window on release


@dataclass(frozen=True)
class Window:
    """A key's state across all servers at one moment (ages in seconds before that moment)."""

    requests: int  # admitted in the last minute
    oldest_request_age: float | None
    tokens: int  # used by requests released in the last minute
    oldest_tokens_age: float | None
    in_flight: int  # sequences of live admissions
    reserved: int  # tokens reserved by live admissions
    used_tokens: int  # metered so far (the quota's count)


def _lock_key(db: Connection, key_name: str, now: dt.datetime, billed: int = 0) -> int:
    """Take the key's row lock (creating its row on first use), counting `billed` tokens in the same statement;
    returns the tokens it had used before them."""
    statement = (update(KeyCounter).where(KeyCounter.key_name == key_name)
                 .values(touched_at=now, used_tokens=KeyCounter.used_tokens + billed).returning(KeyCounter.used_tokens))
    used = db.execute(statement).scalar()
    if used is None:
        ensure_counter(db, key_name)
        used = db.execute(statement).scalar()
    return int(used or 0) - billed


def lock_counter(db: Connection, key_name: str) -> None:
    """Take the key's counter row lock (PostgreSQL; SQLite's write lock covers it) without changing it."""
    if db.dialect.name == "postgresql":
        db.execute(select(KeyCounter.key_name).where(KeyCounter.key_name == key_name).with_for_update())


def ensure_counter(db: Connection, key_name: str) -> None:
    """Insert the key's counter row unless another server just did."""
    dialect = db.dialect.name
    if dialect in ("postgresql", "sqlite"):
        from importlib import import_module

        upsert = import_module(f"sqlalchemy.dialects.{dialect}").insert
        db.execute(upsert(KeyCounter).values(key_name=key_name, used_tokens=0).on_conflict_do_nothing())
    elif db.scalar(select(KeyCounter.key_name).where(KeyCounter.key_name == key_name)) is None:
        # other databases: a plain insert (a concurrent first use of one key may then fail once)
        db.execute(insert(KeyCounter).values(key_name=key_name, used_tokens=0))


def _window(db: Connection, key_name: str, now: dt.datetime, used_tokens: int) -> Window:
    start = now - dt.timedelta(seconds=WINDOW_SECONDS)
    live = (AdmissionRow.released_at.is_(None)) & (AdmissionRow.expires_at > now)
    recent = AdmissionRow.released_at > start
    row = db.execute(select(
        func.count(case((AdmissionRow.admitted_at > start, 1))),
        func.min(case((AdmissionRow.admitted_at > start, AdmissionRow.admitted_at))),
        func.coalesce(func.sum(case((recent, AdmissionRow.tokens), else_=0)), 0),
        func.min(case((recent & (AdmissionRow.tokens > 0), AdmissionRow.released_at))),
        func.coalesce(func.sum(case((live, AdmissionRow.sequences), else_=0)), 0),
        func.coalesce(func.sum(case((live, AdmissionRow.reserved_tokens), else_=0)), 0),
    ).where(AdmissionRow.key_name == key_name)).one()
    requests, oldest_request, tokens, oldest_tokens, in_flight, reserved = row
    return Window(int(requests), (now - oldest_request).total_seconds() if oldest_request else None, int(tokens),
                  (now - oldest_tokens).total_seconds() if oldest_tokens else None, int(in_flight), int(reserved),
                  used_tokens)


def admit(key_name: str, decide, lease_seconds: float, opened=None, billed: int = 0) -> tuple[int, Window]:
    """Admit one request of `key_name` atomically across servers. `decide(window)` returns (sequences,
    reserved_tokens) to admit or raises (a refusal, which rolls everything back); `opened(db, admission_id)`, if
    given, runs in the same transaction (the ledger opens the request's usage row there, of `billed` tokens, which
    the key's counter counts from the statement that locks it: one round trip less under the lock); returns
    (admission id, the window before this admission)."""
    now = utcnow()
    with connection() as db:
        bound_lock_wait(db)
        used = _lock_key(db, key_name, now, billed)
        window = _window(db, key_name, now, used)
        sequences, reserved = decide(window)
        admission_id = db.execute(insert(AdmissionRow).values(
            key_name=key_name, admitted_at=now, sequences=sequences, reserved_tokens=reserved, released_at=None,
            tokens=0, expires_at=now + dt.timedelta(seconds=lease_seconds)).returning(AdmissionRow.id)).scalar_one()
        if opened is not None:
            opened(db, admission_id)
        return admission_id, window


def release(admission_id: int, key_name: str, tokens: int) -> None:
    """Mark the admission released with the tokens it used; drop the key's rows that can no longer count (out of
    the window and released, or lapsed) while here, outside the key's lock."""
    now = utcnow()
    old = now - dt.timedelta(seconds=WINDOW_SECONDS)
    lapsed = AdmissionRow.released_at.is_(None) & (AdmissionRow.expires_at < now)
    with connection() as db:
        db.execute(update(AdmissionRow).where(AdmissionRow.id == admission_id, AdmissionRow.released_at.is_(None))
                   .values(released_at=now, tokens=tokens))
        db.execute(delete(AdmissionRow).where(AdmissionRow.key_name == key_name, AdmissionRow.admitted_at < old,
                                              (AdmissionRow.released_at < old) | lapsed))


def renew(admission_ids: list[int], lease_seconds: float) -> None:
    """Extend the leases of requests still running on this server."""
    if not admission_ids:
        return
    expires = utcnow() + dt.timedelta(seconds=lease_seconds)
    # Locked in ascending id order, as the metering writer's batches lock them: the two never deadlock.
    ids = select(AdmissionRow.id).where(AdmissionRow.id.in_(admission_ids), AdmissionRow.released_at.is_(None)) \
        .order_by(AdmissionRow.id).with_for_update()
    with connection() as db:
        db.execute(update(AdmissionRow).where(AdmissionRow.id.in_(ids)).values(expires_at=expires))


def add_used_tokens(db: Connection, key_name: str, tokens: int) -> None:
    """Count metered tokens against the key's quota, in the transaction that writes their usage row."""
    if not tokens:
        return
    statement = update(KeyCounter).where(KeyCounter.key_name == key_name).values(
        used_tokens=KeyCounter.used_tokens + tokens).returning(KeyCounter.key_name)
    if db.execute(statement).scalar() is None:
        ensure_counter(db, key_name)
        db.execute(statement)


def used_tokens(key_name: str) -> int:
    with connection() as db:
        return int(db.scalar(select(KeyCounter.used_tokens).where(KeyCounter.key_name == key_name)) or 0)
