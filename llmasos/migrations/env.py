"""Alembic's environment for LLMasOS: migrations run on the connection `llmasos.db.upgrade` hands over (or on
sqlalchemy.url when the alembic command line runs them), against the metadata of every LLMasOS table."""

from alembic import context
from sqlalchemy import create_engine

from llmasos.db import Base, database_url, import_tables

import_tables()


def run(connection) -> None:
    # Batch mode lets ALTER TABLE work on SQLite (it copies the table) and is plain ALTER on PostgreSQL.
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    engine = create_engine(context.config.get_main_option("sqlalchemy.url") or database_url())
    with engine.begin() as own:
        run(own)
    engine.dispose()
