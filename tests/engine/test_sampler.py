"""Sampler on a tiny random checkpoint: seeded draws independent of the batch, logprobs against prompt_logprobs,
truncation (top-k / top-p), temperature, logit bias, min_tokens, ignore_eos and penalties against a reference."""

from __future__ import annotations

import math
import random

import pytest
import torch

from llmasos import LLM, SamplingParams
from llmasos.models.attention import AttentionMetadata

EOS = 1  # the test tokenizer's <|eos|>, also config.json's eos_token_id


def random_prompts(count: int, min_len: int, max_len: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 384) for _ in range(rng.randint(min_len, max_len))] for _ in range(count)]


@pytest.fixture(scope="module")
def llm(tiny_checkpoint) -> LLM:
    return LLM.load(tiny_checkpoint, dtype="float32", num_kv_blocks=400, max_num_batched_tokens=96)


@torch.no_grad()
def next_token_logits(llm: LLM, token_ids: list[int]) -> torch.Tensor:
    """The model's raw logits for the token after `token_ids`, from a plain cache-free forward."""
    ids = torch.tensor(token_ids)
    hidden = llm.model(ids, torch.arange(len(token_ids)), AttentionMetadata.for_prompts([len(token_ids)]))
    return llm.model.compute_logits(hidden[-1:])[0]


def test_seeded_sampling_is_the_same_alone_and_in_a_crowded_batch(llm):
    prompt = random_prompts(1, 40, 40, seed=1)[0]
    seeded = SamplingParams(max_tokens=30, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = llm.generate(prompt, seeded)[0].token_ids
    assert llm.generate(prompt, seeded)[0].token_ids == alone
    rng = random.Random(2)
    crowd_prompts = random_prompts(20, 1, 120, seed=3)
    crowd_params = [SamplingParams(max_tokens=rng.randint(1, 50), temperature=rng.choice([0, 0.7, 1.0, 1.5]),
                                   top_k=rng.choice([-1, 5]), seed=rng.choice([None, 7])) for _ in crowd_prompts]
    # The seeded request arrives in the middle of the crowd, behind chunked prefills of the others.
    outputs = llm.generate(crowd_prompts[:10] + [prompt] + crowd_prompts[10:],
                           crowd_params[:10] + [seeded] + crowd_params[10:])
    assert outputs[10].token_ids == alone
    other_seed = SamplingParams(max_tokens=30, temperature=1.0, top_p=0.9, top_k=50, seed=4321, ignore_eos=True)
    assert llm.generate(prompt, other_seed)[0].token_ids != alone


def test_truncation_only_ever_picks_allowed_tokens(llm):
    prompt = random_prompts(1, 30, 30, seed=4)[0]
    logits = next_token_logits(llm, prompt)
    top3 = set(logits.topk(3).indices.tolist())
    picks = llm.generate(prompt, SamplingParams(n=128, max_tokens=1, temperature=1.0, top_k=3, seed=0))[0]
    chosen = [c.token_ids[0] for c in picks.outputs]
    assert set(chosen) <= top3 and len(set(chosen)) > 1
    nucleus = llm.generate(prompt, SamplingParams(n=64, max_tokens=1, temperature=1.0, top_p=1e-3, seed=0))[0]
    assert {c.token_ids[0] for c in nucleus.outputs} == {int(logits.argmax())}
    min_p = llm.generate(prompt, SamplingParams(n=64, max_tokens=1, temperature=1.0, min_p=0.999, seed=0))[0]
    assert {c.token_ids[0] for c in min_p.outputs} == {int(logits.argmax())}


def test_sample_frequencies_follow_the_tempered_distribution(llm):
    prompt = random_prompts(1, 25, 25, seed=5)[0]
    logits = next_token_logits(llm, prompt)
    temperature = 0.5
    top = logits.topk(2)
    first, second = top.indices.tolist()
    expected = torch.softmax(top.values / temperature, dim=0)[0].item()
    params = [SamplingParams(n=128, max_tokens=1, temperature=temperature, top_k=2, seed=1000 * i) for i in range(4)]
    outputs = llm.generate([prompt] * 4, params)
    chosen = [c.token_ids[0] for o in outputs for c in o.outputs]
    assert set(chosen) <= {first, second}
    share = chosen.count(first) / len(chosen)
    sigma = math.sqrt(expected * (1 - expected) / len(chosen))
    assert abs(share - expected) < 5 * sigma + 1e-3, (share, expected)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logprobs_hold_the_chosen_token_and_the_top_k_and_match_prompt_logprobs(llm, temperature):
    prompt = random_prompts(1, 20, 20, seed=6)[0]
    k = 3
    output = llm.generate(prompt, SamplingParams(max_tokens=12, temperature=temperature, seed=9, logprobs=k,
                                                 ignore_eos=True))[0]
    assert len(output.outputs[0].logprobs) == 12
    reference = llm.prompt_logprobs(prompt + output.token_ids, top_k=k)
    for i, (token, entry) in enumerate(zip(output.token_ids, output.outputs[0].logprobs, strict=True)):
        chosen_lp, top = reference[len(prompt) + i]
        assert token in entry and set(top) <= set(entry) and set(entry) <= set(top) | {token}
        assert entry[token] == pytest.approx(chosen_lp, abs=1e-4)
        for token_id, value in top.items():
            assert entry[token_id] == pytest.approx(value, abs=1e-4)
        if temperature == 0:
            assert len(entry) == k and max(entry, key=entry.get) == token
    only_chosen = llm.generate(prompt, SamplingParams(max_tokens=3, temperature=0, logprobs=0))[0]
    assert all(len(entry) == 1 for entry in only_chosen.outputs[0].logprobs)
    assert llm.generate(prompt, SamplingParams(max_tokens=3, temperature=0))[0].outputs[0].logprobs is None


def test_logit_bias_forces_and_bans_tokens(llm):
    prompt = random_prompts(1, 15, 15, seed=7)[0]
    for temperature in (0.0, 1.0):
        forced = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=temperature, seed=1,
                                                     logit_bias={"200": 100}))[0]
        assert forced.token_ids == [200] * 8
    plain = llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0))[0].token_ids[0]
    banned = llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0, logit_bias={plain: -100}))[0]
    assert banned.token_ids[0] != plain
    logits = next_token_logits(llm, prompt)
    logits[plain] = float("-inf")
    assert banned.token_ids[0] == int(logits.argmax())  # the runner-up, exactly


def test_eos_min_tokens_and_ignore_eos(llm):
    prompt = random_prompts(1, 10, 10, seed=8)[0]
    wants_eos = {EOS: 100}
    stops = llm.generate(prompt, SamplingParams(max_tokens=20, temperature=0, logit_bias=wants_eos))[0]
    assert stops.token_ids == [EOS] and stops.finish_reason == "stop" and stops.text == ""
    delayed = llm.generate(prompt, SamplingParams(max_tokens=20, temperature=0, logit_bias=wants_eos,
                                                  min_tokens=5))[0]
    assert len(delayed.token_ids) == 6 and EOS not in delayed.token_ids[:5] and delayed.token_ids[5] == EOS
    assert delayed.finish_reason == "stop"
    ignored = llm.generate(prompt, SamplingParams(max_tokens=20, temperature=0, logit_bias=wants_eos,
                                                  ignore_eos=True))[0]
    assert ignored.token_ids == [EOS] * 20 and ignored.finish_reason == "length"
    by_id = llm.generate(prompt, SamplingParams(max_tokens=20, temperature=0, logit_bias={250: 100},
                                                stop_token_ids=[250], min_tokens=3))[0]
    assert len(by_id.token_ids) == 4 and by_id.token_ids[3] == 250 and 250 not in by_id.token_ids[:3]
    assert by_id.finish_reason == "stop" and by_id.outputs[0].stop_reason == 250


def reference_penalties(logits: torch.Tensor, prompt: list[int], output: list[int], presence: float,
                        frequency: float, repetition: float) -> torch.Tensor:
    """The OpenAI / vLLM definitions, one token at a time: repetition over prompt and output (divide positive
    logits, multiply negative ones), presence and frequency over the output only."""
    logits = logits.clone()
    for token in set(prompt) | set(output):
        value = logits[token].item()
        logits[token] = value / repetition if value > 0 else value * repetition
    for token in set(output):
        logits[token] -= presence + frequency * output.count(token)
    return logits


@pytest.mark.parametrize("penalties", [
    dict(presence_penalty=1.5), dict(frequency_penalty=0.7), dict(repetition_penalty=1.8),
    dict(presence_penalty=-0.5, frequency_penalty=0.3, repetition_penalty=1.3),
])
def test_penalties_match_a_reference_computation_on_the_logits(llm, penalties):
    prompt = llm.tokenizer.encode("To be, or not to be")
    max_tokens = 24
    plain = llm.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))[0]
    got = llm.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True,
                                              **penalties))[0].token_ids
    assert got != plain.token_ids  # the random model repeats itself, so every penalty changes something
    presence = penalties.get("presence_penalty", 0.0)
    frequency = penalties.get("frequency_penalty", 0.0)
    repetition = penalties.get("repetition_penalty", 1.0)
    expected: list[int] = []
    for _ in range(max_tokens):
        scores = reference_penalties(next_token_logits(llm, prompt + expected), prompt, expected, presence,
                                     frequency, repetition)
        top2 = scores.topk(2).values
        expected.append(int(scores.argmax()))
        if (top2[0] - top2[1]).item() < 1e-4:  # a near tie may go either way; everything before it must agree
            break
    assert got[:len(expected) - 1] == expected[:-1] and len(expected) > max_tokens // 2
