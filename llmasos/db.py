"""The database behind the model registry, API keys, limits and usage: SQLAlchemy, a SQLite file under $LLMASOS_HOME
by default, or any SQLAlchemy URL in LLMASOS_DATABASE_URL (e.g. postgresql+psycopg://...) for servers that share it.

The schema is managed by the Alembic migrations in `llmasos/migrations`. An embedded SQLite database is upgraded on
first use (one made by an older LLMasOS without migrations is adopted: stamped as the initial revision, then
upgraded); a shared database is upgraded only by `llmasos db upgrade`, and code refuses to run on an older schema."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, inspect, make_url, text
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from llmasos.errors import LLMasOSError
from llmasos.home import home

MIGRATIONS = Path(__file__).parent / "migrations"
INITIAL_REVISION = "0001"  # the schema `create_all` made before migrations existed
ADVISORY_LOCK_ID = 0x11A5_0517  # serializes `llmasos db upgrade` run by several replicas at once (PostgreSQL)


class Base(DeclarativeBase):
    """Every table of LLMasOS derives from this; the migrations create and change them."""


class DatabaseSchemaError(LLMasOSError, ValueError):
    """The database's schema is not the one this code needs (older: upgrade it; newer: upgrade LLMasOS)."""


_engines: dict[str, Engine] = {}
_makers: dict[str, sessionmaker] = {}
# SQLite has one writer at a time and its busy handler sleeps between tries (up to 100 ms each): under 64 concurrent
# requests that gave a p99 of seconds. The threads of one process take turns on this lock instead (FIFO-ish, no
# sleeping); other processes (the CLI) still wait through busy_timeout.
_sqlite_turns: dict[str, threading.RLock] = {}
_lock = threading.Lock()


def database_url() -> str:
    return os.environ.get("LLMASOS_DATABASE_URL") or f"sqlite:///{home() / 'llmasos.db'}"


def shown_url(url: str) -> str:
    """The URL without its password, for messages."""
    return make_url(url).render_as_string(hide_password=True)


def _new_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, pool_pre_ping=True)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # Every request thread may hold a connection for one short transaction (the server's threadpool has 40). No
    # pre-ping: it is a round trip per transaction (four a request); after a database restart the first statement on
    # a dead connection fails, and SQLAlchemy then replaces the whole pool.
    return create_engine(url, pool_size=10, max_overflow=40)


def get_engine(url: str | None = None) -> Engine:
    """One engine per URL for the process, its schema checked once (and an embedded SQLite upgraded)."""
    url = url or database_url()
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _new_engine(url)
            try:
                if engine.dialect.name == "sqlite":
                    _upgrade_sqlite(engine)
                else:
                    check_schema(engine)
            except BaseException:
                engine.dispose()
                raise
            _engines[url] = engine
            _makers[url] = sessionmaker(engine, expire_on_commit=False)
            if engine.dialect.name == "sqlite":
                _sqlite_turns[url] = threading.RLock()
        return engine


def _sqlite_pragmas(connection, _record) -> None:
    # WAL lets the server write usage while the CLI reads; busy_timeout makes writers queue instead of failing.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout() * 1000)}")
    cursor.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable across process crashes, no fsync per commit
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def busy_timeout() -> float:
    """Seconds a SQLite writer waits for another process's write lock before failing (LLMASOS_SQLITE_BUSY_TIMEOUT,
    default 10)."""
    value = os.environ.get("LLMASOS_SQLITE_BUSY_TIMEOUT", "")
    try:
        return float(value) if value else 10.0
    except ValueError:
        raise ValueError(f"LLMASOS_SQLITE_BUSY_TIMEOUT={value!r} is not a number of seconds") from None


def bound_lock_wait(connection: Connection) -> None:
    """PostgreSQL: this transaction waits at most LLMASOS_DB_LOCK_TIMEOUT seconds (default 5) for a lock held by
    another, then fails — what SQLite's busy timeout does — so that a stuck writer elsewhere turns into an error the
    caller handles (a 503, a retried usage batch), never into a request that hangs."""
    if connection.dialect.name != "postgresql":
        return
    value = os.environ.get("LLMASOS_DB_LOCK_TIMEOUT", "")
    try:
        seconds = float(value) if value else 5.0
    except ValueError:
        raise ValueError(f"LLMASOS_DB_LOCK_TIMEOUT={value!r} is not a number of seconds") from None
    connection.execute(text(f"SET LOCAL lock_timeout = {max(1, int(seconds * 1000))}"))


def import_tables() -> None:
    """Import the modules that define tables so that the metadata knows them all."""
    import importlib

    for module in ("llmasos.library.registry", "llmasos.server.auth", "llmasos.server.limits_store"):
        importlib.import_module(module)


def alembic_config(connection: Connection | None = None):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    assert len(heads) == 1, f"the migrations have several heads: {heads}"
    return heads[0]


def current_revision(connection: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    heads = MigrationContext.configure(connection).get_current_heads()
    return heads[0] if heads else None


def check_schema(engine: Engine) -> None:
    """Refuse a database whose schema is not this code's head revision, saying what to do."""
    with engine.connect() as connection:
        current = current_revision(connection)
        adoptable = current is None and _has_tables(connection)
    head = head_revision()
    if current == head:
        return
    where = shown_url(engine.url.render_as_string(hide_password=False))
    if current is not None and not _known(current):
        raise DatabaseSchemaError(f"the database {where} has schema revision {current}, newer than this LLMasOS "
                                  f"knows (head {head}): upgrade LLMasOS")
    state = "has no LLMasOS tables yet" if current is None and not adoptable else \
        f"has schema revision {current or 'from before migrations'}"
    raise DatabaseSchemaError(f"the database {where} {state}; this LLMasOS needs revision {head}: run "
                              "`llmasos db upgrade` (with the same LLMASOS_DATABASE_URL) once, then start again")


def _known(revision: str) -> bool:
    from alembic.script import ScriptDirectory

    try:
        return ScriptDirectory.from_config(alembic_config()).get_revision(revision) is not None
    except Exception:  # alembic raises several kinds for an unknown id
        return False


def _has_tables(connection: Connection) -> bool:
    return bool({"api_keys", "usage", "library_models"} & set(inspect(connection).get_table_names()))


def upgrade(url: str | None = None, revision: str = "head") -> tuple[str | None, str | None]:
    """Bring the database at `url` to `revision`; returns (before, after). Safe to run from several processes."""
    url = url or database_url()
    engine = _new_engine(url)
    try:
        if engine.dialect.name == "sqlite":
            return _upgrade_sqlite(engine, revision)
        return _upgrade(engine, revision)
    finally:
        engine.dispose()
        with _lock:  # a cached engine of this URL checked the old schema: check again on next use
            cached = _engines.pop(url, None)
            _makers.pop(url, None)
            _sqlite_turns.pop(url, None)
        if cached is not None:
            cached.dispose()


def _upgrade_sqlite(engine: Engine, revision: str = "head") -> tuple[str | None, str | None]:
    from filelock import FileLock

    database = engine.url.database
    if not database or database == ":memory:":
        return _upgrade(engine, revision)
    # SQLite's driver does not put DDL in a transaction: two processes migrating at once take turns on a file lock.
    with FileLock(f"{database}.migrate.lock", timeout=60):
        return _upgrade(engine, revision)


def _upgrade(engine: Engine, revision: str) -> tuple[str | None, str | None]:
    from alembic import command

    with engine.begin() as connection:  # PostgreSQL: the whole upgrade is one transaction, under an advisory lock
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": ADVISORY_LOCK_ID})
        before = current_revision(connection)
        if revision == "head" and before == head_revision():
            return before, before
        config = alembic_config(connection)
        if before is None and _has_tables(connection):
            command.stamp(config, INITIAL_REVISION)  # made by create_all before migrations: it is the initial schema
            before = INITIAL_REVISION
        command.upgrade(config, revision)
        return before, current_revision(connection)


@contextmanager
def session(url: str | None = None) -> Iterator[Session]:
    """A transaction: committed when the block ends, rolled back on error."""
    url = url or database_url()
    get_engine(url)
    with _sqlite_turns.get(url) or nullcontext(), _makers[url]() as db:
        try:
            yield db
            db.commit()
        except BaseException:
            db.rollback()
            raise


@contextmanager
def connection(url: str | None = None) -> Iterator[Connection]:
    """A Core transaction (no ORM unit of work): what the per-request statements of keys and limits use."""
    url = url or database_url()
    engine = get_engine(url)
    with _sqlite_turns.get(url) or nullcontext(), engine.begin() as connection:
        yield connection


def dispose_all() -> None:
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _makers.clear()
        _sqlite_turns.clear()
