"""`llmasos run`: a one-shot answer equal to the engine's greedy chat reply, piped input, clear refusals of models it
cannot chat with, and a real interactive session in a pseudo-terminal (streamed answer, multi-line input, /bye)."""

from __future__ import annotations

import io
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from support import family_config, make_checkpoint

from llmasos import LLM, SamplingParams
from llmasos.cli.main import cli
from llmasos.cli.run_session import Session

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
    result = CliRunner().invoke(cli, ["run", str(checkpoint), "hello", "--max-tokens", "8", "--temperature", "0",
                                      "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    expected = greedy_reply(llm, [{"role": "user", "content": "hello"}])
    assert expected.strip() and result.output == expected + "\n"


def test_piped_prompt_and_raw_mode(checkpoint, llm):
    piped = CliRunner().invoke(cli, ["run", str(checkpoint), "--max-tokens", "5", "--temperature", "0", "--dtype",
                                     "float32"], input="hi there\n")
    assert piped.exit_code == 0 and piped.output == greedy_reply(llm, [{"role": "user", "content": "hi there"}],
                                                                 5) + "\n"
    raw = CliRunner().invoke(cli, ["run", str(checkpoint), "To be", "--raw", "--max-tokens", "5", "--temperature",
                                   "0", "--dtype", "float32"])
    expected = llm.generate("To be", SamplingParams(max_tokens=5, temperature=0))[0].text
    assert raw.exit_code == 0 and raw.output == expected + "\n"


def test_a_system_prompt_that_cannot_be_used_is_said_to_be_unused(checkpoint, llm, capsys):
    """--system with --raw (or a model without a chat template) was dropped without a word."""
    raw = CliRunner().invoke(cli, ["run", str(checkpoint), "To be", "--raw", "--system", "Be brief.",
                                   "--max-tokens", "5", "--temperature", "0", "--dtype", "float32"])
    expected = llm.generate("To be", SamplingParams(max_tokens=5, temperature=0))[0].text
    assert raw.exit_code == 0 and raw.stdout == expected + "\n"
    assert "the system prompt is not used: --raw completes text as it is" in raw.stderr
    chat = CliRunner().invoke(cli, ["run", str(checkpoint), "hello", "--system", "Be brief.", "--max-tokens", "2",
                                    "--dtype", "float32"])
    assert chat.exit_code == 0 and "not used" not in chat.stderr
    session = Session(llm, {}, None, raw=True, out=io.StringIO())
    session.command("/set system Be brief.")
    assert "the system prompt is not used" in capsys.readouterr().err


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
    terminal = Terminal(str(checkpoint), "--max-tokens", "8", "--temperature", "0", "--dtype", "float32")
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
        terminal.type("/set parameter temperature warm\n")
        assert "temperature takes a number" in terminal.read_until(">>> ")
        terminal.type("/show info\n")
        shown = terminal.read_until(">>> ")
        assert "llama" in shown and "float32" in shown and "256" in shown
        terminal.type("/?\n")
        assert "/save NAME" in terminal.read_until(">>> ")
        terminal.type("/bye\n")
        assert terminal.process.wait(timeout=30) == 0
    finally:
        terminal.close()


# -- the conversation: window, answer length, slash commands --------------------------------------------------------

SYSTEM = "You are a terse test bot."


def session_for(llm: LLM, **sampling) -> Session:
    return Session(llm, sampling, None, raw=False, out=io.StringIO(), dtype="float32", device="cpu")


def imported(checkpoint, name: str = "tiny") -> str:
    from llmasos.library.importer import import_directory

    import_directory(checkpoint, name)
    return name


def test_a_conversation_longer_than_the_context_drops_its_oldest_turns(llm, capsys):
    session = Session(llm, {"max_tokens": 8, "temperature": 0}, SYSTEM, raw=False, out=io.StringIO())
    context = llm.engine.max_model_len
    assert context == 256
    filler = "the quick brown fox jumps over the lazy dog " * 3
    notices = []
    for turn in range(12):
        session.ask(f"turn {turn}: {filler}")
        assert session.last_params.max_tokens == 8  # every turn is answered with its full length
        assert len(session.last_prompt_ids) + 8 <= context
        notices += [line for line in capsys.readouterr().err.splitlines() if "dropped" in line]
    assert "(dropped the 2 oldest messages to fit the 256-token context)" in notices
    prompt = llm.tokenizer.decode(session.last_prompt_ids)
    assert SYSTEM in prompt and "turn 11:" in prompt and "turn 0:" not in prompt
    assert session.messages[0]["role"] == "user" and len(session.messages) < 24  # whole exchanges were dropped


def test_a_message_that_cannot_fit_is_refused_and_the_session_goes_on(llm):
    session = session_for(llm, max_tokens=4, temperature=0)
    session.ask("hello")
    before = list(session.messages)
    with pytest.raises(ValueError, match="does not fit the model's 256-token context"):
        session.ask("the quick brown fox " * 200)
    assert session.messages == before  # nothing was dropped for a message that could not be answered
    session.ask("hello again")
    assert len(session.messages) == 4


def test_the_default_answer_length_is_512_capped_by_the_context_or_the_modelfile(checkpoint, llm, tmp_path):
    session = session_for(llm, temperature=0)
    assert session.default_max_tokens() == 512
    session.ask("the quick brown fox " * 24)  # ~ 200 prompt tokens: the answer gets the room that is left
    assert session.last_params.max_tokens == llm.engine.max_model_len - len(session.last_prompt_ids) < 512
    from llmasos.library.modelfile import create_model

    create_model("short", f"FROM {imported(checkpoint)}\nPARAMETER num_predict 6\n")
    with LLM.load("short", dtype="float32") as short:
        session = session_for(short, temperature=0)
        assert session.default_max_tokens() == 6
        session.ask("hello")
        assert session.last_params.max_tokens == 6
        session.command("/set parameter max_tokens 3")  # the user's value wins over the Modelfile's
        session.ask("hello")
        assert session.last_params.max_tokens == 3


def test_set_changes_the_next_answer_and_bad_values_are_refused(llm, capsys):
    session = session_for(llm, max_tokens=4)
    for command in ("/set parameter temperature 0.5", "/set parameter top_k 7", "/set parameter num_predict 5",
                    "/set parameter seed 3", "/set parameter repeat_penalty 1.2", '/set parameter stop "a b" c',
                    "/set system Speak like a pirate."):
        assert session.command(command)
    session.ask("hello")
    params = session.last_params
    assert (params.temperature, params.top_k, params.max_tokens, params.seed, params.repetition_penalty) == \
        (0.5, 7, 5, 3, 1.2)
    assert params.stop_strings == ["a b", "c"]
    assert "Speak like a pirate." in llm.tokenizer.decode(session.last_prompt_ids)
    capsys.readouterr()
    before = dict(session.sampling)
    for command, message in (("/set parameter temperature hot", "temperature takes a number"),
                             ("/set parameter top_p 2", "top_p must be in (0, 1]"),
                             ("/set parameter max_tokens 0", "max_tokens must be at least 1"),
                             ("/set parameter beam_width 4", "unknown parameter 'beam_width'"),
                             ("/set parameter seed", "seed needs a value"),
                             ("/set colour blue", "usage: /set parameter NAME VALUE")):
        session.command(command)
        assert message in capsys.readouterr().err, command
    assert session.sampling == before


def test_show_prints_the_model_its_parameters_system_and_template(llm, capsys):
    session = session_for(llm, temperature=0)
    session.command("/set system Be brief.")
    session.command("/show info")
    info = capsys.readouterr().out
    for expected in ("tiny-llama", "llama", "256", "float32", "cpu", "none"):
        assert expected in info
    session.command("/show parameters")
    assert "temperature" in capsys.readouterr().out
    session.command("/show system")
    assert "Be brief." in capsys.readouterr().out
    session.command("/show template")
    assert "im_start" in capsys.readouterr().out
    session.command("/show nothing")
    assert "usage: /show" in capsys.readouterr().err


def test_load_switches_models_and_a_bad_name_keeps_the_current_one(checkpoint, capsys):
    first = LLM.load(checkpoint, dtype="float32")
    session = session_for(first, max_tokens=3, temperature=0)
    session.ask("hello")
    session.command("/load no-such-model")
    assert "no model named 'no-such-model'" in capsys.readouterr().err and session.llm is first
    session.command(f"/load {imported(checkpoint)}")
    assert session.llm is not first and session.llm.spec.name == "tiny" and session.messages == []
    assert session.llm.dtype == torch.float32  # loaded as the session's model was
    assert session.ask("hello") is not None
    session.llm.close()


def test_save_creates_a_library_model_with_the_system_prompt_and_parameters(checkpoint, llm, capsys):
    session = session_for(llm)
    session.command("/save mine")
    assert "/save needs a library model" in capsys.readouterr().err  # a directory is imported first
    with LLM.load(imported(checkpoint), dtype="float32") as tiny:
        session = session_for(tiny)
        for command in ("/set system You are a pirate.", "/set parameter temperature 0.3",
                        "/set parameter num_predict 7", "/save Bad Name!"):
            session.command(command)
        assert "error" in capsys.readouterr().err
        session.command("/save pirate")
        assert "Created new model 'pirate'" in capsys.readouterr().out
    from llmasos.spec import resolve_spec

    spec = resolve_spec("pirate")
    assert spec.system == "You are a pirate." and spec.sampling_defaults() == {"temperature": 0.3, "max_tokens": 7}
    shown = CliRunner().invoke(cli, ["show", "pirate", "--modelfile"])
    assert shown.exit_code == 0 and "You are a pirate." in shown.output and "temperature 0.3" in shown.output
