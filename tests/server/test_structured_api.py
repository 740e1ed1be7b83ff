"""Structured output and tool calling over HTTP (issue 14), through the official openai client: response_format
(json_schema, json_object), `parse()` with a Pydantic model, vLLM's structured_outputs (regex, choice), tools with
tool_choice required / named / auto / none, streamed tool-call deltas that add up to the whole response, a two-turn
conversation with a tool result, and the 400s for what cannot be served. A random tiny model must still produce
valid structure when constrained."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
from conftest import assert_error, openai_client, start_service
from pydantic import BaseModel, Field

from llmasos.tool_calls import HermesParser, Llama3JsonParser, MistralParser, choose_parser

SCHEMAS = {
    "person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                "age": {"type": "integer", "minimum": 0, "maximum": 120}},
               "required": ["name", "age"], "additionalProperties": False},
    "tags": {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                                       "minItems": 1, "maxItems": 3}},
             "required": ["tags"], "additionalProperties": False},
    "any_of": {"anyOf": [{"type": "object", "properties": {"n": {"type": "number", "minimum": -1, "maximum": 1}},
                          "required": ["n"], "additionalProperties": False},
                         {"type": "object", "properties": {"s": {"type": "string", "pattern": "^[a-z]{1,5}$"}},
                          "required": ["s"], "additionalProperties": False}]},
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12,
                                                                                 "maximum": 12}},
                                       "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
MODEL = "tiny"


@pytest.fixture(scope="module")
def long_server(home, long_checkpoint):
    service = start_service({MODEL: long_checkpoint})
    yield service
    service.stop()


@pytest.fixture(scope="module")
def client(long_server):
    return openai_client(long_server)


def schema_of(tool: dict) -> dict:
    return tool["function"]["parameters"]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_outputs_validate_streamed_or_not(client, name):
    schema = SCHEMAS[name]
    fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    answer = client.chat.completions.create(model=MODEL, messages=USER, response_format=fmt, max_tokens=400,
                                            temperature=1.0, seed=5, n=4)
    for choice in answer.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), schema)
    stream = client.chat.completions.create(model=MODEL, messages=USER, response_format=fmt, max_tokens=400,
                                            temperature=1.0, seed=6, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), schema)
    completion = client.completions.create(model=MODEL, prompt="JSON:", max_tokens=400, seed=7, temperature=1.0,
                                           extra_body={"response_format": fmt})
    jsonschema.validate(json.loads(completion.choices[0].text), schema)


class Person(BaseModel):
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=99)


def test_parse_with_a_pydantic_model(client):
    answer = client.chat.completions.parse(model=MODEL, messages=USER, response_format=Person, max_tokens=300,
                                           temperature=0.7, seed=1)
    person = answer.choices[0].message.parsed
    assert isinstance(person, Person) and 0 <= person.age <= 99


def test_json_object_regex_and_choice(client):
    # Any JSON object: a random model may nest or lengthen it past max_tokens (then it is cut, finish "length");
    # every one that ends parses.
    answer = client.chat.completions.create(model=MODEL, messages=USER, response_format={"type": "json_object"},
                                            max_tokens=400, temperature=0.8, seed=3, n=6)
    ended = [c for c in answer.choices if c.finish_reason == "stop"]
    assert ended and all(isinstance(json.loads(c.message.content), dict) for c in ended)
    for seed in range(3):
        text = client.completions.create(model=MODEL, prompt="Date:", max_tokens=30, temperature=1.0, seed=seed,
                                         extra_body={"structured_outputs": {"regex": r"\d{4}-\d{2}-\d{2}"}})
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", text.choices[0].text)
        picked = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=10, temperature=1.0,
                                                seed=seed, extra_body={"structured_outputs":
                                                                       {"choice": ["yes", "no", "maybe"]}})
        assert picked.choices[0].message.content in ("yes", "no", "maybe")


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_calls_always_validate(client, tool_choice):
    answer = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice=tool_choice,
                                            max_tokens=400, temperature=1.0, seed=11, n=4)
    by_name = {tool["function"]["name"]: tool for tool in TOOLS}
    for choice in answer.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
        for call in choice.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            if isinstance(tool_choice, dict):
                assert call.function.name == "get_time"
            jsonschema.validate(json.loads(call.function.arguments), schema_of(by_name[call.function.name]))


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_tool_call_deltas_add_up_to_the_whole_response(client, tool_choice):
    whole = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice=tool_choice,
                                           max_tokens=400, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice=tool_choice,
                                            max_tokens=400, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    calls: dict[int, dict] = {}
    content, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = delta.id or entry["id"]
                if delta.function is not None:
                    entry["name"] += delta.function.name or ""
                    entry["arguments"] += delta.function.arguments or ""
    expected = whole.choices[0].message
    assert finish == "tool_calls" == whole.choices[0].finish_reason
    assert (content or None) == expected.content
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
        [(c.function.name, c.function.arguments) for c in expected.tool_calls]
    assert all(c["id"].startswith("call_") for c in calls.values())
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_a_two_turn_tool_conversation_renders_and_completes(client):
    first = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required",
                                           max_tokens=300, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}]
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=8,
                                            temperature=0)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result are in the prompt
    # tool_choice none: the tools leave the prompt, the history stays
    third = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none",
                                           max_tokens=8, temperature=0)
    assert third.choices[0].message.tool_calls is None
    assert third.usage.prompt_tokens < second.usage.prompt_tokens


@pytest.mark.parametrize("body, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format", "invalid JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "dependentRequired": {"a": ["b"]}}}}}, "response_format", "dependentRequired"),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs", "invalid regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one of"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema",
     "needs json_schema.schema"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "not in tools"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     "cannot be combined"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0]", "function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools", "must be"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs",
     "not both"),
])
def test_what_cannot_be_served_is_a_400_and_the_server_stays_up(long_server, body, param, message):
    response = httpx.post(long_server.base_url + "/v1/chat/completions",
                          json={"model": MODEL, "messages": USER, "max_tokens": 5, **body})
    error = assert_error(response, 400)
    assert error["param"] == param and message in error["message"], error
    assert httpx.get(long_server.base_url + "/health").status_code == 200


def test_metrics_count_constrained_requests_and_compile_time(long_server, client):
    client.completions.create(model=MODEL, prompt="x", max_tokens=4,
                              extra_body={"structured_outputs": {"choice": ["on", "off"]}})
    text = httpx.get(long_server.base_url + "/metrics").text
    assert re.search(r'llmasos_structured_output_requests_total\{kind="choice",model="tiny"\} [1-9]', text)
    assert "llmasos_structured_output_compile_seconds_count" in text


def test_bad_tool_call_arguments_in_history_are_a_400(long_server):
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{not json"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    response = httpx.post(long_server.base_url + "/v1/chat/completions",
                          json={"model": MODEL, "messages": messages, "tools": TOOLS, "max_tokens": 2})
    assert assert_error(response, 400)["param"] == "messages"
    messages[1]["tool_calls"] = [{}]  # found by schemathesis: a call without a function
    response = httpx.post(long_server.base_url + "/v1/chat/completions",
                          json={"model": MODEL, "messages": messages, "max_tokens": 2})
    assert "each tool call" in assert_error(response, 400)["message"]


# --- the parsers, on the formats of the families ----------------------------------------------------------------

def test_parsers_read_each_familys_format():
    content, calls = HermesParser().parse('Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
                                          '\n<tool_call>{"name": "g", "arguments": {}}</tool_call>')
    assert content == "Sure.\n" and [(c.name, c.arguments) for c in calls] == [("f", {"a": 1}), ("g", {})]
    assert HermesParser().parse("<tool_call>{broken</tool_call>") == ("<tool_call>{broken</tool_call>", [])
    content, calls = Llama3JsonParser().parse('<|python_tag|>{"name": "f", "parameters": {"a": 1}}; '
                                              '{"name": "g", "parameters": {}}')
    assert content is None and [c.name for c in calls] == ["f", "g"] and calls[0].arguments == {"a": 1}
    assert Llama3JsonParser().parse("Hello there")[1] == []
    content, calls = MistralParser().parse('[TOOL_CALLS][{"name": "f", "arguments": {"x": "y"}}]')
    assert content is None and calls[0].arguments == {"x": "y"}
    assert isinstance(choose_parser("{{ '[TOOL_CALLS]' }}"), MistralParser)
    assert isinstance(choose_parser("<|python_tag|>{{ tools }}"), Llama3JsonParser)
    assert isinstance(choose_parser("<tool_call>"), HermesParser) and isinstance(choose_parser(None), HermesParser)
    assert isinstance(choose_parser(None, "mistral"), MistralParser)
    assert HermesParser().safe_prefix("Hello <tool") == len("Hello ")
    assert HermesParser().safe_prefix("Hello <tool_call>{") == len("Hello ")


def test_the_official_client_raises_for_a_bad_schema(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=5, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}})
