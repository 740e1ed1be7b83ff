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
