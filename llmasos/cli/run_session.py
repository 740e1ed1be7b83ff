"""The conversation behind `llmasos run`: a default answer length, a sliding window that drops the oldest exchanges
when the conversation outgrows the model's context (as Ollama does), and the slash commands (/set, /show, /load,
/save, /clear, /bye, /?)."""

from __future__ import annotations

import sys
from typing import Any

import click

from llmasos.errors import LLMasOSError

DEFAULT_MAX_TOKENS = 512  # an answer's length when neither the user nor the model sets max_tokens

HELP = '''Available commands:
  /set parameter NAME VALUE  set a sampling parameter for the next answers: temperature, top_p, top_k, min_p,
                             max_tokens (or num_predict), min_tokens, seed, repetition_penalty, presence_penalty,
                             frequency_penalty, stop (one or more strings)
  /set system TEXT           set the system prompt
  /show info                 the model: name, family, parameters, context length, dtype, device, quantization
  /show parameters           the sampling parameters in use
  /show system               the system prompt
  /show template             the chat template
  /load MODEL                switch to another library model or checkpoint directory (starts a new conversation)
  /save NAME                 save this model with the system prompt and parameters as a new library model
  /clear                     forget the conversation so far
  /bye                       leave
  /? /help                   this help
Start and end a message with """ to write several lines.'''


def _say(text: str) -> None:
    click.echo(text)


def _error(text: str) -> None:
    click.echo(f"error: {text}", err=True)


def _notice(text: str) -> None:
    click.echo(click.style(text, dim=True), err=True)


class Session:
    """A conversation with one loaded model; answers stream to `out` as they are generated. The model's system
    prompt and defaults come from the spec it was loaded from (`llm.spec`); `sampling` holds the user's own values
    (command-line options and /set), which win over the model's."""

    def __init__(self, llm: Any, sampling: dict[str, Any], system: str | None, raw: bool, out=None,
                 dtype: str = "auto", device: str = "auto") -> None:
        self.llm, self.sampling, self.system, self.raw = llm, dict(sampling), system, raw
        self.out = out or sys.stdout
        self.dtype, self.device = dtype, device  # what /load loads the next model with
        self.messages: list[dict[str, str]] = []
        self.last_prompt_ids: list[int] = []  # what the last answer was asked with (for /show and tests)
        self.last_params = None

    @property
    def chat(self) -> bool:
        return not self.raw and self.llm.tokenizer.chat_template is not None

    def warn_if_system_unused(self) -> None:
        """A system prompt needs a chat template: without one (or with --raw) the text is completed as it is, so say
        the prompt is not used rather than drop it silently."""
        if self.chat or self.system is None:
            return
        why = "--raw completes text as it is" if self.raw else f"{self.llm.spec.name} has no chat template"
        _notice(f"(the system prompt is not used: {why})")

    @property
    def system_prompt(self) -> str | None:
        return self.system if self.system is not None else self.llm.spec.system

    @property
    def context_length(self) -> int:
        return self.llm.engine.max_model_len

    def default_max_tokens(self) -> int:
        """The answer length: the user's max_tokens, else the model's (Modelfile PARAMETER, generation_config),
        else DEFAULT_MAX_TOKENS. `ask` caps it at the room left in the context."""
        return (self.sampling.get("max_tokens") or self.llm.spec.sampling_defaults().get("max_tokens")
                or DEFAULT_MAX_TOKENS)

    # -- the conversation --------------------------------------------------------------------------------------
    def _render(self, messages: list[dict[str, str]]) -> list[int]:
        from llmasos.library import with_system_prompt

        return self.llm.tokenizer.apply_chat_template(with_system_prompt(messages, self.system_prompt),
                                                      add_generation_prompt=True, tokenize=True)

    def _fit(self, text: str) -> list[int]:
        """Prompt ids for `text` after the conversation, dropping the oldest exchanges (never the system prompt nor
        the new message) until there is room for an answer of min(default length, a quarter of the context)."""
        context = self.context_length
        if not self.chat:
            ids = self.llm.tokenizer.encode(text)
            if len(ids) >= context:
                raise ValueError(f"the prompt ({len(ids)} tokens) does not fit the model's {context}-token context; "
                                 "shorten it")
            return ids
        reserve = min(self.default_max_tokens(), context // 4)
        new = {"role": "user", "content": text}
        kept = list(self.messages)
        while True:
            ids = self._render([*kept, new])
            if len(ids) + reserve <= context or not kept:
                break
            # One whole exchange: the oldest user message and the replies up to the next user message.
            cut = next((i for i in range(1, len(kept)) if kept[i]["role"] == "user"), len(kept))
            del kept[:cut]
        if len(ids) >= context:
            with_system = " with the system prompt" if self.system_prompt else ""
            raise ValueError(f"your message ({len(ids)} tokens{with_system}) does not fit the model's "
                             f"{context}-token context; shorten it")
        dropped = len(self.messages) - len(kept)
        if dropped:
            self.messages = kept
            _notice(f"(dropped the {dropped} oldest message{'s' if dropped != 1 else ''} to fit the "
                    f"{context}-token context)")
        return ids

    def ask(self, text: str) -> str:
        """Stream the answer to `text`; in chat mode the exchange joins the conversation. Ctrl-C stops the answer."""
        ids = self._fit(text)
        self.last_prompt_ids = ids
        params = self.llm.default_sampling(**self.sampling)
        params.max_tokens = min(self.default_max_tokens(), self.context_length - len(ids))
        params.min_tokens = min(params.min_tokens, params.max_tokens)
        self.last_params = params
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

    # -- slash commands ----------------------------------------------------------------------------------------
    def command(self, text: str) -> bool:
        """Run one slash command; False when the session should end (/bye)."""
        name, _, argument = text.strip().partition(" ")
        argument = argument.strip()
        if name == "/bye":
            return False
        handlers = {"/clear": self._clear, "/?": self._help, "/help": self._help, "/set": self._set,
                    "/show": self._show, "/load": self._load, "/save": self._save}
        handler = handlers.get(name)
        if handler is None:
            _error(f"unknown command {name!r}; type /? for help")
        else:
            handler(argument)
        return True

    def _help(self, argument: str) -> None:
        _say(HELP)

    def _clear(self, argument: str) -> None:
        self.messages.clear()
        _say("Cleared the conversation.")

    def _set(self, argument: str) -> None:
        what, _, rest = argument.partition(" ")
        rest = rest.strip()
        if what == "system":
            if not rest:
                _error("usage: /set system TEXT")
                return
            self.system = rest.strip('"') if len(rest) >= 2 and rest[0] == rest[-1] == '"' else rest
            _say("Set the system prompt.")
            self.warn_if_system_unused()
        elif what == "parameter":
            name, _, value = rest.partition(" ")
            try:
                key, parsed = parse_parameter(name, value.strip())
                candidate = {**self.sampling, key: parsed}
                self.llm.default_sampling(**candidate)  # the same checks a request gets
            except ValueError as exc:
                _error(str(exc))
                return
            self.sampling = candidate
            _say(f"Set parameter {key!r} to {parsed!r}.")
        else:
            _error("usage: /set parameter NAME VALUE, or /set system TEXT")

    def _show(self, argument: str) -> None:
        llm, spec = self.llm, self.llm.spec
        if argument == "info":
            from llmasos.library.manage import human_count

            rows = [("model", spec.name), ("family", llm.config.model_type),
                    ("parameters", human_count(llm.num_parameters)), ("context length", str(self.context_length)),
                    ("dtype", str(llm.dtype).removeprefix("torch.")), ("device", str(llm.device)),
                    ("quantization", spec.quantization or "none")]
            _say("\n".join(f"  {label:<16}{value}" for label, value in rows))
        elif argument == "parameters":
            model = spec.sampling_defaults()
            lines = ["User parameters:", *(f"  {k:<20}{v!r}" for k, v in self.sampling.items())] \
                if self.sampling else ["User parameters: none"]
            lines += ["Model parameters:", *(f"  {k:<20}{v!r}" for k, v in model.items())] \
                if model else ["Model parameters: none"]
            lines.append(f"Answer length: {self.default_max_tokens()} tokens (capped at the room left in the "
                         f"{self.context_length}-token context)")
            _say("\n".join(lines))
        elif argument == "system":
            _say(self.system_prompt or "No system prompt.")
        elif argument == "template":
            _say(llm.tokenizer.chat_template or "No chat template: prompts are completed as they are.")
        else:
            _error("usage: /show info | parameters | system | template")

    def _load(self, argument: str) -> None:
        if not argument:
            _error("usage: /load MODEL (a library name or a checkpoint directory)")
            return
        from llmasos.cli.run import load_generating_model

        _say(f"Loading {argument}...")
        try:
            llm = load_generating_model(argument, self.dtype, self.device)
        except (LLMasOSError, ValueError, OSError) as exc:
            _error(f"{exc}; still using {self.llm.spec.name}")
            return
        old, self.llm = self.llm, llm
        old.close()
        self.messages.clear()
        self.system = None  # the new model's own system prompt applies
        _say(f"Loaded {llm.spec.name}.")

    def _save(self, argument: str) -> None:
        from llmasos.library.modelfile import Modelfile, create_from_modelfile
        from llmasos.library.names import check_name

        spec = self.llm.spec
        try:
            name = check_name(argument)
            if not spec.library:
                raise ValueError(f"/save needs a library model, and {spec.path} is a directory: import it first "
                                 f"(`llmasos import {spec.path} --name NAME`) and run it by name")
            modelfile = Modelfile(base=spec.name, system=self.system, parameters=dict(self.sampling))
            create_from_modelfile(name, modelfile)
        except (LLMasOSError, ValueError, OSError) as exc:
            _error(str(exc))
            return
        _say(f"Created new model {name!r}.")


def parse_parameter(name: str, value: str) -> tuple[str, Any]:
    """A /set parameter NAME VALUE as (SamplingParams field, typed value); the Modelfile's names and aliases."""
    from llmasos.library.modelfile import _FLOAT_PARAMETERS, _INT_PARAMETERS, _PARAMETER_ALIASES

    if not name:
        raise ValueError("usage: /set parameter NAME VALUE")
    key = _PARAMETER_ALIASES.get(name.lower(), name.lower())
    if key == "stop":
        import shlex

        try:
            stops = shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"stop: {exc}") from None
        if not stops:
            raise ValueError("stop needs one or more strings")
        return key, stops
    if key not in _FLOAT_PARAMETERS and key not in _INT_PARAMETERS:
        supported = ", ".join((*_FLOAT_PARAMETERS, *_INT_PARAMETERS, "stop"))
        raise ValueError(f"unknown parameter {name!r}; supported: {supported}")
    if not value:
        raise ValueError(f"parameter {key} needs a value")
    try:
        parsed: Any = float(value) if key in _FLOAT_PARAMETERS else int(value)
    except ValueError:
        kind = "a number" if key in _FLOAT_PARAMETERS else "an integer"
        raise ValueError(f"parameter {key} takes {kind}, got {value!r}") from None
    if key == "max_tokens" and parsed < 1:
        raise ValueError(f"max_tokens must be at least 1, got {parsed}")
    return key, parsed
