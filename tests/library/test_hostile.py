"""Hostile input through the real CLI: bad names are refused before anything touches the disk, corrupt checkpoints are
refused with the store left as it was, and a tampered registry cannot point outside the store."""

from __future__ import annotations

import json
import struct

import pytest

from library.conftest import copy_checkpoint, tree
from library.test_names import HOSTILE_NAMES
from llmasos.library.store import checkpoint_path

NAMES = [name for name in HOSTILE_NAMES.values() if name]


def _commands(name: str, checkpoint, modelfile) -> list[list[str]]:
    return [
        ["import", str(checkpoint), "--name", name],
        ["show", name],
        ["rm", name],
        ["cp", "tiny", name],
        ["cp", name, "tiny2"],
        ["create", name, "-f", str(modelfile)],
        ["pull", "org/repo", "--name", name],
    ]


@pytest.mark.parametrize("name", NAMES, ids=[k for k, v in HOSTILE_NAMES.items() if v])
def test_hostile_names_touch_nothing(cli, home, workdir, checkpoint, name):
    modelfile = workdir / "Modelfile"
    modelfile.write_text("FROM tiny\nSYSTEM hi\n")
    before = tree(workdir)
    for args in _commands(name, checkpoint, modelfile):
        result = cli(*args)
        # Ours are `error: ...` with exit 1; click's own refusal of a name that looks like an option exits 2.
        assert result.exit_code in (1, 2), (args, result.output)
        assert ("error: " in result.stderr or "Error: " in result.stderr), (args, result.output)
        assert "Traceback" not in result.output, (args, result.output)
        assert tree(workdir) == before, args
    assert not home.exists()  # refused before the home (database, store) was even created


def test_hostile_modelfile_from_names(cli, workdir, checkpoint):
    assert cli("import", str(checkpoint), "--name", "tiny").exit_code == 0
    for base in ("../tiny", "/etc/passwd", "tiny/../../x", str(checkpoint)):
        modelfile = workdir / "Modelfile"
        modelfile.write_text(f"FROM {base}\n")
        result = cli("create", "evil", "-f", str(modelfile))
        assert result.exit_code == 1 and "FROM" in result.stderr, base
    assert [m["name"] for m in json.loads(cli("list", "--json").stdout)] == ["tiny"]


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])


def _huge_header(path):
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])


def _garbage_header(path):
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    path.write_bytes(data[:8] + b"{" * header_len + data[8 + header_len:])


def _empty(path):
    path.write_bytes(b"")


def _bad_offsets(path):
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    name = next(k for k in header if k != "__metadata__")
    start, stop = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start, stop + 4]
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + header_len:])


CORRUPTIONS = {
    "truncated-safetensors": ("model.safetensors", _truncate, "truncated"),
    "huge-header-length": ("model.safetensors", _huge_header, "header claims"),
    "garbage-header": ("model.safetensors", _garbage_header, "corrupt"),
    "empty-safetensors": ("model.safetensors", _empty, "truncated"),
    "inconsistent-offsets": ("model.safetensors", _bad_offsets, "inconsistent offsets"),
    "config-not-json": ("config.json", lambda p: p.write_text("{not json"), "not valid JSON"),
    "unsupported-family": ("config.json", lambda p: p.write_text(json.dumps(
        {**json.loads(p.read_text()), "model_type": "mamba"})), "not supported"),
    "tokenizer-garbage": ("tokenizer.json", lambda p: p.write_text('{"model": 5}'), "could not be loaded"),
    "tokenizer-missing": ("tokenizer.json", lambda p: p.unlink(), "tokenizer.json is missing"),
    "pickle-only": ("model.safetensors", lambda p: p.rename(p.with_name("pytorch_model.bin")), "pickle"),
    "index-escapes": ("model.safetensors.index.json", lambda p: p.write_text(json.dumps(
        {"weight_map": {"w": "../../outside.safetensors"}})), "outside the model directory"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_checkpoint_refused_store_unchanged(cli, home, workdir, checkpoint, corruption):
    assert cli("import", str(checkpoint), "--name", "good").exit_code == 0
    filename, damage, expected = CORRUPTIONS[corruption]
    source = copy_checkpoint(checkpoint, workdir / "bad")
    damage(source / filename)
    store_before, source_before = tree(home / "models"), tree(source)
    listed_before = cli("list", "--json").stdout

    result = cli("import", str(source), "--name", "bad")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and expected in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert tree(home / "models") == store_before
    assert tree(source) == source_before
    assert cli("list", "--json").stdout == listed_before


def test_tampered_registry_directory_is_refused(cli, home, checkpoint):
    from llmasos.db import session
    from llmasos.library.registry import LibraryModel

    assert cli("import", str(checkpoint), "--name", "tiny").exit_code == 0
    for bad in ("../../etc", "/etc", "a/b", ".."):
        with session() as db:
            db.get(LibraryModel, "tiny").directory = bad
        with pytest.raises(ValueError, match="not a store id"):
            checkpoint_path(bad)
        result = cli("generate", "--model", "tiny", "hi")
        assert result.exit_code == 1 and "not a store id" in result.stderr
