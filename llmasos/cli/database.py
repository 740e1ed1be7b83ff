"""`llmasos db upgrade|current`: the database schema, managed by Alembic migrations shipped in the package."""

from __future__ import annotations

import json

import click


@click.group("db")
def db() -> None:
    """Manage the database schema (SQLite under LLMASOS_HOME, or LLMASOS_DATABASE_URL)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Migrate to this revision.")
def upgrade(revision) -> None:
    """Bring the database's schema up to date (safe to run again, and from several replicas at once)."""
    from llmasos.db import database_url, shown_url
    from llmasos.db import upgrade as run_upgrade

    before, after = run_upgrade(revision=revision)
    where = shown_url(database_url())
    if before == after:
        click.echo(f"the database {where} is at revision {after}: nothing to do")
    else:
        click.echo(f"upgraded the database {where} from revision {before or '(empty)'} to {after}")


@db.command("current")
@click.option("--json", "as_json", is_flag=True)
def current(as_json) -> None:
    """Show the database's schema revision and the one this LLMasOS needs."""
    from llmasos.db import _new_engine, current_revision, database_url, head_revision, shown_url

    engine = _new_engine(database_url())
    try:
        with engine.connect() as connection:
            revision = current_revision(connection)
    finally:
        engine.dispose()
    row = {"database": shown_url(database_url()), "revision": revision, "head": head_revision()}
    if as_json:
        click.echo(json.dumps(row))
    else:
        state = "up to date" if revision == row["head"] else "run `llmasos db upgrade`"
        click.echo(f"{row['database']}: revision {revision or '(none)'}, this LLMasOS needs {row['head']} ({state})")


def register(cli: click.Group) -> None:
    cli.add_command(db)
