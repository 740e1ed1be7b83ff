"""`llmasos run`: a one-shot answer equal to the engine's greedy chat reply, piped input, clear refusals of models it
cannot chat with, and a real interactive session in a pseudo-terminal (streamed answer, multi-line input, /bye)."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from support import family_config, make_checkpoint

from llmasos import LLM, SamplingParams
from llmasos.cli.main import cli

REPO_ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny llama whose greedy replies are visible text (seed 0), with the ChatML test template."""
    directory = tmp_path_factory.mktemp("run") / "tiny-llama"
    make_checkpoint(directory, family_config("llama", num_hidden_layers=2, max_position_embeddings=256), seed=0)
    return directory


@pytest.fixture(scope="module")
def llm(checkpoint) -> LLM:
    return LLM.load(checkpoint, dtype="float32")


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def greedy_reply(llm: LLM, messages: list[dict], max_tokens: int = 8) -> str:
    return llm.chat(messages, SamplingParams(max_tokens=max_tokens, temperature=0))[0].text


def test_one_shot_answer(checkpoint, llm):
    result = CliRunner().invoke(cli, ["run", str(checkpoint), "hello", "--max-tokens", "8", "--temperature", "0"])
    assert result.exit_code == 0, result.output
    expected = greedy_reply(llm, [{"role": "user", "content": "hello"}])
    assert expected.strip() and result.output == expected + "\n"


def test_piped_prompt_and_raw_mode(checkpoint, llm):
    piped = CliRunner().invoke(cli, ["run", str(checkpoint), "--max-tokens", "5", "--temperature", "0"],
                               input="hi there\n")
    assert piped.exit_code == 0 and piped.output == greedy_reply(llm, [{"role": "user", "content": "hi there"}],
                                                                 5) + "\n"
    raw = CliRunner().invoke(cli, ["run", str(checkpoint), "To be", "--raw", "--max-tokens", "5", "--temperature",
                                   "0"])
    expected = llm.generate("To be", SamplingParams(max_tokens=5, temperature=0))[0].text
    assert raw.exit_code == 0 and raw.output == expected + "\n"


def test_models_that_cannot_chat_are_refused(tmp_path):
    from encoders_support import make_sentence_transformer, make_t5_checkpoint

    make_sentence_transformer(tmp_path / "encoder")
    make_t5_checkpoint(tmp_path / "t5")
    runner = CliRunner()
    encoder = runner.invoke(cli, ["run", str(tmp_path / "encoder"), "hi"])
    assert encoder.exit_code == 1 and "is an embedding model" in encoder.output
    t5 = runner.invoke(cli, ["run", str(tmp_path / "t5"), "hi"])
    assert t5.exit_code == 1 and "encoder-decoder" in t5.output
    missing = runner.invoke(cli, ["run", str(tmp_path / "nothing"), "hi"])
    assert missing.exit_code == 1 and "not found" in missing.output and "Traceback" not in missing.output


class Terminal:
    """The controlling side of a pseudo-terminal running `llmasos run`."""

    def __init__(self, *args: str) -> None:
        self.master, slave = os.openpty()
        self.process = subprocess.Popen([sys.executable, "-m", "llmasos", "run", *args], stdin=slave, stdout=slave,
                                        stderr=slave, cwd=REPO_ROOT, env=dict(os.environ), start_new_session=True)
        os.close(slave)
        self.seen = ""

    def read_until(self, marker: str, timeout: float = 120.0) -> str:
        """Everything shown up to and including `marker` (ANSI codes removed, CR LF as LF)."""
        deadline = time.monotonic() + timeout
        while marker not in self.seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{marker!r} did not appear; the terminal shows {self.seen!r}")
            ready, _, _ = select.select([self.master], [], [], remaining)
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # EIO: the program exited and closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"the program ended before showing {marker!r}: {self.seen!r}")
                self.seen += ANSI.sub("", chunk.decode("utf-8", "replace")).replace("\r\n", "\n")
        shown, _, self.seen = self.seen.partition(marker)
        return shown + marker

    def type(self, text: str) -> None:
        os.write(self.master, text.replace("\n", "\r").encode())

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)


def test_interactive_chat_in_a_pseudo_terminal(checkpoint, llm):
    terminal = Terminal(str(checkpoint), "--max-tokens", "8", "--temperature", "0")
    try:
        assert "/bye" in terminal.read_until(">>> ")
        terminal.type("hello\n")
        first = greedy_reply(llm, [{"role": "user", "content": "hello"}])
        shown = terminal.read_until(">>> ")
        assert shown.startswith("hello\n") and first in shown
        terminal.type('"""\nline one\nline two"""\n')  # a multi-line message, answered with the history
        shown = terminal.read_until(">>> ")
        assert "... " in shown
        second = greedy_reply(llm, [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                                    {"role": "user", "content": "line one\nline two"}])
        assert second.strip() and second in shown
        terminal.type("/clear\n")
        assert "Cleared" in terminal.read_until(">>> ")
        terminal.type("/bye\n")
        assert terminal.process.wait(timeout=30) == 0
    finally:
        terminal.close()
