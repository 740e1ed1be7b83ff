"""`llmasos pull` against the local Hub stand-in: the real huggingface_hub download code, over real HTTP.

Covers: catalog and repo-id parsing, progress, resume of an interrupted transfer (within a pull and across pulls),
checksum mismatch (LFS sha256 and git blob id), gated / missing repo / missing revision, offline mode, no network,
concurrent pulls of one model, and an update to a new commit that keeps derived models working."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from library.conftest import RESUME_CHUNK, tree
from llmasos import LLM, SamplingParams
from llmasos.errors import LibraryError
from llmasos.library.pull import PullSpec, parse_spec

REPO = "Org/Tiny-Model"


@pytest.fixture
def hub_env(hub, monkeypatch, home):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    return {"HF_ENDPOINT": hub.url}


def _stored(cli, name: str) -> dict:
    result = cli("show", name, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _assert_same_files(stored: dict, directory) -> None:
    for entry in stored["files"]:
        assert entry["sha256"] == hashlib.sha256((directory / entry["path"]).read_bytes()).hexdigest(), entry["path"]


def _assert_nothing_installed(cli, home) -> None:
    assert json.loads(cli("list", "--json").stdout) == []
    assert tree(home / "models" / "checkpoints") == {}


def test_parse_spec():
    qwen = PullSpec("Qwen/Qwen2.5-0.5B-Instruct", "main", "qwen2.5:0.5b-instruct")
    assert parse_spec("qwen2.5:0.5b-instruct") == qwen
    assert parse_spec("Qwen/Qwen3-0.6B") == PullSpec("Qwen/Qwen3-0.6B", "main", "qwen3:0.6b")  # a catalog repo
    assert parse_spec("Org/Some-Model:v2") == PullSpec("Org/Some-Model", "v2", "some-model:v2")
    assert parse_spec("Org/Some-Model", name="mine") == PullSpec("Org/Some-Model", "main", "mine")
    assert parse_spec("gpt2") == PullSpec("openai-community/gpt2", "main", "gpt2")
    assert parse_spec("smollm2:135m-instruct:abc123").revision == "abc123"
    with pytest.raises(LibraryError, match="not in the catalog"):
        parse_spec("no-such-model")
    with pytest.raises(LibraryError, match="not a Hub repo id"):
        parse_spec("a/b/c")
    with pytest.raises(LibraryError, match="revision"):
        parse_spec("org/repo:../../x")


def test_pull_installs_verified_files_with_progress(cli_process, cli, hub, hub_env, home, checkpoint):
    hub.add_repo(REPO, checkpoint, license="apache-2.0")
    result = cli_process("pull", REPO, env=hub_env)
    assert result.returncode == 0, result.stderr
    assert "pulled tiny-model" in result.stdout
    size = (checkpoint / "model.safetensors").stat().st_size
    assert "model.safetensors" in result.stderr and f"{size / 1000:.1f}/{size / 1000:.1f} kB" in result.stderr
    stored = _stored(cli, "tiny-model")
    assert stored["source"]["repo"] == REPO and stored["source"]["commit"] == hub.repos[REPO].commit
    assert stored["license"] == "apache-2.0"
    _assert_same_files(stored, checkpoint)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    assert (LLM.load("tiny-model").generate("To be", params)[0].token_ids
            == LLM.load(checkpoint).generate("To be", params)[0].token_ids)
    assert tree(home / "models" / ".downloads") == {}  # nothing left aside
    again = cli("pull", REPO)
    assert again.exit_code == 0 and "up to date" in again.stdout
    assert len(hub.gets("model.safetensors")) == 1


def test_only_runtime_files_are_downloaded(cli, hub, hub_env, checkpoint):
    extra = {"pytorch_model.bin": b"pickle", "onnx/model.onnx": b"onnx", "README.md": b"# card",
             "../escape.safetensors": b"x", "additional_chat_templates/tool_use.jinja": b"{{ messages }}"}
    hub.add_repo(REPO, checkpoint, files=extra)
    result = cli("pull", REPO, "--quiet")
    assert result.exit_code == 0, result.output
    fetched = {path.rsplit("/resolve/", 1)[1].split("/", 1)[1] for _, path, _ in hub.requests if "/resolve/" in path}
    assert fetched == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                       "tokenizer_config.json", "chat_template.jinja", "additional_chat_templates/tool_use.jinja"}


@pytest.mark.slow
def test_interrupted_transfer_resumes_with_range(cli, hub, hub_env, large_checkpoint):
    hub.add_repo(REPO, large_checkpoint)
    hub.faults.cut_after["model.safetensors"] = RESUME_CHUNK + 500_000
    result = cli("pull", REPO)
    assert result.exit_code == 0, result.output
    ranges = [r for _, _, r in hub.gets("model.safetensors")]
    assert ranges == [None, f"bytes={RESUME_CHUNK}-"]  # the second request continued where the first was cut
    _assert_same_files(_stored(cli, "tiny-model"), large_checkpoint)


@pytest.mark.slow
def test_failed_pull_resumes_in_the_next_process(cli_process, cli, hub, hub_env, home, large_checkpoint):
    hub.add_repo(REPO, large_checkpoint)
    hub.faults.cut_after["model.safetensors"] = RESUME_CHUNK + 500_000
    hub.faults.unavailable_after_cut["model.safetensors"] = 1  # the in-pull retry gets a 503 and the pull fails
    first = cli_process("pull", REPO, env=hub_env)
    assert first.returncode == 1
    last_line = first.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: the Hub answered 503") and "run the same pull again" in last_line
    assert "Traceback" not in first.stderr
    _assert_nothing_installed(cli, home)
    assert sorted(tree(home / "models" / ".downloads").values())[-1] == RESUME_CHUNK  # the part kept for resume

    second = cli_process("pull", REPO, env=hub_env)
    assert second.returncode == 0, second.stderr
    assert hub.gets("model.safetensors")[-1][2] == f"bytes={RESUME_CHUNK}-"
    _assert_same_files(_stored(cli, "tiny-model"), large_checkpoint)


@pytest.mark.parametrize("corrupt", ["model.safetensors", "config.json"])
def test_checksum_mismatch_rejected(cli, hub, hub_env, home, checkpoint, corrupt):
    hub.add_repo(REPO, checkpoint)
    hub.faults.corrupt.add(corrupt)
    result = cli("pull", REPO, "--quiet")
    assert result.exit_code == 1
    kind = "sha256" if corrupt.endswith(".safetensors") else "git blob id"
    assert f"error: checksum mismatch for {corrupt}" in result.stderr and kind in result.stderr
    _assert_nothing_installed(cli, home)
    assert not any(name.endswith(".part") and size == (checkpoint / corrupt).stat().st_size
                   for name, size in tree(home / "models" / ".downloads").items())  # the bad bytes were discarded
    hub.faults.corrupt.clear()
    assert cli("pull", REPO, "--quiet").exit_code == 0  # and a clean retry succeeds


@pytest.mark.parametrize("claim", [{"sha256": "../../../../outside"}, {"sha256": "A" * 64}, {"size": -5},
                                   {"sha256": "/etc/passwd"}])
def test_hostile_hub_metadata_refused(cli, hub, hub_env, home, workdir, checkpoint, claim):
    hub.add_repo(REPO, checkpoint, lfs_overrides={"model.safetensors": claim})
    before = {k: v for k, v in tree(workdir).items() if not k.startswith("home/")}
    line = _one_error_line(cli("pull", REPO))
    assert "no valid checksum or size" in line and "model.safetensors" in line
    assert {k: v for k, v in tree(workdir).items() if not k.startswith("home/")} == before
    assert not [path for _, path, _ in hub.requests if "/resolve/" in path]  # refused before any file was fetched
    _assert_nothing_installed(cli, home)


def test_short_transfer_detected_then_resumed(cli, hub, hub_env, home, checkpoint):
    hub.add_repo(REPO, checkpoint)
    hub.faults.short.add("model.safetensors")  # the server ends the body early but consistently with its headers
    size = (checkpoint / "model.safetensors").stat().st_size
    line = _one_error_line(cli("pull", REPO, "--quiet"))
    assert f"the download of model.safetensors ended early or ran long ({size // 2} of {size} bytes)" in line
    _assert_nothing_installed(cli, home)
    hub.faults.short.clear()
    assert cli("pull", REPO, "--quiet").exit_code == 0
    assert hub.gets("model.safetensors")[-1][2] == f"bytes={size // 2}-"
    _assert_same_files(_stored(cli, "tiny-model"), checkpoint)


def _one_error_line(result) -> str:
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_gated_repo(cli, hub, hub_env, home, checkpoint):
    hub.add_repo("meta-llama/Gated", checkpoint, gated=True)
    line = _one_error_line(cli("pull", "meta-llama/Gated"))
    assert "is gated" in line and "https://huggingface.co/meta-llama/Gated" in line and "HF_TOKEN" in line
    _assert_nothing_installed(cli, home)


def test_gated_repo_with_a_token_that_was_not_granted(cli, hub, hub_env, home, checkpoint, monkeypatch):
    hub.add_repo("meta-llama/Gated", checkpoint, gated=True, accepted_tokens={"hf_granted"})
    monkeypatch.setenv("HF_TOKEN", "hf_not_granted")
    line = _one_error_line(cli("pull", "meta-llama/Gated"))  # the Hub answers 403 GatedRepo on the first file
    assert "is gated" in line and "accept its license" in line
    _assert_nothing_installed(cli, home)
    monkeypatch.setenv("HF_TOKEN", "hf_granted")
    assert cli("pull", "meta-llama/Gated", "--quiet").exit_code == 0


def test_missing_repo_and_revision(cli, hub, hub_env, home, checkpoint):
    hub.add_repo(REPO, checkpoint)
    line = _one_error_line(cli("pull", "Org/Nope"))
    assert "Org/Nope was not found on the Hub" in line and "hf auth login" in line
    line = _one_error_line(cli("pull", f"{REPO}:no-such-branch"))
    assert "has no revision 'no-such-branch'" in line
    _assert_nothing_installed(cli, home)


def test_offline_mode(cli_process, cli, hub, hub_env, home):
    result = cli_process("pull", "qwen2.5:0.5b-instruct", env={**hub_env, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: cannot pull Qwen/Qwen2.5-0.5B-Instruct: offline mode is on (HF_HUB_OFFLINE). Unset HF_HUB_OFFLINE to "
        "download, or import a local copy with `llmasos import DIR --name NAME`"]
    assert hub.requests == []


def test_no_network(cli, home, monkeypatch):
    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    line = _one_error_line(cli("pull", REPO))
    assert line.startswith(f"error: cannot reach the Hub at http://127.0.0.1:{port}") and "network" in line
    _assert_nothing_installed(cli, home)


def test_not_a_model_repo(cli, hub, hub_env, home, checkpoint):
    hub.add_repo("Org/Pickles", files={"config.json": (checkpoint / "config.json").read_bytes(),
                                       "tokenizer.json": b"{}", "pytorch_model.bin": b"x"})
    line = _one_error_line(cli("pull", "Org/Pickles"))
    assert "no safetensors weights" in line and "pickle" in line
    mamba = {**json.loads((checkpoint / "config.json").read_text()), "model_type": "mamba"}
    hub.add_repo("Org/Mamba", files={"config.json": json.dumps(mamba).encode(),
                                     "tokenizer.json": b"{}", "model.safetensors": b"x" * 16})
    line = _one_error_line(cli("pull", "Org/Mamba"))
    assert "'mamba' is not supported" in line
    assert not hub.gets("model.safetensors")  # refused before the weights were fetched


@pytest.mark.slow
def test_concurrent_pulls_of_one_model(hub, hub_env, home, checkpoint, cli):
    """Three pulls at once: two of one name, one of the same repo under another name. None corrupts another."""
    hub.add_repo(REPO, checkpoint)
    hub.faults.delay["model.safetensors"] = 2.0  # long enough that the later pulls start while the first runs
    full_env = {**os.environ, **hub_env}
    commands = [[sys.executable, "-m", "llmasos", "pull", REPO, *extra] for extra in ([], [], ["--name", "other"])]
    results: dict[int, subprocess.CompletedProcess] = {}

    def run(index: int) -> None:
        results[index] = subprocess.run(commands[index], capture_output=True, text=True, env=full_env, timeout=120)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[i].returncode for i in range(3)] == [0, 0, 0], [r.stderr for r in results.values()]
    same_name = sorted(results[i].stdout.split()[0] for i in range(2))
    assert same_name == ["pulled", "tiny-model"]  # one pulled it; the other found it up to date
    assert results[2].stdout.startswith("pulled other")
    assert any("waiting for another pull" in r.stderr for r in results.values())
    assert len(hub.gets("model.safetensors")) == 2
    assert len(list((home / "models" / "checkpoints").iterdir())) == 2
    for name in ("tiny-model", "other"):
        _assert_same_files(_stored(cli, name), checkpoint)


def test_update_to_new_commit_keeps_derived_models(cli, hub, hub_env, home, checkpoint, large_checkpoint, workdir):
    hub.add_repo(REPO, checkpoint)
    assert cli("pull", REPO, "--quiet").exit_code == 0
    old = _stored(cli, "tiny-model")
    modelfile = workdir / "Modelfile"
    modelfile.write_text("FROM tiny-model\nSYSTEM hi\n")
    assert cli("create", "tiny-chat", "-f", str(modelfile)).exit_code == 0

    hub.add_repo(REPO, large_checkpoint)  # a new commit on main
    result = cli("pull", REPO, "--quiet")
    assert result.exit_code == 0 and result.stdout.startswith("updated tiny-model")
    new = _stored(cli, "tiny-model")
    assert new["source"]["commit"] != old["source"]["commit"] and new["path"] != old["path"]
    _assert_same_files(new, large_checkpoint)
    assert _stored(cli, "tiny-chat")["path"] == old["path"]  # the derived model keeps the files it was made from
    LLM.load("tiny-chat")
    assert cli("rm", "tiny-chat").exit_code == 0
    assert cli("rm", "tiny-model").exit_code == 0
    assert tree(home / "models" / "checkpoints") == {}


def test_name_taken_by_another_model(cli, hub, hub_env, checkpoint):
    hub.add_repo(REPO, checkpoint)
    assert cli("import", str(checkpoint), "--name", "tiny-model").exit_code == 0
    line = _one_error_line(cli("pull", REPO))
    assert "already exists" in line and "--name" in line
    assert cli("pull", REPO, "--name", "tiny-hub", "--quiet").exit_code == 0
