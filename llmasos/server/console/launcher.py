"""Training runs started from the console: the uploaded JSONL is written under LLMASOS_HOME/uploads (size-limited,
named by the server), and `llmasos train` runs as a child process writing into the runs directory, so a run started
here is the same as one started from the CLI (the page shows that command). Cancel stops the child."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

MAX_UPLOAD_BYTES = 2 << 20  # below the server's 4 MiB body limit, with room for the JSON around it
MAX_RUNNING = 2
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
LOG_FILE = "console.log"


@dataclass
class LaunchedRun:
    name: str
    process: subprocess.Popen
    command: list[str]
    cancelled: bool = False

    def status(self) -> str:
        code = self.process.poll()
        if code is None:
            return "running"
        if self.cancelled:
            return "cancelled"
        return "finished" if code == 0 else f"failed (exit status {code})"


def cli_command(model: str, data: Path, output: Path, method: str, max_steps: int | None,
                learning_rate: float | None) -> list[str]:
    command = ["llmasos", "train", "--model", model, "--data", str(data), "--output", str(output), "--method", method]
    if max_steps is not None:
        command += ["--max-steps", str(max_steps)]
    if learning_rate is not None:
        command += ["--learning-rate", repr(learning_rate)]
    return command


def check_jsonl(text: str) -> int:
    """The number of records in an uploaded JSONL file; a ValueError names the first bad line."""
    if len(text.encode("utf-8")) > MAX_UPLOAD_BYTES:
        raise ValueError(f"the training data is larger than {MAX_UPLOAD_BYTES >> 20} MiB; train from the CLI")
    count = 0
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise ValueError(f"line {number} of the training data is not JSON") from None
        if not isinstance(record, dict):
            raise ValueError(f"line {number} of the training data is not a JSON object")
        count += 1
    if not count:
        raise ValueError("the training data has no records")
    return count


class Launcher:
    """The runs this server started (by name); the child processes end with their run or on cancel."""

    def __init__(self) -> None:
        self.runs: dict[str, LaunchedRun] = {}
        self._lock = threading.Lock()

    def start(self, home: Path, runs_root: Path, name: str, model: str, method: str, data_text: str,
              max_steps: int | None, learning_rate: float | None) -> LaunchedRun:
        """Blocking (writes files, starts a process)."""
        if not RUN_NAME.match(name):
            raise ValueError(f"run name {name!r} is invalid: use 1-64 letters, digits, '.', '_' or '-'")
        if method not in ("lora", "full"):
            raise ValueError(f"method must be 'lora' or 'full', not {method!r}")
        check_jsonl(data_text)
        output = runs_root / name
        with self._lock:
            if sum(run.process.poll() is None for run in self.runs.values()) >= MAX_RUNNING:
                raise ValueError(f"{MAX_RUNNING} runs are going already; wait for one or cancel it")
            if output.exists() or name in self.runs:
                raise ValueError(f"a run named {name!r} exists already in {runs_root}; pick another name")
            uploads = home / "uploads"
            uploads.mkdir(parents=True, exist_ok=True)
            data = uploads / f"{name}.jsonl"  # named by the server: nothing the client sends picks a path
            data.write_text(data_text, encoding="utf-8")
            output.mkdir(parents=True)
            command = cli_command(model, data, output, method, max_steps, learning_rate)
            log = (output / LOG_FILE).open("wb")
            process = subprocess.Popen([sys.executable, "-m", "llmasos", *command[1:]], stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=dict(os.environ),
                                       start_new_session=True)
            log.close()
            run = LaunchedRun(name, process, command)
            self.runs[name] = run
        return run

    def cancel(self, name: str) -> LaunchedRun:
        run = self.runs.get(name)
        if run is None:
            raise KeyError(name)
        if run.process.poll() is None:
            run.cancelled = True
            os.killpg(run.process.pid, signal.SIGTERM)  # its own session: the trainer and any workers it started
        return run

    def close(self) -> None:
        for run in self.runs.values():
            if run.process.poll() is None:
                os.killpg(run.process.pid, signal.SIGTERM)


def shell_line(command: list[str]) -> str:
    return " ".join(shlex.quote(part) for part in command)
