"""resolve_model (name or path), the bundled default model's registration, and the defaults a ResolvedModel carries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from library.conftest import copy_checkpoint
from llmasos.errors import LibraryError, ModelLoadError
from llmasos.library import (
    DEFAULT_MODEL_NAME,
    ResolvedModel,
    default_model_name,
    ensure_default_model,
    resolve_model,
    with_system_prompt,
)


def test_directory_resolves_to_itself(home, checkpoint):
    for given in (checkpoint, str(checkpoint)):
        resolved = resolve_model(given)
        assert resolved.path == Path(checkpoint) and not resolved.library
        assert resolved.system is None and resolved.parameters == {} and resolved.template is None
    assert not home.exists()  # a directory never touches the library


def test_existing_directory_wins_over_a_library_name(cli, workdir, checkpoint, monkeypatch):
    assert cli("import", str(checkpoint), "--name", "tiny").exit_code == 0
    local = copy_checkpoint(checkpoint, workdir / "tiny")
    monkeypatch.chdir(workdir)
    assert resolve_model("tiny").path == Path("tiny") and not resolve_model("tiny").library
    monkeypatch.chdir(local)
    resolved = resolve_model("tiny")
    assert resolved.library and resolved.name == "tiny" and resolved.path.parent.name == "checkpoints"


def test_unknown_inputs(home):
    with pytest.raises(LibraryError, match="no model named 'nope'.*llmasos pull"):
        resolve_model("nope")
    with pytest.raises(ModelLoadError, match="not found.*llmasos pull a/b"):
        resolve_model("a/b")
    for path in ("/missing", "./missing/", "~/missing"):  # a missing path is not a repo id to pull
        with pytest.raises(ModelLoadError, match="not found") as error:
            resolve_model(path)
        assert "llmasos pull" not in str(error.value)
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_model("./missing/dir")
    with pytest.raises(LibraryError, match="NUL"):
        resolve_model("x\x00y")


def test_bundled_default_model_registered_once(cli, home, checkpoint, monkeypatch):
    monkeypatch.setattr("llmasos.library.resolve.BUNDLED_MODEL_DIR", checkpoint)
    listed = json.loads(cli("list", "--json").stdout)
    assert [m["name"] for m in listed] == [DEFAULT_MODEL_NAME] and listed[0]["source"] == "bundled"
    assert default_model_name() == DEFAULT_MODEL_NAME
    resolved = resolve_model(DEFAULT_MODEL_NAME)
    assert resolved.library and (resolved.path / "model.safetensors").is_file()
    # Removing it is respected: it does not come back on the next command.
    assert cli("rm", DEFAULT_MODEL_NAME).exit_code == 0
    assert json.loads(cli("list", "--json").stdout) == []
    assert ensure_default_model() is None
    with pytest.raises(LibraryError, match="not installed"):
        default_model_name()
    # ... and what is said then is how to add it back, not to pull another model; the command said works.
    with pytest.raises(LibraryError, match="was removed from this library") as error:
        resolve_model(DEFAULT_MODEL_NAME)
    hint = f"llmasos import {checkpoint} --name {DEFAULT_MODEL_NAME} --link"
    assert hint in str(error.value) and "llmasos pull" not in str(error.value)
    with pytest.raises(LibraryError, match="add it back with `" + hint):
        default_model_name()
    assert cli(*hint.split()[1:]).exit_code == 0
    assert resolve_model(DEFAULT_MODEL_NAME).library


def test_no_bundled_model_says_how_to_get_one(home):
    with pytest.raises(LibraryError) as info:
        default_model_name()
    message = str(info.value)
    assert "llmasos pull" in message and "llmasos import" in message and "--model" in message


def test_sampling_params_and_system_prompt():
    resolved = ResolvedModel(name="m", path=Path("."), system="Be kind.",
                             parameters={"temperature": 0.3, "max_tokens": 9, "stop": ["END"]})
    params = resolved.sampling_params(max_tokens=None, top_p=0.5)
    assert (params.temperature, params.max_tokens, params.top_p, params.stop_strings) == (0.3, 9, 0.5, ["END"])
    assert resolved.sampling_params(temperature=1.0).temperature == 1.0
    user = [{"role": "user", "content": "hi"}]
    assert resolved.apply_system_prompt(user) == [{"role": "system", "content": "Be kind."}, *user]
    own = [{"role": "system", "content": "Mine."}, *user]
    assert with_system_prompt(own, "Be kind.") == own
    assert with_system_prompt(user, None) == user and with_system_prompt(user, "") == user
