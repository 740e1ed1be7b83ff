"""/v1/completions and /v1/chat/completions through the official openai client against a real server: answers equal
in-process greedy generation, streams equal non-streamed answers, echo + logprobs equal prompt_logprobs (what
lm-evaluation-harness asks for), chat usage equals the templated prompt, and 32 concurrent streams are all served."""

from __future__ import annotations

import asyncio

import pytest
from conftest import MODEL, async_openai_client, engine_idle, openai_client, wait_until
from support import hf_tokenizer

from llmasos import SamplingParams

PROMPTS = ["To be, or not to be", "The quick brown fox jumps over", "operating systems schedule", "héllo wörld 🙂"]


def greedy_text(reference, prompt, max_tokens: int, **extra) -> tuple[str, list[int], str]:
    out = reference.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, **extra))[0]
    return out.text, out.token_ids, out.finish_reason


@pytest.mark.parametrize("prompt", PROMPTS)
def test_completion_equals_in_process_greedy_generation(server, reference, prompt):
    client = openai_client(server)
    answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, logprobs=0)
    text, token_ids, finish = greedy_text(reference, prompt, 12)
    choice = answer.choices[0]
    assert choice.text == text and choice.finish_reason == finish
    assert len(choice.logprobs.tokens) == len(token_ids)
    assert answer.usage.prompt_tokens == len(reference.tokenizer.encode(prompt))
    assert answer.usage.completion_tokens == len(token_ids)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + len(token_ids)
    assert answer.model == MODEL and answer.object == "text_completion"


def test_prompt_forms_text_list_token_ids_and_batches(server, reference):
    client = openai_client(server)
    ids = [reference.tokenizer.encode(p) for p in PROMPTS[:2]]
    expected = [greedy_text(reference, p, 6)[0] for p in PROMPTS[:2]]
    as_texts = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=6, temperature=0)
    as_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    one_ids = client.completions.create(model=MODEL, prompt=ids[1], max_tokens=6, temperature=0)
    assert [c.text for c in sorted(as_texts.choices, key=lambda c: c.index)] == expected
    assert [c.text for c in sorted(as_ids.choices, key=lambda c: c.index)] == expected
    assert one_ids.choices[0].text == expected[1]
    assert as_ids.usage.prompt_tokens == sum(len(i) for i in ids)


def test_n_choices_stop_sequences_and_max_tokens(server, reference):
    client = openai_client(server)
    text, token_ids, _ = greedy_text(reference, PROMPTS[0], 20)
    answer = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=20, temperature=0, n=3)
    assert [c.index for c in answer.choices] == [0, 1, 2] and {c.text for c in answer.choices} == {text}
    assert answer.usage.completion_tokens == 3 * len(token_ids)
    stop = text[3:6]
    stopped = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=20, temperature=0, stop=[stop])
    expected, _, reason = greedy_text(reference, PROMPTS[0], 20, stop=[stop])
    assert stopped.choices[0].text == expected and stop not in expected and reason == "stop"
    assert stopped.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(server):
    client = openai_client(server)
    runs = [client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=16, temperature=1.0, seed=1234)
            for _ in range(2)]
    assert runs[0].choices[0].text == runs[1].choices[0].text


def test_streaming_equals_non_streaming(server):
    client = openai_client(server)
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=24, temperature=0, logprobs=2)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=24, temperature=0, logprobs=2,
                                            stream=True, stream_options={"include_usage": True}))
    token_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in token_chunks) == whole.choices[0].text
    assert [t for c in token_chunks for t in c.choices[0].logprobs.token_logprobs] == \
        pytest.approx(whole.choices[0].logprobs.token_logprobs, abs=1e-4)
    assert token_chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in token_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_chat_equals_in_process_chat_and_usage_is_the_templated_prompt(server, reference, checkpoint):
    client = openai_client(server)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "To be or not to be?"},
                {"role": "assistant", "content": "That is"}, {"role": "user", "content": "the question"}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    templated = hf_tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    templated = templated["input_ids"] if isinstance(templated, dict) or hasattr(templated, "keys") else templated
    expected = reference.chat(messages, SamplingParams(max_tokens=10, temperature=0))[0]
    assert answer.usage.prompt_tokens == len(templated)
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == expected.text
    assert answer.usage.completion_tokens == len(expected.token_ids)
    parts = [{"role": "user", "content": [{"type": "text", "text": "To be or "}, {"type": "text", "text": "not"}]}]
    as_parts = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=4, temperature=0)
    as_text = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "To be or not"}],
                                             max_tokens=4, temperature=0)
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    assert as_parts.usage == as_text.usage


def test_chat_streaming_equals_non_streaming_with_the_role_first(server):
    client = openai_client(server)
    messages = [{"role": "user", "content": "Tell me about pages"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                           logprobs=True, top_logprobs=3)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                                 logprobs=True, top_logprobs=3, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    streamed = [entry for c in chunks if c.choices and c.choices[0].logprobs for entry in c.choices[0].logprobs.content]
    reference_entries = whole.choices[0].logprobs.content
    assert [e.token for e in streamed] == [e.token for e in reference_entries]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in reference_entries], abs=1e-4)
    assert all(len(e.top_logprobs) == 3 for e in streamed)
    assert chunks[-1].usage == whole.usage


def test_echo_logprobs_with_zero_max_tokens_equal_prompt_logprobs(server, reference):
    """The request lm-evaluation-harness sends to score a continuation."""
    client = openai_client(server)
    prompt = "To be, or not to be, that is the question"
    ids = reference.tokenizer.encode(prompt)
    answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    expected = reference.prompt_logprobs(ids, top_k=1)
    logprobs = answer.choices[0].logprobs
    assert answer.choices[0].text == prompt
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.token_logprobs[1:] == pytest.approx([entry[0] for entry in expected[1:]], abs=1e-5)
    for top, (_, alternatives) in zip(logprobs.top_logprobs[1:], expected[1:], strict=True):
        (token_id, value), = alternatives.items()
        assert top == {reference.tokenizer.decode([token_id]): pytest.approx(value, abs=1e-5)}
    assert "".join(logprobs.tokens) == reference.tokenizer.decode(ids)
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(ids))]
    assert answer.usage.prompt_tokens == len(ids) and answer.usage.completion_tokens == 0
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert by_ids.choices[0].logprobs.token_logprobs[1:] == pytest.approx(reference.prompt_logprobs(ids)[1:],
                                                                           abs=1e-5)


def test_echo_with_generation_appends_to_the_prompt(server, reference):
    client = openai_client(server)
    answer = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, echo=True, temperature=0,
                                       logprobs=0)
    text, token_ids, _ = greedy_text(reference, PROMPTS[0], 5)
    prompt_ids = reference.tokenizer.encode(PROMPTS[0])
    assert answer.choices[0].text == PROMPTS[0] + text
    assert len(answer.choices[0].logprobs.tokens) == len(prompt_ids) + len(token_ids)


def test_thirty_two_concurrent_streaming_clients_are_all_served(server, reference):
    prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(32)]

    async def one(client, prompt):
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        text, usage = "", None
        async for chunk in stream:
            text += "".join(c.text for c in chunk.choices)
            usage = chunk.usage or usage
        return text, usage

    async def all_of_them():
        async with async_openai_client(server) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    results = asyncio.run(all_of_them())
    expected = reference.generate(prompts, SamplingParams(max_tokens=10, temperature=0))
    assert [text for text, _ in results] == [out.text for out in expected]
    assert [usage.completion_tokens for _, usage in results] == [len(out.token_ids) for out in expected]
    wait_until(lambda: engine_idle(server))


def test_top_logprobs_without_logprobs_is_a_400(server):
    """OpenAI's rule (and vLLM's): top_logprobs needs logprobs: true. It was a 200 without any logprobs."""
    import httpx
    from conftest import assert_error

    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "top_logprobs": 3}
    error = assert_error(httpx.post(f"{server.base_url}/v1/chat/completions", json=body), 400,
                         "invalid_request_error")
    assert "top_logprobs needs logprobs: true" in error["message"]
    answer = httpx.post(f"{server.base_url}/v1/chat/completions", json={**body, "logprobs": True}).json()
    assert len(answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 3
