"""The database behind the model registry, API keys and usage: SQLAlchemy, a SQLite file under $LLMASOS_HOME by
default, or any SQLAlchemy URL in LLMASOS_DATABASE_URL (e.g. PostgreSQL) for a deployment shared by servers."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from llmasos.home import home


class Base(DeclarativeBase):
    """Every table of LLMasOS derives from this; `create_all` makes the missing ones."""


_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def database_url() -> str:
    return os.environ.get("LLMASOS_DATABASE_URL") or f"sqlite:///{home() / 'llmasos.db'}"


def get_engine(url: str | None = None) -> Engine:
    """One engine per URL for the process, with every table created."""
    url = url or database_url()
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = create_engine(url, future=True, pool_pre_ping=True)
            if url.startswith("sqlite"):
                event.listen(engine, "connect", _sqlite_pragmas)
            _import_tables()
            Base.metadata.create_all(engine)
            _engines[url] = engine
        return engine


def _sqlite_pragmas(connection, _record) -> None:
    # WAL lets the server write usage while the CLI reads; busy_timeout makes writers queue instead of failing.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _import_tables() -> None:
    """Import the modules that define tables so that create_all knows them all."""
    import importlib

    for module in ("llmasos.library.registry", "llmasos.server.auth"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


@contextmanager
def session(url: str | None = None) -> Iterator[Session]:
    """A transaction: committed when the block ends, rolled back on error."""
    maker = sessionmaker(get_engine(url), expire_on_commit=False)
    with maker() as db:
        try:
            yield db
            db.commit()
        except BaseException:
            db.rollback()
            raise


def dispose_all() -> None:
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
