"""Suite-wide isolation: the whole test session runs with its own LLMASOS_HOME (a temporary directory) and without
the caller's database URL or API key, so running the tests never reads or writes the user's models, keys or usage.
Modules that need a fresh home of their own still set one (see tests/server/conftest.py)."""

from __future__ import annotations

import pytest

# What would point the code under test (or a server it starts) at the user's real state.
USER_STATE_VARIABLES = ("LLMASOS_DATABASE_URL", "LLMASOS_API_KEY")


@pytest.fixture(scope="session", autouse=True)
def isolated_llmasos_home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLMASOS_HOME", str(tmp_path_factory.mktemp("llmasos-home")))
        for name in USER_STATE_VARIABLES:
            patch.delenv(name, raising=False)
        yield


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session (Debian's `postgresql` package); skipped, with the reason, only
    when it cannot start here."""
    from support_postgres import PostgresUnavailable, start_postgres

    try:
        server = start_postgres()
    except PostgresUnavailable as exc:
        pytest.skip(f"no PostgreSQL server for these tests: {exc}")
    yield server
    from llmasos.db import dispose_all

    dispose_all()  # close pooled connections before the server goes away
    server.stop()
