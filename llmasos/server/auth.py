"""API keys and usage rows in the database: keys are stored as SHA-256 hashes and shown once, at creation."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Integer,
    String,
    UniqueConstraint,
    false,
    func,
    insert,
    select,
)
from sqlalchemy.orm import Mapped, mapped_column

from llmasos.db import Base, connection, session
from llmasos.server.limits_store import add_used_tokens, ensure_counter, used_tokens

KEY_PREFIX = "sk-llmasos-"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_KEY_SHAPE = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
INT_MAX, BIGINT_MAX = 2**31 - 1, 2**63 - 1  # what the columns hold in every database (PostgreSQL checks)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    key_prefix: Mapped[str] = mapped_column(String(24))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    token_quota: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # BIGINT since revision 0003
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    max_concurrency: Mapped[int | None] = mapped_column(Integer, nullable=True)
    models: Mapped[str | None] = mapped_column(String(2048), nullable=True)  # comma-separated allow-list
    # May use the admin endpoints (adapters, the web console); revision 0002.
    admin: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class UsageRecord(Base):
    __tablename__ = "usage"
    __table_args__ = (UniqueConstraint("record_id", name="uq_usage_record_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_name: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)
    model: Mapped[str] = mapped_column(String(256), index=True)
    route: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost: Mapped[float] = mapped_column(Float, default=0.0)
    # The metering ledger (revision 0004): the row exists from admission under an idempotent id and carries the
    # request's cumulative tokens; completed_at is set by its final write (NULL: still running, or its server died).
    record_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    completed_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


@dataclass(frozen=True)
class KeyInfo:
    """What a request needs to know about its key (a plain copy, detached from the database session)."""

    name: str
    token_quota: int | None
    rpm: int | None
    tpm: int | None
    max_concurrency: int | None
    models: tuple[str, ...] | None
    admin: bool = False  # may use the admin endpoints

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_key(name: str, token_quota: int | None = None, rpm: int | None = None, tpm: int | None = None,
               max_concurrency: int | None = None, models: list[str] | None = None,
               expires: dt.datetime | None = None, admin: bool = False) -> str:
    """Create a key and return its secret (the only time it is ever shown)."""
    if not _NAME.match(name or ""):
        raise ValueError(f"key name {name!r} is invalid: use 1-64 letters, digits, '.', '_' or '-'")
    limits = (("token quota", token_quota, BIGINT_MAX), ("rpm", rpm, INT_MAX), ("tpm", tpm, BIGINT_MAX),
              ("max concurrency", max_concurrency, INT_MAX))
    for label, value, most in limits:
        if value is not None and not 1 <= value <= most:
            raise ValueError(f"{label} must be an integer from 1 to {most}, got {value}")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    with session() as db:
        if db.scalar(select(ApiKey).where(ApiKey.name == name)) is not None:
            raise ValueError(f"a key named {name!r} already exists; revoke it first or pick another name")
        db.add(ApiKey(name=name, key_hash=hash_key(secret), key_prefix=secret[:16], token_quota=token_quota, rpm=rpm,
                      tpm=tpm, max_concurrency=max_concurrency, expires_at=expires,
                      models=",".join(models) if models else None, admin=admin))
        db.flush()
        ensure_counter(db.connection(), name)
    return secret


def revoke_key(name: str) -> None:
    with session() as db:
        key = db.scalar(select(ApiKey).where(ApiKey.name == name, ApiKey.revoked_at.is_(None)))
        if key is None:
            raise ValueError(f"no active key named {name!r} (see `llmasos keys list`)")
        key.revoked_at = utcnow()


def list_keys() -> list[dict]:
    with session() as db:
        rows = db.scalars(select(ApiKey).order_by(ApiKey.id)).all()
        return [{"name": k.name, "prefix": k.key_prefix, "created_at": k.created_at.isoformat(timespec="seconds"),
                 "expires_at": k.expires_at.isoformat(timespec="seconds") if k.expires_at else None,
                 "revoked": k.revoked_at is not None, "token_quota": k.token_quota, "rpm": k.rpm, "tpm": k.tpm,
                 "max_concurrency": k.max_concurrency, "models": k.models.split(",") if k.models else None,
                 "admin": bool(k.admin)}
                for k in rows]


def key_count() -> int:
    """Keys ever created, revoked and expired ones included."""
    with session() as db:
        return db.scalar(select(func.count(ApiKey.id))) or 0


def active_key_count() -> int:
    now = utcnow()
    with session() as db:
        return db.scalar(select(func.count(ApiKey.id)).where(
            ApiKey.revoked_at.is_(None), (ApiKey.expires_at.is_(None)) | (ApiKey.expires_at > now))) or 0


def lookup_key(secret: str) -> KeyInfo | None:
    """The active key with this secret, or None. Looked up by hash, with bound parameters only."""
    if not secret.startswith(KEY_PREFIX) or not _KEY_SHAPE.match(secret[len(KEY_PREFIX):]):
        return None
    now = utcnow()
    with connection() as db:  # every request: Core, not the ORM
        key = db.execute(select(ApiKey.name, ApiKey.token_quota, ApiKey.rpm, ApiKey.tpm, ApiKey.max_concurrency,
                                ApiKey.models, ApiKey.admin, ApiKey.revoked_at, ApiKey.expires_at)
                         .where(ApiKey.key_hash == hash_key(secret))).first()
    if key is None or key.revoked_at is not None or (key.expires_at is not None and key.expires_at <= now):
        return None
    return KeyInfo(key.name, key.token_quota, key.rpm, key.tpm, key.max_concurrency,
                   tuple(key.models.split(",")) if key.models else None, bool(key.admin))


def tokens_used(key_name: str) -> int:
    """Prompt + completion tokens metered for the key: its counter, kept in step with its usage rows."""
    return used_tokens(key_name)


def record_usage(key_name: str | None, model: str, route: str, request_id: str, prompt_tokens: int,
                 completion_tokens: int, cost: float) -> None:
    """One complete usage row, and the key's quota counter moved by as much, in one transaction (so never one
    without the other, whichever server writes it). The server meters through its ledger (server/ledger.py)
    instead, which keeps a row up to date while its request runs."""
    now = utcnow()
    with connection() as db:
        db.execute(insert(UsageRecord).values(key_name=key_name, model=model, route=route, request_id=request_id,
                                              created_at=now, prompt_tokens=prompt_tokens,
                                              completion_tokens=completion_tokens, cost=cost, completed_at=now))
        if key_name is not None:
            add_used_tokens(db, key_name, prompt_tokens + completion_tokens)


def usage_summary(key_name: str | None = None, since: dt.datetime | None = None) -> list[dict]:
    """Rows {key, model, requests, prompt_tokens, completion_tokens, cost} grouped by key and model."""
    query = select(UsageRecord.key_name, UsageRecord.model, func.count(UsageRecord.id),
                   func.sum(UsageRecord.prompt_tokens), func.sum(UsageRecord.completion_tokens),
                   func.sum(UsageRecord.cost)).group_by(UsageRecord.key_name, UsageRecord.model)
    if key_name is not None:
        query = query.where(UsageRecord.key_name == key_name)
    if since is not None:
        query = query.where(UsageRecord.created_at >= since)
    with session() as db:
        rows = db.execute(query.order_by(UsageRecord.key_name.nulls_first(), UsageRecord.model)).all()  # as SQLite
    return [{"key": key, "model": model, "requests": int(n), "prompt_tokens": int(p or 0),
             "completion_tokens": int(c or 0), "cost": float(f"{float(cost or 0.0):.12g}")}
            for key, model, n, p, c, cost in rows]
