"""`llmasos run MODEL [PROMPT]`: a one-shot answer, or an interactive terminal chat when no prompt is given (tokens
streamed as they are generated, multi-line input between triple quotes, slash commands), like `ollama run`. The
conversation itself lives in llmasos.cli.run_session."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from llmasos.cli.run_session import DEFAULT_MAX_TOKENS, Session

if TYPE_CHECKING:
    from llmasos.llm import LLM
    from llmasos.spec import ModelSpec


def read_message(prompt: str = ">>> ", continuation: str = "... ") -> str:
    """One message from the terminal: a line, or the lines between an opening and a closing triple quote."""
    line = input(prompt)
    stripped = line.lstrip()
    if not stripped.startswith('"""'):
        return line
    body = stripped[3:]
    if body.rstrip().endswith('"""'):  # opened and closed on the same line
        return body.rstrip()[:-3]
    lines = [body]
    while True:
        line = input(continuation)
        if line.rstrip().endswith('"""'):
            lines.append(line.rstrip()[:-3])
            return "\n".join(lines).strip("\n")
        lines.append(line)


def interactive(session: Session) -> None:
    try:
        import readline  # noqa: F401 - gives input() line editing and history
    except ImportError:
        pass
    click.echo('Send a message (/? for help, /bye to leave, """ for several lines)')
    while True:
        try:
            message = read_message()
        except EOFError:
            click.echo()
            return
        except KeyboardInterrupt:
            click.echo("\nUse Ctrl + d or /bye to exit.")
            continue
        text = message.strip()
        if not text:
            continue
        if text.startswith("/") and "\n" not in text:
            if not session.command(text):
                return
            continue
        try:
            session.ask(message)
        except ValueError as exc:
            click.echo(f"error: {exc}", err=True)
            continue
        click.echo("\n")


def _check_generating_model(spec: ModelSpec) -> None:
    """Refuse encoders (and T5, which the engine does not run) with a message naming what to use instead."""
    if spec.kind == "encoder":
        raise ValueError(f"{spec.name} is an embedding model and cannot chat; use it with pipeline('embeddings') or "
                         "`llmasos serve` (POST /v1/embeddings)")
    if spec.kind != "decoder":
        raise ValueError(f"{spec.name} is an encoder-decoder model; `llmasos run` runs decoder-only models. Use "
                         "pipeline('text2text-generation' / 'translation' / 'summarization') for it")


def load_generating_model(model: str, dtype: str, device: str) -> LLM:
    """Resolve `model` once, refuse models that cannot chat, and load it (`run` and its /load)."""
    from llmasos.llm import LLM
    from llmasos.spec import resolve_spec

    spec = resolve_spec(model, dtype=dtype, device=device)  # once: the kind check and the loaded model share it
    _check_generating_model(spec)
    return LLM.load(spec)


@click.command()
@click.argument("model")
@click.argument("prompt", nargs=-1)
@click.option("--system", default=None, help="System prompt (replaces the model's own).")
@click.option("--max-tokens", default=None, type=click.IntRange(min=1),
              help=f"Longest answer, in tokens [default: the model's max_tokens, else {DEFAULT_MAX_TOKENS}; at most "
                   "the room left in the context].")
@click.option("--temperature", default=None, type=click.FloatRange(0, 100),
              help="Sampling temperature; 0 is greedy [default: the model's].")
@click.option("--seed", default=None, type=int)
@click.option("--raw", is_flag=True, help="Ignore the chat template: complete the text as it is.")
@click.option("--dtype", default="auto", show_default=True,
              help="float32, bfloat16, float16; auto: the checkpoint's, float32 ones in bfloat16 where supported.")
@click.option("--device", default="auto", show_default=True,
              help="cpu, cuda, cuda:1, ...; auto: a CUDA GPU when there is one, else the CPU.")
def run(model: str, prompt: tuple[str, ...], system: str | None, max_tokens: int | None, temperature: float | None,
        seed: int | None, raw: bool, dtype: str, device: str) -> None:
    """Answer PROMPT with MODEL, or chat in the terminal when no PROMPT is given.

    MODEL is a library name or a checkpoint directory. Without PROMPT and with piped input, the input is the
    prompt."""
    text = " ".join(prompt)
    if not text and not sys.stdin.isatty():
        text = sys.stdin.read().strip()
        if not text:
            raise click.UsageError("no prompt: give PROMPT, pipe one in, or run in a terminal to chat")
    llm = load_generating_model(model, dtype, device)
    sampling = {key: value for key, value in (("max_tokens", max_tokens), ("temperature", temperature),
                                              ("seed", seed)) if value is not None}
    session = Session(llm, sampling, system, raw, dtype=dtype, device=device)
    session.warn_if_system_unused()
    if text:
        session.ask(text)
        click.echo()
    else:
        interactive(session)


def register(cli: click.Group) -> None:
    cli.add_command(run)
