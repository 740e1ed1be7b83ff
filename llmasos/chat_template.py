"""Chat templates: find them in a checkpoint directory and render them in a Jinja sandbox, exactly as transformers does.

Templates come from the Hub and are untrusted code, so they run in an immutable sandbox; every failure, from a syntax
error to an attempted escape, surfaces as a `TemplateError`. Compiled templates are cached by their source text.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmasos.errors import TemplateError

CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
DEFAULT_TEMPLATE_NAME = "default"

# Names a message's reasoning is passed under; transformers fills all of them from whichever one is set.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "

NO_TEMPLATE_HELP = (
    "Set one by writing the Jinja template to chat_template.jinja in the model directory (or to the "
    "`chat_template` field of tokenizer_config.json), or pass `chat_template=` explicitly."
)


def load_chat_templates(directory: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """Return the named chat templates of a checkpoint: `.jinja` files win over tokenizer_config.json's field.

    The unnamed template is stored under "default", as transformers does.
    """
    templates: dict[str, str] = {}
    default_file = directory / CHAT_TEMPLATE_FILE
    if default_file.is_file():
        templates[DEFAULT_TEMPLATE_NAME] = default_file.read_text(encoding="utf-8")
    extra_dir = directory / CHAT_TEMPLATE_DIR
    if extra_dir.is_dir():
        for template_file in sorted(extra_dir.glob("*.jinja")):
            templates[template_file.name.removesuffix(".jinja")] = template_file.read_text(encoding="utf-8")
    if templates:
        return templates

    field = config.get("chat_template")
    if isinstance(field, str):
        return {DEFAULT_TEMPLATE_NAME: field}
    if isinstance(field, list):  # legacy form: [{"name": ..., "template": ...}, ...]
        return {
            item["name"]: item["template"]
            for item in field
            if isinstance(item, Mapping) and isinstance(item.get("name"), str) and isinstance(item.get("template"), str)
        }
    return {}


def select_chat_template(templates: Mapping[str, str], chat_template: str | None, tools: list | None) -> str:
    """Pick the template to render, the way transformers' `get_chat_template` does.

    `chat_template` may be a template name or a full template; with tools, a "tool_use" template is preferred.
    """
    if chat_template is not None:
        return templates.get(chat_template, chat_template)
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"]
    if DEFAULT_TEMPLATE_NAME in templates:
        return templates[DEFAULT_TEMPLATE_NAME]
    if templates:
        raise TemplateError(
            f"This model has named chat templates {sorted(templates)} but no default one; pass one of the names "
            "(or a full template) as `chat_template=`."
        )
    raise TemplateError(f"This model has no chat template. {NO_TEMPLATE_HELP}")


class _GenerationExtension(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker); render the body as is."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _TemplateDict:
    """A `dict` global without attribute access to the real type, so templates cannot reach its internals."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """A Jinja namespace that refuses underscore-prefixed names, which could reach CPython internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates cannot store underscore-prefixed attributes on a namespace ({name!r})")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes HTML characters, which chat templates must not do.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationExtension, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


_ENVIRONMENT = _make_environment()


@lru_cache(maxsize=64)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile a chat template once; later calls with the same source text reuse the compiled template."""
    try:
        return _ENVIRONMENT.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as error:
        raise TemplateError(f"The chat template is not valid Jinja (line {error.lineno}): {error.message}") from error


def _plain_data(value: Any) -> Any:
    """Rebuild what the template sees out of plain JSON types, so rich objects cannot expose unsafe methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain_data(key): _plain_data(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain_data(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain_data(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _plain_data(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain_data(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning_fields(messages: list[dict]) -> list[dict]:
    aliased = []
    for message in messages:
        reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        aliased.append(message)
    return aliased


def _tag_final_message(messages: list[dict], field: str, template: str) -> str:
    """Append the continue tag to the final message's `field`; return the text that was tagged."""
    final = messages[-1].get(field)
    if final is None:
        raise TemplateError(f'continue_final_message is set but the final message has no "{field}" to continue')
    fields = [field]
    if field in _REASONING_FIELDS:
        fields = [name for name in _REASONING_FIELDS if messages[-1].get(name) == final]
    if not any(name in template for name in fields):
        raise TemplateError(f'continue_final_message is set to "{field}", which the chat template never reads')
    if isinstance(final, (list, tuple)):
        for block in reversed(final):
            if isinstance(block, dict) and "text" in block:
                final = block["text"]
                block["text"] = block["text"] + _CONTINUE_TAG
                return final
        raise TemplateError("continue_final_message is set but the final message has no text block to continue")
    for name in fields:
        messages[-1][name] = messages[-1][name] + _CONTINUE_TAG
    return final


def render_chat_template(
    template: str,
    messages: list[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    continue_final_message: bool | str = False,
    tools: list[Mapping[str, Any]] | None = None,
    documents: list[Mapping[str, Any]] | None = None,
    special_tokens: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> str:
    """Render one conversation to text; `special_tokens` (bos_token, ...) and `kwargs` become template variables.

    Mirrors transformers' `apply_chat_template(..., tokenize=False)`, including dropping None-valued message keys and
    `continue_final_message` (leave the last message open so the model continues it).
    """
    if not messages:
        raise TemplateError("Cannot apply a chat template to an empty conversation; pass at least one message.")
    if continue_final_message and add_generation_prompt:
        raise TemplateError("continue_final_message and add_generation_prompt cannot be used together.")
    for message in messages:
        if not isinstance(message, Mapping):
            raise TemplateError(f"Chat messages must be dicts with 'role' and 'content', got {message!r}.")
    for name, items in (("tools", tools), ("documents", documents)):
        if items is not None and not all(isinstance(item, Mapping) for item in items):
            raise TemplateError(f"{name} must be a list of JSON-schema dicts.")

    compiled = compile_chat_template(template)
    chat = _plain_data([{key: value for key, value in message.items() if value is not None} for message in messages])
    chat = _alias_reasoning_fields(chat)
    final_message = None
    if continue_final_message:
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        final_message = _tag_final_message(chat, field, template)
    variables = _plain_data({**(special_tokens or {}), **kwargs})
    try:
        rendered = compiled.render(
            messages=chat,
            tools=_plain_data(tools),
            documents=_plain_data(documents),
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except SecurityError as error:
        raise TemplateError(
            f"The chat template tried something the sandbox forbids and was stopped: {error}"
        ) from error
    except jinja2.exceptions.TemplateError as error:
        raise TemplateError(f"The chat template failed to render: {error}") from error
    except Exception as error:  # the template is untrusted code: any failure inside it is a template error
        raise TemplateError(f"The chat template failed to render: {type(error).__name__}: {error}") from error

    if final_message is not None:
        if final_message.strip() not in rendered or _CONTINUE_TAG.strip() not in rendered:
            raise TemplateError(
                "continue_final_message is set but the chat template dropped part of the final message, so it "
                "cannot be continued."
            )
        tag_at = rendered.rindex(_CONTINUE_TAG.strip())
        if rendered[tag_at : tag_at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            rendered = rendered[:tag_at]
        else:  # the template trimmed the message's trailing whitespace, taking part of the tag with it
            rendered = rendered[:tag_at].rstrip()
    return rendered
