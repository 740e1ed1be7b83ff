"""Tools and structured output in process (issue 14): `LLM.chat(tools=..., tool_choice=...)` forces and parses calls
as the server does, and the chat pipeline passes tools and structured_outputs on."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from support import family_config, make_checkpoint

from llmasos import LLM, SamplingParams, pipeline

TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"word": {"type": "string", "maxLength": 8}, "count": {"type": "integer",
                                                                                        "minimum": 1, "maximum": 9}},
    "required": ["word", "count"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "Look up 'to be'"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tools") / "tiny"
    make_checkpoint(directory, family_config("qwen2", num_hidden_layers=2, max_position_embeddings=2048), seed=4)
    return directory


@pytest.fixture(scope="module")
def llm(checkpoint) -> LLM:
    model = LLM.load(checkpoint, dtype="float32")
    yield model
    model.close()


def test_chat_with_required_tools_returns_calls_that_validate(llm):
    outputs = llm.chat(ASK, SamplingParams(max_tokens=300, temperature=1.0, seed=2, n=4), tools=[TOOL],
                       tool_choice="required")
    for completion in outputs[0].outputs:
        assert completion.tool_calls, completion.text
        for call in completion.tool_calls:
            assert call["function"]["name"] == "lookup"
            jsonschema.validate(json.loads(call["function"]["arguments"]), TOOL["function"]["parameters"])


def test_chat_refuses_a_forced_tool_call_together_with_a_constraint(llm):
    with pytest.raises(ValueError, match="cannot be combined"):
        llm.chat(ASK, SamplingParams(max_tokens=5, structured_outputs={"regex": "a+"}), tools=[TOOL],
                 tool_choice="required")
    with pytest.raises(ValueError, match="not in tools"):
        llm.chat(ASK, tools=[TOOL], tool_choice={"type": "function", "function": {"name": "other"}})


def test_the_chat_pipeline_passes_tools_and_structured_outputs_on(llm):
    chat = pipeline("chat", model=llm)
    message = chat(ASK, tools=[TOOL], tool_choice={"type": "function", "function": {"name": "lookup"}},
                   max_new_tokens=300)
    assert message["role"] == "assistant" and message["tool_calls"][0]["function"]["name"] == "lookup"
    answer = chat(ASK, structured_outputs={"choice": ["yes", "no"]}, max_new_tokens=5)
    assert answer["content"] in ("yes", "no")
    generated = pipeline("text-generation", model=llm)("Year:", structured_outputs={"regex": "[0-9]{4}"},
                                                       max_new_tokens=8, return_full_text=False)
    assert len(generated[0]["generated_text"]) == 4 and generated[0]["generated_text"].isdigit()
