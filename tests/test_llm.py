"""The in-process API: LLM.load honours generation_config.json, generate() takes every prompt shape and rolls back
cleanly on a bad one, SamplingParams reject bad values with clear messages, RequestOutput's shortcuts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from support import family_config, make_checkpoint

from llmasos import LLM, CompletionOutput, RequestOutput, SamplingParams

PROMPT = [17, 93, 250, 41, 8, 77, 120]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Threads only slow a tiny model down on a busy machine (OpenMP workers wait for cores); restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny")
    make_checkpoint(directory, family_config("qwen2", num_hidden_layers=2))
    return directory


@pytest.fixture(scope="module")
def llm(checkpoint) -> LLM:
    return LLM.load(checkpoint, dtype="float32", num_kv_blocks=64)


def with_generation_config(checkpoint: Path, tmp_path: Path, **values) -> Path:
    directory = tmp_path / "model"
    shutil.copytree(checkpoint, directory)
    (directory / "generation_config.json").write_text(json.dumps(values))
    return directory


def test_generation_config_eos_ids_stop_generation(checkpoint, llm, tmp_path):
    sampled = dict(max_tokens=30, temperature=1.0, seed=3)
    free = llm.generate(PROMPT, SamplingParams(**sampled, ignore_eos=True))[0].token_ids
    stop_at = next(i for i in range(3, len(free)) if free[i] not in free[:i])
    eos = free[stop_at]
    custom = LLM.load(with_generation_config(checkpoint, tmp_path, eos_token_id=[1, eos]), dtype="float32",
                      num_kv_blocks=64)
    assert custom.eos_token_ids == {1, eos}
    stopped = custom.generate(PROMPT, SamplingParams(**sampled))[0]
    assert stopped.token_ids == free[:stop_at + 1]
    assert stopped.finish_reason == "stop" and stopped.outputs[0].stop_reason is None
    assert stopped.text == llm.tokenizer.decode(free[:stop_at], skip_special_tokens=True)
    ignored = custom.generate(PROMPT, SamplingParams(**sampled, ignore_eos=True))[0]
    assert ignored.token_ids == free and ignored.finish_reason == "length"


def test_ignore_eos_alone_runs_a_16k_context_model_to_max_tokens(tmp_path):
    """A suspected engine bug: with ignore_eos alone, a stream from the replica test's random 16k-context model
    "stopped after 28 tokens". It was the client: `next(response.iter_lines())` drops its line iterator at once, and
    httpcore closes the connection when that generator is collected, so the server aborts the stream (and meters what
    it sent). The engine itself runs every sequence to max_tokens, EOS drawn or not."""
    make_checkpoint(tmp_path, family_config("qwen2", num_hidden_layers=2, max_position_embeddings=16384), seed=3)
    llm = LLM.load(tmp_path, dtype="float32", num_kv_blocks=64)
    assert llm.engine.max_model_len == 16384 and llm.eos_token_ids == {1}
    params = [SamplingParams(max_tokens=200, ignore_eos=True, temperature=1.0, seed=seed, logit_bias={1: 3.0})
              for seed in range(4)]
    outputs = llm.generate([[5, 9, 13]] * 4, params)
    assert [(o.finish_reason, len(o.token_ids)) for o in outputs] == [("length", 200)] * 4
    assert sum(o.token_ids.count(1) for o in outputs) > 0  # EOS was drawn, and ignored


def test_generation_config_sampling_defaults(checkpoint, tmp_path):
    custom = LLM.load(with_generation_config(checkpoint, tmp_path, temperature=0.6, top_k=0, top_p=0.9),
                      num_kv_blocks=16)
    defaults = custom.default_sampling()
    assert (defaults.temperature, defaults.top_k, defaults.top_p) == (0.6, -1, 0.9)
    assert custom.default_sampling(temperature=0).temperature == 0


def test_do_sample_false_makes_the_default_greedy(checkpoint, llm, tmp_path):
    custom = LLM.load(with_generation_config(checkpoint, tmp_path, do_sample=False, temperature=0.9),
                      dtype="float32", num_kv_blocks=64)
    expected = llm.generate(PROMPT, SamplingParams(temperature=0))[0].token_ids
    assert custom.generate(PROMPT)[0].token_ids == expected


def test_a_broken_generation_config_is_named(checkpoint, tmp_path):
    directory = with_generation_config(checkpoint, tmp_path)
    (directory / "generation_config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"generation_config\.json is not valid JSON"):
        LLM.load(directory)


def test_generate_accepts_every_prompt_shape(llm):
    greedy = SamplingParams(max_tokens=5, temperature=0)
    text = "To be, or not to be"
    (from_text,) = llm.generate(text, greedy)
    (from_ids,) = llm.generate(llm.tokenizer.encode(text), greedy)
    assert from_text.token_ids == from_ids.token_ids and from_text.prompt == text and from_ids.prompt is None
    many = llm.generate([text, PROMPT], [greedy, SamplingParams(max_tokens=2, temperature=0)])
    assert [len(o.token_ids) for o in many] == [5, 2]
    assert llm.generate([PROMPT, PROMPT], greedy)[0].token_ids == llm.generate(PROMPT, greedy)[0].token_ids


def test_a_bad_prompt_rolls_back_the_whole_call(llm):
    greedy = SamplingParams(max_tokens=5, temperature=0)
    with pytest.raises(ValueError, match="got 1 SamplingParams for 2 prompts"):
        llm.generate([PROMPT, PROMPT], [greedy])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([PROMPT, PROMPT, [5, 100_000]], greedy)
    with pytest.raises(ValueError, match="maximum context length"):
        llm.generate([PROMPT, PROMPT * 100], greedy)
    metrics = llm.metrics()
    assert metrics["num_waiting"] == metrics["num_running"] == 0 and metrics["kv_cache_usage"] == 0.0
    assert not llm.engine.groups
    assert llm.generate(PROMPT, greedy)[0].finish_reason == "length"


def test_chat_generates_from_the_rendered_template(llm):
    messages = [{"role": "user", "content": "Hello there"}]
    greedy = SamplingParams(max_tokens=6, temperature=0)
    ids = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert llm.chat(messages, greedy)[0].token_ids == llm.generate(ids, greedy)[0].token_ids


def test_prompt_logprobs_refuse_bad_input(llm):
    with pytest.raises(ValueError, match="exceed the model's context of 512"):
        llm.prompt_logprobs([5] * 513)
    with pytest.raises(ValueError, match=r"outside the vocabulary \(0..383\)"):
        llm.prompt_logprobs([5, 384])
    assert llm.prompt_logprobs([]) == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_tokens=-1), "max_tokens must be an integer >= 0"),
    (dict(max_tokens=2.5), "max_tokens must be an integer"),
    (dict(n=0), "n must be an integer from 1 to 128"),
    (dict(temperature=-0.1), "temperature must be a number from 0 to 100"),
    (dict(top_p=0), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-2), "top_k must be -1"),
    (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
    (dict(seed="7"), "seed must be an integer"),
    (dict(logprobs=21), "logprobs must be an integer from 0 to 20"),
    (dict(presence_penalty=2.5), r"presence_penalty must be in \[-2, 2\]"),
    (dict(frequency_penalty=-3), r"frequency_penalty must be in \[-2, 2\]"),
    (dict(repetition_penalty=0), r"repetition_penalty must be in \(0, 10\]"),
    (dict(min_tokens=-1), "min_tokens must be an integer >= 0"),
    (dict(min_tokens=10, max_tokens=5), r"min_tokens \(10\) must not exceed max_tokens \(5\)"),
    (dict(stop=""), "stop must be a non-empty string"),
    (dict(stop=["ok", 3]), "stop must be a non-empty string or a list of them"),
    (dict(stop_token_ids=[-1]), "stop_token_ids must be a list of non-negative integers"),
    (dict(logit_bias={"abc": 1}), "logit_bias key 'abc' is not a token id"),
    (dict(logit_bias={5: 101}), r"logit_bias values must be in \[-100, 100\], got 101 for token 5"),
    (dict(logit_bias=[1, 2]), "logit_bias must map token ids to numbers"),
])
def test_sampling_params_validation_errors_are_clear(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_normalise_their_inputs():
    params = SamplingParams(stop="###", logit_bias={"12": 3}, stop_token_ids=None, temperature=0)
    assert params.stop_strings == ["###"] and params.logit_bias == {12: 3.0} and params.stop_token_ids == []
    assert params.greedy and not SamplingParams().greedy


def test_request_output_shortcuts_read_the_first_completion(llm):
    first = CompletionOutput(0, "hello", [4, 5], "stop", None, "###")
    second = CompletionOutput(1, "other", [6], None)
    output = RequestOutput("req-1", "prompt", [1, 2], [first, second], finished=False)
    assert (output.text, output.token_ids, output.finish_reason) == ("hello", [4, 5], "stop")
    assert first.finished and not second.finished
    real = llm.generate(PROMPT, SamplingParams(n=2, max_tokens=3, temperature=1.0, seed=1))[0]
    assert real.text == real.outputs[0].text and real.token_ids == real.outputs[0].token_ids
    assert real.finish_reason == real.outputs[0].finish_reason == "length" and real.finished
    assert real.prompt_token_ids == PROMPT and len(real.outputs) == 2
