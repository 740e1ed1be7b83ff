"""`llmasos run MODEL [PROMPT]`: a one-shot answer, or an interactive terminal chat when no prompt is given (tokens
streamed as they are generated, multi-line input between triple quotes, /bye to leave), like `ollama run`."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from llmasos.spec import ModelSpec

HELP = '''Available commands:
  /bye       leave
  /clear     forget the conversation so far
  /? /help   this help
Start and end a message with """ to write several lines.'''


class Session:
    """A conversation with one loaded model; answers stream to `out` as they are generated. The model's system
    prompt and defaults come from the spec it was loaded from (`llm.spec`)."""

    def __init__(self, llm: Any, sampling: dict[str, Any], system: str | None, raw: bool, out=None) -> None:
        self.llm, self.sampling, self.system, self.out = llm, sampling, system, out or sys.stdout
        self.chat = not raw and llm.tokenizer.chat_template is not None
        self.messages: list[dict[str, str]] = []

    def _prompt_ids(self, text: str) -> list[int]:
        if not self.chat:
            return self.llm.tokenizer.encode(text)
        from llmasos.library import with_system_prompt

        messages = with_system_prompt([*self.messages, {"role": "user", "content": text}],
                                      self.system or self.llm.spec.system)
        return self.llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)

    def ask(self, text: str) -> str:
        """Stream the answer to `text`; in chat mode the exchange joins the conversation. Ctrl-C stops the answer."""
        ids = self._prompt_ids(text)
        room = self.llm.engine.max_model_len - len(ids)
        if room <= 0:
            raise ValueError(f"the conversation ({len(ids)} tokens) fills the model's context of "
                             f"{self.llm.engine.max_model_len} tokens; /clear starts a new one")
        params = self.llm.default_sampling(**self.sampling)
        # Without a max_tokens of the user's or the model's, an answer may run to the end of the context.
        wanted = self.sampling.get("max_tokens") or self.llm.spec.sampling_defaults().get("max_tokens") or room
        params.max_tokens = min(wanted, room)
        params.min_tokens = min(params.min_tokens, params.max_tokens)
        answer = self._stream(ids, params)
        if self.chat:
            self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer

    def _stream(self, ids: list[int], params) -> str:
        engine = self.llm.engine
        request_id = engine.add_request(ids, params)
        pieces: list[str] = []
        try:
            while request_id in engine.groups:
                for group in engine.step():
                    if group.request_id != request_id:
                        continue
                    delta = group.output(delta=True).outputs[0].text
                    if delta:
                        pieces.append(delta)
                        self.out.write(delta)
                        self.out.flush()
                    if group.finished:
                        return "".join(pieces)
        except KeyboardInterrupt:
            engine.abort(request_id)
        return "".join(pieces)


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
            command = text.split()[0]
            if command == "/bye":
                return
            if command == "/clear":
                session.messages.clear()
                click.echo("Cleared the conversation.")
            elif command in ("/?", "/help"):
                click.echo(HELP)
            else:
                click.echo(f"Unknown command {command!r}. Type /? for help")
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


@click.command()
@click.argument("model")
@click.argument("prompt", nargs=-1)
@click.option("--system", default=None, help="System prompt (replaces the model's own).")
@click.option("--max-tokens", default=None, type=click.IntRange(min=1),
              help="Longest answer, in tokens [default: until the model stops or its context is full].")
@click.option("--temperature", default=None, type=click.FloatRange(0, 100),
              help="Sampling temperature; 0 is greedy [default: the model's].")
@click.option("--seed", default=None, type=int)
@click.option("--raw", is_flag=True, help="Ignore the chat template: complete the text as it is.")
@click.option("--dtype", default="auto", show_default=True)
@click.option("--device", default="cpu", show_default=True)
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
    from llmasos.llm import LLM
    from llmasos.spec import resolve_spec

    spec = resolve_spec(model, dtype=dtype, device=device)  # once: the kind check and the loaded model share it
    _check_generating_model(spec)
    llm = LLM.load(spec)
    sampling = {key: value for key, value in (("max_tokens", max_tokens), ("temperature", temperature),
                                              ("seed", seed)) if value is not None}
    session = Session(llm, sampling, system, raw)
    if text:
        session.ask(text)
        click.echo()
    else:
        interactive(session)


def register(cli: click.Group) -> None:
    cli.add_command(run)
