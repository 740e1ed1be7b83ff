"""Tool calling: tools handed to the model's chat template (or, for a template that has no `tools`, described in the
system message), tool calls parsed from the output in the format of the model's family, and the grammar that forces
calls (tool_choice "required" or a named function) so that their arguments always parse and match the schema.

Formats (`ToolCallParser.name`), chosen from the template unless overridden (`llmasos serve --tool-call-parser`):
- hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call (Qwen2/2.5, Hermes, and
  the default for templates without tools);
- llama3_json: `{"name": ..., "parameters": {...}}`, calls separated by ';', optionally after `<|python_tag|>`
  (Llama 3.1/3.2);
- mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from llmasos.sampling_params import StructuredOutputsParams

NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Compact JSON inside forced calls (as for response_format): flexible whitespace lets a weak model pad forever.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ToolError(ValueError):
    """A tools / tool_choice request that cannot be served; `param` names the field."""

    def __init__(self, message: str, param: str = "tools") -> None:
        super().__init__(message)
        self.param = param


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


def check_tools(tools: list[dict[str, Any]] | None, tool_choice: Any) -> tuple[list[dict[str, Any]], str | None]:
    """Validate OpenAI `tools` and `tool_choice`; return the tools and the effective choice: None (no tools in play),
    "auto", "required", or the name of the one function to call."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise ToolError("tool_choice needs tools: give the functions the model may call in `tools`",
                            "tool_choice")
        return [], None
    names = []
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ToolError(f'{where} must be {{"type": "function", "function": {{"name", "parameters"}}}}')
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise ToolError(f"{where}.function.name must be 1-64 letters, digits, '_', '.' or '-'", where)
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise ToolError(f"{where}.function.parameters must be a JSON schema object", where)
        if name in names:
            raise ToolError(f"two tools are named {name!r}", where)
        names.append(name)
    if tool_choice is None or tool_choice == "auto":
        return tools, "auto"
    if tool_choice == "none":
        return tools, None
    if tool_choice == "required":
        return tools, "required"
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function" \
            and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name not in names:
            raise ToolError(f"tool_choice names the function {name!r}, which is not in tools "
                            f"({', '.join(names)})", "tool_choice")
        return tools, name
    raise ToolError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                    '{"name": ...}}', "tool_choice")


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


class ToolCallParser:
    """One family's tool-call format: how calls look in the output, how to find them, how to force them."""

    name = ""
    arguments_key = "arguments"

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a whole output; no calls when none parses (the text is then all content)."""
        raise NotImplementedError

    def safe_prefix(self, text: str) -> int:
        """How much of a partial output can be streamed as content: text that may still become a call is held."""
        raise NotImplementedError

    def call_schema(self, tools: list[dict[str, Any]]) -> dict[str, Any]:
        options = [{"type": "object", "properties": {"name": {"const": tool["function"]["name"]},
                                                     self.arguments_key: _parameters(tool)},
                    "required": ["name", self.arguments_key], "additionalProperties": False} for tool in tools]
        return options[0] if len(options) == 1 else {"anyOf": options}

    def constraint(self, tools: list[dict[str, Any]], parallel: bool) -> StructuredOutputsParams:
        raise NotImplementedError

    def _calls(self, objects: list[Any]) -> list[ToolCall] | None:
        calls = []
        for obj in objects:
            if not (isinstance(obj, dict) and isinstance(obj.get("name"), str)
                    and isinstance(obj.get(self.arguments_key, {}), dict)):
                return None
            calls.append(ToolCall(obj["name"], obj.get(self.arguments_key, {})))
        return calls


def _compact(schema: dict[str, Any]) -> dict[str, Any]:
    return {"x-guidance": _JSON_STYLE, **schema}


def _content(text: str) -> str | None:
    return text if text.strip() else None


class HermesParser(ToolCallParser):
    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    _BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        start = text.find(self.OPEN)
        if start < 0:
            return _content(text), []
        objects = []
        for block in self._BLOCK.findall(text[start:]):
            try:
                objects.append(json.loads(block))
            except ValueError:
                continue  # a malformed block is not a call
        calls = self._calls(objects) or []
        return (_content(text[:start]), calls) if calls else (_content(text), [])

    def safe_prefix(self, text: str) -> int:
        start = text.find(self.OPEN)
        if start >= 0:
            return start
        for keep in range(min(len(self.OPEN) - 1, len(text)), 0, -1):  # a marker may be arriving
            if self.OPEN.startswith(text[-keep:]):
                return len(text) - keep
        return len(text)

    def constraint(self, tools: list[dict[str, Any]], parallel: bool) -> StructuredOutputsParams:
        more = ' ("\\n" call)*' if parallel else ""
        grammar = (f'start: call{more}\ncall: "{self.OPEN}\\n" obj "\\n{self.CLOSE}"\n'
                   f"obj: %json {json.dumps(_compact(self.call_schema(tools)))}")
        return StructuredOutputsParams(grammar=grammar)


class JsonParser(ToolCallParser):
    """Calls as bare JSON after an optional marker: Llama 3.1 (`;`-separated objects) and Mistral (a list)."""

    markers: tuple[str, ...] = ()

    def _body(self, text: str) -> str | None:
        body = text.strip()
        for marker in self.markers:
            if body.startswith(marker):
                return body[len(marker):].strip()
        return body if body[:1] in "{[" else None

    def safe_prefix(self, text: str) -> int:
        body = text.lstrip()
        if not body:
            return 0
        if body[0] in "{[" or any(m.startswith(body[:len(m)]) for m in self.markers):
            return 0  # may be a call: held until the output is complete
        return len(text)


class Llama3JsonParser(JsonParser):
    name = "llama3_json"
    arguments_key = "parameters"
    markers = ("<|python_tag|>",)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = self._body(text)
        if body is None:
            return _content(text), []
        decoder, objects, position = json.JSONDecoder(), [], 0
        try:
            while position < len(body):
                obj, position = decoder.raw_decode(body, position)
                objects.append(obj)
                position = len(body) - len(body[position:].lstrip().removeprefix(";").lstrip())
        except ValueError:
            return _content(text), []
        calls = self._calls(objects)
        return (None, calls) if calls else (_content(text), [])

    def constraint(self, tools: list[dict[str, Any]], parallel: bool) -> StructuredOutputsParams:
        more = ' ("; " obj)*' if parallel else ""
        schema = _compact(self.call_schema(tools))
        return StructuredOutputsParams(grammar=f"start: obj{more}\nobj: %json {json.dumps(schema)}")


class MistralParser(JsonParser):
    name = "mistral"
    markers = ("[TOOL_CALLS]",)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = self._body(text)
        if body is None:
            return _content(text), []
        try:
            objects = json.loads(body)
        except ValueError:
            return _content(text), []
        calls = self._calls(objects if isinstance(objects, list) else [objects])
        return (None, calls) if calls else (_content(text), [])

    def constraint(self, tools: list[dict[str, Any]], parallel: bool) -> StructuredOutputsParams:
        schema = _compact({"type": "array", "items": self.call_schema(tools), "minItems": 1,
                           **({} if parallel else {"maxItems": 1})})
        return StructuredOutputsParams(grammar=f'start: "[TOOL_CALLS]" obj\nobj: %json {json.dumps(schema)}')


PARSERS: dict[str, type[ToolCallParser]] = {p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)}


def choose_parser(template: str | None, override: str | None = None) -> ToolCallParser:
    """The parser named by `override`, else the one the chat template's source points to (hermes by default)."""
    if override:
        if override not in PARSERS:
            raise ValueError(f"unknown tool-call parser {override!r}; choose one of {', '.join(PARSERS)}")
        return PARSERS[override]()
    source = template or ""
    if "[TOOL_CALLS]" in source:
        return MistralParser()
    if "<|python_tag|>" in source or ("ipython" in source and "parameters" in source):
        return Llama3JsonParser()
    return HermesParser()


@dataclass
class ToolPlan:
    """What a chat request's tools mean for one model: the tools offered (none when tool_choice is none), the
    effective choice (None, "auto", "required" or a function name), the parser of the model's format, and the
    constraint that forces calls (None unless required or named)."""

    tools: list[dict[str, Any]]
    choice: str | None
    parser: ToolCallParser | None
    constraint: StructuredOutputsParams | None


def template_source(tokenizer: Any, chat_template: str | None, tools: bool) -> str | None:
    """The chat template a conversation would be rendered with (None when the model has none)."""
    from llmasos.chat_template import select_chat_template
    from llmasos.errors import TemplateError

    try:
        return select_chat_template(tokenizer.chat_templates, chat_template, [] if tools else None)
    except TemplateError:
        return None


def plan_tools(tokenizer: Any, chat_template: str | None, tools: list[dict[str, Any]] | None, tool_choice: Any,
               parallel_tool_calls: bool = True, parser: str | None = None) -> ToolPlan:
    """Check tools and tool_choice (ToolError) and decide how they are rendered, forced and parsed."""
    tools, choice = check_tools(tools, tool_choice)
    if choice is None:
        return ToolPlan([], None, None, None)
    chosen_parser = choose_parser(template_source(tokenizer, chat_template, True), parser)
    if choice == "auto":
        return ToolPlan(tools, choice, chosen_parser, None)
    chosen = tools if choice == "required" else [t for t in tools if t["function"]["name"] == choice]
    return ToolPlan(tools, choice, chosen_parser,
                    chosen_parser.constraint(chosen, parallel_tool_calls and choice == "required"))


def prepare_messages(tokenizer: Any, chat_template: str | None, messages: list[dict[str, Any]], plan: ToolPlan
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages to render, and the `tools` template variable (None when the template does not take it or no
    tools are offered)."""
    has_calls = any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
    if not plan.tools and not has_calls:
        return messages, None
    takes = template_takes_tools(template_source(tokenizer, chat_template, bool(plan.tools)))
    return template_messages(messages, plan.tools, takes), (plan.tools if plan.tools and takes else None)


def parse_output(plan: ToolPlan, text: str) -> tuple[str | None, list[dict[str, Any]] | None]:
    """(content, OpenAI tool_calls or None) of a generated answer."""
    if plan.parser is None:
        return text, None
    content, calls = plan.parser.parse(text)
    return content, [call.to_openai() for call in calls] or None


def template_takes_tools(template: str | None) -> bool:
    """Whether the chat template renders a `tools` variable itself."""
    return bool(template) and re.search(r"\btools\b", template) is not None


def _describe_tools(tools: list[dict[str, Any]]) -> str:
    listed = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return ("# Tools\n\nYou can call the functions described below (JSON schemas inside <tools></tools>) when they "
            f"help to answer.\n<tools>\n{listed}\n</tools>\n\nTo call one, answer with a JSON object holding its name "
            "and arguments between <tool_call></tool_call> tags, one block per call:\n<tool_call>\n"
            '{"name": "<function name>", "arguments": {<arguments as JSON>}}\n</tool_call>')


def template_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]], takes_tools: bool
                      ) -> list[dict[str, Any]]:
    """Messages as a chat template reads them. Assistant tool calls get their arguments as objects (templates write
    them with `tojson`). For a template without `tools`: the tools are described in the system message (the hermes
    format), earlier calls are written into the assistant's text, and tool results become user turns in
    <tool_response> tags — plain roles any template renders."""
    out = []
    for message in messages:
        message = dict(message)
        calls = message.get("tool_calls")
        if calls:
            message["tool_calls"] = [_template_call(call) for call in calls]
        out.append(message)
    if takes_tools:
        return out
    plain: list[dict[str, Any]] = []
    for message in out:
        if message.get("tool_calls"):
            blocks = "\n".join(f"<tool_call>\n{json.dumps({'name': c['function']['name'], 'arguments': c['function']['arguments']}, ensure_ascii=False)}\n</tool_call>"  # noqa: E501
                               for c in message["tool_calls"])
            text = (message.get("content") or "").strip()
            plain.append({"role": "assistant", "content": f"{text}\n{blocks}" if text else blocks})
        elif message["role"] == "tool":
            response = f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"
            if plain and plain[-1]["role"] == "user" and plain[-1].get("_tool_results"):
                plain[-1]["content"] += "\n" + response
            else:
                plain.append({"role": "user", "content": response, "_tool_results": True})
        else:
            plain.append({k: v for k, v in message.items() if k in ("role", "content")})
    for message in plain:
        message.pop("_tool_results", None)
    if tools:
        description = _describe_tools(tools)
        if plain and plain[0]["role"] == "system":
            plain[0] = {"role": "system", "content": f"{plain[0]['content']}\n\n{description}"}
        else:
            plain.insert(0, {"role": "system", "content": description})
    return plain


def _template_call(call: Any) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not (isinstance(function, dict) and isinstance(function.get("name"), str)
            and isinstance(function.get("arguments", ""), (str, dict))):
        raise ToolError('each tool call in messages must be {"id", "type": "function", "function": {"name", '
                        '"arguments"}}', "messages")
    function = dict(function)
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            function["arguments"] = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            raise ToolError(f"the arguments of tool call {call.get('id')!r} are not valid JSON", "messages") from None
    return {**call, "function": function}
