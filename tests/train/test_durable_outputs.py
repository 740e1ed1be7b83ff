"""Nothing written is ever half-written (issue 19): a model export built aside and renamed into place (a kill -9 or
a full disk during it leaves the previous output intact), no half-written checkpoint on a full disk, metrics.jsonl
trimmed to the step a run resumes from, and one `error:` line from the CLI on a full disk."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmasos import LLM
from llmasos.cli.main import cli
from llmasos.files import atomic_directory
from llmasos.train import LLMTrainer
from llmasos.train.reporting import METRICS_FILE, Reporter

REPO_ROOT = Path(__file__).resolve().parents[2]
TEXTS = [{"text": f"line {i} of a small corpus to train on"} for i in range(16)]


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture
def small_disk(tmp_path, request):
    """A small tmpfs (3 MB, or the size the test's `disk_size` mark gives), as root; skipped where mounting is
    impossible."""
    mark = request.node.get_closest_marker("disk_size")
    size = mark.args[0] if mark else "3m"
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_kill_during_export_leaves_the_previous_output_intact(tiny_llama, tmp_path):
    out = tmp_path / "final"
    LLMTrainer.from_pretrained(tiny_llama).save_pretrained(out)
    before = digest(out)
    # A second export that dies (SIGKILL) right after writing its weights, before config.json.
    script = textwrap.dedent(f"""
        import os, signal
        import llmasos.train.save as save
        from llmasos.train import LLMTrainer
        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        save.write_json = die
        LLMTrainer.from_pretrained({str(tiny_llama)!r}, dtype="bfloat16").save_pretrained({str(out)!r},
                                                                                       dtype="bfloat16")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True)
    assert result.returncode == -9, result.stderr.decode()
    assert digest(out) == before  # untouched, and loadable
    LLM.load(out).close()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-final-")]
    assert leftovers  # the dead process's half-written directory, beside it ...
    LLMTrainer.from_pretrained(tiny_llama).save_pretrained(out, dtype="bfloat16")  # ... is cleared by the next save
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-final-")]
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_export_refuses_to_replace_a_directory_that_is_not_a_model(tiny_llama, tmp_path):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.txt").write_text("do not delete")
    with pytest.raises(FileExistsError, match="not a model directory"):
        LLMTrainer.from_pretrained(tiny_llama).save_pretrained(precious)
    assert (precious / "thesis.txt").read_text() == "do not delete"


def test_a_failed_block_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out") as staged:
            (staged / "config.json").write_text("{}")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_metrics_are_trimmed_to_the_step_a_run_resumes_from(tmp_path):
    lines = [{"step": step, "loss": 1.0 / step} for step in range(1, 9)]
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 9, "lo')
    reporter = Reporter(tmp_path, total_steps=16, start_step=4, enabled=True, progress_bar=False)
    reporter.log({"step": 5, "loss": 0.5})
    reporter.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_resumed_run_has_each_step_once_in_metrics(tiny_llama, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in TEXTS))
    common = ["train", "--model", str(tiny_llama), "--data", str(data), "--output", str(tmp_path / "run"),
              "--batch-size", "2", "--save-steps", "2", "--max-steps", "6"]
    assert CliRunner().invoke(cli, common).exit_code == 0
    result = CliRunner().invoke(cli, [*common, "--resume", str(tmp_path / "run" / "checkpoint-2")])
    assert result.exit_code == 0, result.output
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(set(steps)) and steps[-1] == 6


@pytest.mark.disk_size("300k")  # the weights of the first checkpoint fit, its optimizer state does not
def test_train_on_a_full_disk_is_one_error_line_and_leaves_no_temporary_checkpoint(tiny_llama, tmp_path,
                                                                                  small_disk):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in TEXTS))
    result = subprocess.run([sys.executable, "-m", "llmasos", "train", "--model", str(tiny_llama), "--data",
                             str(data), "--output", str(small_disk / "run"), "--batch-size", "2", "--save-steps",
                             "1", "--max-steps", "2"], cwd=REPO_ROOT, capture_output=True, text=True,
                            env={**os.environ, "LLMASOS_HOME": str(tmp_path / "home")}, timeout=300)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "disk" in errors[0], errors
    leftovers = [p.name for p in (small_disk / "run").iterdir() if p.name.startswith(".tmp")] \
        if (small_disk / "run").exists() else []
    assert leftovers == []


def test_keys_create_on_a_full_disk_is_one_error_line(tmp_path, small_disk):
    home = small_disk / "home"
    env = {**os.environ, "LLMASOS_HOME": str(home)}
    ok = subprocess.run([sys.executable, "-m", "llmasos", "keys", "list"], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    filler = small_disk / "filler"
    with filler.open("wb") as handle:  # fill what is left
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    result = subprocess.run([sys.executable, "-m", "llmasos", "keys", "create", "--name", "x" * 60], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and ("full" in errors[0] or "disk" in errors[0]), result.stderr
