"""The schema's migrations on SQLite and on a real PostgreSQL: from empty to head (equal to the models), from the
previous revision, and from a database made by `create_all` before migrations (adopted); a shared database below head
is refused with `llmasos db upgrade` in the message, by the library and by `llmasos serve`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text

from llmasos import db

PREVIOUS = "0002"


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'llmasos.db'}"
    return request.getfixturevalue("postgres").create_database("mig")


def migrate(url: str, revision: str) -> None:
    engine = db._new_engine(url)
    with engine.begin() as connection:
        command.upgrade(db.alembic_config(connection), revision)
    engine.dispose()


def revision_of(url: str) -> str | None:
    engine = db._new_engine(url)
    with engine.connect() as connection:
        revision = db.current_revision(connection)
    engine.dispose()
    return revision


def llmasos(*args: str, url: str, home, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLMASOS_DATABASE_URL": url, "LLMASOS_HOME": str(home)}
    result = subprocess.run([sys.executable, "-m", "llmasos", *args], capture_output=True, text=True, env=env,
                            timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_upgrade_from_empty_gives_exactly_the_models_schema(url):
    assert db.upgrade(url) == (None, db.head_revision())
    engine = db._new_engine(url)
    db.import_tables()
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), db.Base.metadata)
    engine.dispose()
    assert differences == []
    assert db.upgrade(url) == (db.head_revision(),) * 2  # a second run does nothing


def test_upgrade_from_the_previous_revision_keeps_keys_and_seeds_the_quota_counters(url, tmp_path):
    migrate(url, PREVIOUS)
    engine = db._new_engine(url)
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO api_keys (name, key_hash, key_prefix, created_at, admin) VALUES "
                                "('old', 'h1', 'sk-llmasos-old', '2026-01-01', true)"))
    engine.dispose()
    llmasos("db", "upgrade", url=url, home=tmp_path)
    assert revision_of(url) == db.head_revision()
    engine = db._new_engine(url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT key_name, used_tokens FROM key_counters")).all() == [("old", 0)]
        assert connection.execute(text("SELECT admin FROM api_keys")).scalar() in (True, 1)
    engine.dispose()


def test_upgrade_to_the_ledger_marks_earlier_usage_rows_complete(url):
    """0004 adds usage.record_id and usage.completed_at: rows written before it were written when their request
    ended, so they are complete; they have no record id."""
    migrate(url, "0003")
    engine = db._new_engine(url)
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO usage (key_name, model, route, request_id, created_at, prompt_tokens, completion_tokens, "
            "cost) VALUES ('k', 'm', 'completions', 'r', '2026-01-02 03:04:05', 3, 4, 0.0)"))
    engine.dispose()
    migrate(url, "head")
    engine = db._new_engine(url)
    with engine.connect() as connection:
        row = connection.execute(text("SELECT record_id, completed_at, created_at FROM usage")).one()
    engine.dispose()
    assert row[0] is None and str(row[1]) == str(row[2]) and str(row[1]).startswith("2026-01-02 03:04:05")


def made_by_create_all(url: str) -> None:
    """What LLMasOS before migrations left: today's initial tables, no alembic_version, a key with usage."""
    migrate(url, db.INITIAL_REVISION)
    engine = db._new_engine(url)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE alembic_version"))
        connection.execute(text("INSERT INTO api_keys (name, key_hash, key_prefix, created_at) VALUES "
                                "('user', 'h2', 'sk-llmasos-usr', '2026-01-01')"))
        for prompt, completion in ((3, 4), (10, 20)):
            connection.execute(text(
                "INSERT INTO usage (key_name, model, route, request_id, created_at, prompt_tokens, completion_tokens,"
                f" cost) VALUES ('user', 'm', 'completions', 'r', '2026-01-02', {prompt}, {completion}, 0.0)"))
    engine.dispose()


def test_an_embedded_sqlite_made_before_migrations_is_adopted_on_first_use(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'llmasos.db'}"
    made_by_create_all(url)
    monkeypatch.setenv("LLMASOS_DATABASE_URL", url)
    from llmasos.server import auth

    try:
        keys = {row["name"]: row for row in auth.list_keys()}
        assert keys["user"]["admin"] is False
        assert auth.tokens_used("user") == 37  # the quota counter starts from the usage rows
    finally:
        db.dispose_all()
    assert revision_of(url) == db.head_revision()


def test_a_shared_database_below_head_is_refused_until_llmasos_db_upgrade(postgres, tmp_path, checkpoint_dir):
    url = postgres.create_database("old")
    made_by_create_all(url)
    with pytest.raises(db.DatabaseSchemaError, match="llmasos db upgrade"):
        db.get_engine(url)
    listed = llmasos("keys", "list", url=url, home=tmp_path, check=False)
    assert listed.returncode == 1 and "llmasos db upgrade" in listed.stderr and "Traceback" not in listed.stderr
    served = llmasos("serve", "--model", str(checkpoint_dir), "--port", "0", url=url, home=tmp_path, check=False)
    assert served.returncode == 1 and "llmasos db upgrade" in served.stderr, served.stderr[-2000:]
    assert "loading" not in served.stderr  # refused before any model loads
    upgraded = llmasos("db", "upgrade", url=url, home=tmp_path)
    assert f"from revision {db.INITIAL_REVISION} to {db.head_revision()}" in upgraded.stdout
    assert "password" not in upgraded.stdout
    listed = llmasos("keys", "list", "--json", url=url, home=tmp_path)
    assert '"user"' in listed.stdout
    from sqlalchemy import create_engine

    engine = create_engine(url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT used_tokens FROM key_counters WHERE key_name = 'user'")).scalar() == 37
    engine.dispose()


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    from support import family_config, make_checkpoint

    directory = tmp_path_factory.mktemp("checkpoints") / "tiny"
    make_checkpoint(directory, family_config("qwen2", num_hidden_layers=1, max_position_embeddings=64))
    return directory
