"""Servers sharing one registry (LLMASOS_DATABASE_URL) with a store each: the bundled model resolves from the package
on a server that never stored it, a pulled model on another server is an error naming the `llmasos pull` that
fetches it, and that pull fills the directory the registry names without changing the row."""

from __future__ import annotations

import json

import pytest

from llmasos.errors import LibraryError
from llmasos.library import resolve
from llmasos.library.registry import get_model

REPO = "Org/Tiny-Model"


@pytest.fixture
def hub_env(hub, monkeypatch, home):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)


@pytest.fixture
def second_server(workdir, home, monkeypatch):
    """Switch the test to a second server: its own LLMASOS_HOME, the first one's database."""
    monkeypatch.setenv("LLMASOS_DATABASE_URL", f"sqlite:///{workdir / 'shared.db'}")

    def switch():
        monkeypatch.setenv("LLMASOS_HOME", str(workdir / "home-b"))
        return workdir / "home-b"

    return switch


def test_the_bundled_model_resolves_from_the_package_on_every_server(second_server, monkeypatch):
    monkeypatch.setattr(resolve, "BUNDLED_MODEL_DIR", resolve.Path(resolve.__file__).resolve().parent.parent
                        / "assets" / "default_model")
    first = resolve.resolve_model(resolve.DEFAULT_MODEL_NAME)
    assert first.library and first.path.is_dir() and first.path != resolve.BUNDLED_MODEL_DIR
    second_server()
    again = resolve.resolve_model(resolve.DEFAULT_MODEL_NAME)
    assert again.path == resolve.BUNDLED_MODEL_DIR and again.library
    assert resolve.default_model_name() == resolve.DEFAULT_MODEL_NAME


def test_a_pulled_model_is_fetched_onto_another_server_into_the_same_directory(cli, hub, hub_env, checkpoint,
                                                                              second_server):
    hub.add_repo(REPO, checkpoint)
    assert cli("pull", REPO).exit_code == 0
    row = get_model("tiny-model")
    home_b = second_server()
    expected = r"missing from this server's store .*`llmasos pull Org/Tiny-Model:"
    with pytest.raises(LibraryError, match=expected) as error:
        resolve.resolve_model("tiny-model")
    command = str(error.value).split("`")[1].split()[2:]  # the pull the message names
    result = cli("pull", *command)
    assert result.exit_code == 0 and "fetched onto this server" in result.stdout, result.output
    after = get_model("tiny-model")
    assert after.directory == row.directory and after.files == row.files
    resolved = resolve.resolve_model("tiny-model")
    assert resolved.path == home_b / "models" / "checkpoints" / row.directory
    assert json.loads(cli("show", "tiny-model", "--json").stdout)["directory"] == row.directory
