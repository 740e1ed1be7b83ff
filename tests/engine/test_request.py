"""Request finishing rules on a tiny random checkpoint: stop strings that span tokens are found, trimmed and never
streamed; stop token ids; the text of every finish reason."""

from __future__ import annotations

import pytest

from llmasos import LLM, SamplingParams

PROMPT = "The quick brown fox"
FREE_RUN = SamplingParams(max_tokens=40, temperature=0.9, seed=5, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint) -> LLM:
    return LLM.load(tiny_checkpoint, dtype="float32", num_kv_blocks=200)


def spanning_stop(llm: LLM, token_ids: list[int], text: str) -> tuple[str, int, int]:
    """A 4-character stop string made of the last 2 characters of token i-1 and the first 2 of token i, occurring
    first at that spot. Returns (stop, where it starts in `text`, i)."""
    for i in range(1, len(token_ids)):
        left = llm.tokenizer.decode(token_ids[:i], skip_special_tokens=True)
        right = llm.tokenizer.decode(token_ids[:i + 1], skip_special_tokens=True)
        if not text.startswith(right) or len(right) < len(left) + 2 or len(left) < 2:
            continue
        stop = text[len(left) - 2:len(left) + 2]
        if stop.isprintable() and "\ufffd" not in stop and text.find(stop) == len(left) - 2:
            return stop, len(left) - 2, i
    raise AssertionError(f"no clean token boundary in {text!r}")


def stream(llm: LLM, prompt: str, sampling: SamplingParams) -> tuple[str, list[str]]:
    request_id = llm.engine.add_request(prompt, sampling)
    deltas: list[str] = []
    while True:
        for group in llm.engine.step():
            if group.request_id == request_id:
                out = group.output(delta=True)
                deltas.append(out.text)
                if out.finished:
                    return "".join(deltas), deltas


def test_a_stop_string_across_a_token_boundary_ends_the_request_and_is_trimmed(llm):
    free = llm.generate(PROMPT, FREE_RUN)[0]
    stop, start, token_index = spanning_stop(llm, free.token_ids, free.text)
    sampling = SamplingParams(max_tokens=40, temperature=0.9, seed=5, ignore_eos=True, stop=[stop])
    stopped = llm.generate(PROMPT, sampling)[0]
    assert stopped.finish_reason == "stop" and stopped.outputs[0].stop_reason == stop
    assert stopped.text == free.text[:start]
    assert stopped.token_ids == free.token_ids[:token_index + 1]  # ends with the token that completed the match
    streamed, _ = stream(llm, PROMPT, sampling)
    assert streamed == stopped.text  # deltas only append: nothing past the cut was ever sent


def test_the_earliest_of_several_stop_strings_wins(llm):
    free = llm.generate(PROMPT, FREE_RUN)[0]
    stop, start, _ = spanning_stop(llm, free.token_ids, free.text)
    later = free.text[start + 6:start + 9]
    assert later and free.text.find(later) > start
    sampling = SamplingParams(max_tokens=40, temperature=0.9, seed=5, ignore_eos=True, stop=[later, stop])
    stopped = llm.generate(PROMPT, sampling)[0]
    assert stopped.text == free.text[:start] and stopped.outputs[0].stop_reason == stop


def test_an_unmatched_stop_string_changes_nothing(llm):
    free = llm.generate(PROMPT, FREE_RUN)[0]
    sampling = SamplingParams(max_tokens=40, temperature=0.9, seed=5, ignore_eos=True, stop=["<never here>"])
    same = llm.generate(PROMPT, sampling)[0]
    assert same.text == free.text and same.token_ids == free.token_ids and same.finish_reason == "length"
    streamed, _ = stream(llm, PROMPT, sampling)
    assert streamed == free.text  # held-back text is released at the end


def test_a_stop_token_id_ends_the_request(llm):
    free = llm.generate(PROMPT, FREE_RUN)[0]
    target = free.token_ids[7]
    first = free.token_ids.index(target)
    sampling = SamplingParams(max_tokens=40, temperature=0.9, seed=5, ignore_eos=True, stop_token_ids=[target])
    stopped = llm.generate(PROMPT, sampling)[0]
    assert stopped.token_ids == free.token_ids[:first + 1]
    assert stopped.finish_reason == "stop" and stopped.outputs[0].stop_reason == target
