"""LLMEngine on a tiny random checkpoint (CPU): batching, chunked prefill, preemption, prefix caching, n > 1, abort
and streaming must never change what a request generates, only how it is scheduled."""

from __future__ import annotations

import random

import pytest

from llmasos import LLM, SamplingParams


def random_prompts(count: int, min_len: int, max_len: int, seed: int = 0) -> list[list[int]]:
    """Token-id prompts avoiding the special ids 0-4 (bos, eos, pad and the chat markers)."""
    rng = random.Random(seed)
    return [[rng.randrange(5, 384) for _ in range(rng.randint(min_len, max_len))] for _ in range(count)]


def greedy(max_tokens: int, **extra) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, **extra)


def test_forty_concurrent_requests_match_each_request_run_alone(tiny_checkpoint):
    rng = random.Random(1)
    prompts = random_prompts(40, 1, 150, seed=1)
    params = [greedy(rng.randint(1, 40)) for _ in prompts]
    # A small token budget and sequence cap force chunked prefills, queueing and mixed prefill/decode steps.
    llm = LLM.load(tiny_checkpoint, dtype="float32", num_kv_blocks=600, max_num_batched_tokens=64, max_num_seqs=16)
    engine = llm.engine
    ids = [engine.add_request(p, s) for p, s in zip(prompts, params, strict=True)]
    done, peak_running, mixed_steps = {}, 0, 0
    while len(done) < len(ids):
        running_before = {r.request_id: r.num_computed_tokens < r.num_prompt_tokens
                          for r in engine.scheduler.running}
        for group in engine.step():
            if group.finished:
                done[group.request_id] = group.output()
        peak_running = max(peak_running, llm.metrics()["num_running"])
        if any(running_before.values()) and not all(running_before.values()):
            mixed_steps += 1
    assert peak_running == 16 and mixed_steps > 0
    alone = LLM.load(tiny_checkpoint, dtype="float32", num_kv_blocks=64, enable_prefix_caching=False)
    for request_id, prompt, sampling in zip(ids, prompts, params, strict=True):
        expected = alone.generate(prompt, sampling)[0]
        got = done[request_id]
        assert got.token_ids == expected.token_ids, request_id
        assert got.text == expected.text and got.finish_reason == expected.finish_reason
        assert len(got.token_ids) == sampling.max_tokens or got.finish_reason == "stop"
    assert llm.metrics()["kv_cache_usage"] == 0.0


def test_a_cache_far_too_small_preempts_and_still_gives_identical_outputs(tiny_checkpoint):
    prompts = random_prompts(24, 45, 55, seed=2)
    sampling = greedy(64, ignore_eos=True)
    tight = LLM.load(tiny_checkpoint, dtype="float32", num_kv_blocks=12, block_size=16)
    roomy = LLM.load(tiny_checkpoint, dtype="float32", num_kv_blocks=400, block_size=16)
    tight_outputs = tight.generate(prompts, sampling)
    roomy_outputs = roomy.generate(prompts, sampling)
    assert tight.metrics()["num_preemptions"] > 0
    assert roomy.metrics()["num_preemptions"] == 0
    for got, expected in zip(tight_outputs, roomy_outputs, strict=True):
        assert got.finish_reason == "length" and len(got.token_ids) == 64
        assert got.token_ids == expected.token_ids
    assert tight.metrics()["kv_cache_usage"] == 0.0


def test_a_request_that_can_never_fit_is_rejected_and_the_others_are_undisturbed(tiny_checkpoint):
    llm = LLM.load(tiny_checkpoint, dtype="float32", num_kv_blocks=8, block_size=16)  # 128 tokens in all
    prompts = random_prompts(3, 20, 40, seed=3)
    sampling = greedy(30)
    ids = [llm.engine.add_request(p, sampling) for p in prompts]
    llm.engine.step()
    with pytest.raises(ValueError, match="KV blocks.*num_kv_blocks"):
        llm.engine.add_request(random_prompts(1, 100, 100, seed=4)[0], greedy(50))
    with pytest.raises(ValueError, match="maximum context length is 512"):
        llm.engine.add_request([5] * 10, greedy(503))
    with pytest.raises(ValueError, match="empty"):
        llm.engine.add_request([], greedy(5))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.engine.add_request([5, 384], greedy(5))
    done = llm.engine.run_to_completion(ids)
    roomy = LLM.load(tiny_checkpoint, dtype="float32", num_kv_blocks=64)
    for request_id, expected in zip(ids, roomy.generate(prompts, sampling), strict=True):
        assert done[request_id].token_ids == expected.token_ids
    metrics = llm.metrics()
    assert metrics["num_waiting"] == metrics["num_running"] == 0 and metrics["kv_cache_usage"] == 0.0


def test_a_long_shared_prefix_is_served_from_the_cache(tiny_checkpoint):
    prefix = random_prompts(1, 192, 192, seed=5)[0]
    tails = random_prompts(12, 3, 9, seed=6)
    prompts = [prefix + tail for tail in tails]
    sampling = greedy(12)
    cached = LLM.load(tiny_checkpoint, dtype="float32", num_kv_blocks=200)
    uncached = LLM.load(tiny_checkpoint, dtype="float32", num_kv_blocks=200, enable_prefix_caching=False)
    # First wave together (hits on blocks scheduled in the same step), second wave later (hits on freed blocks).
    got = cached.generate(prompts[:6], sampling) + cached.generate(prompts[6:], sampling)
    expected = uncached.generate(prompts[:6], sampling) + uncached.generate(prompts[6:], sampling)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert cached.metrics()["prefix_cache_hit_rate"] > 0.5
    assert uncached.metrics()["prefix_cache_hit_rate"] == 0.0
    assert got[0].num_cached_tokens == 0 and all(o.num_cached_tokens == 192 for o in got[1:])


def test_n_samples_share_the_prompt_blocks(tiny_checkpoint):
    prompt = random_prompts(1, 70, 70, seed=7)[0]
    sampling = SamplingParams(n=4, max_tokens=10, temperature=1.0, seed=11, ignore_eos=True)
    llm = LLM.load(tiny_checkpoint, dtype="float32", num_kv_blocks=100)
    request_id = llm.engine.add_request(prompt, sampling)
    children = [llm.engine.core.requests[choice.request_id] for choice in llm.engine.groups[request_id].children]
    llm.engine.step()
    tables = [[block.block_id for block in child.blocks] for child in children]
    shared = (len(prompt) - 1) // 16  # full prompt blocks; the last prompt token is always computed per child
    assert all(table[:shared] == tables[0][:shared] for table in tables)
    assert len({table[shared] for table in tables}) == 4  # each child writes its own tail
    output = llm.engine.run_to_completion([request_id])[request_id]
    assert [c.index for c in output.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 10 for c in output.outputs)
    assert len({tuple(c.token_ids) for c in output.outputs}) > 1  # seeds seed+index give different samples
    assert llm.metrics()["prefix_cache_hit_rate"] == pytest.approx(3 * shared * 16 / (4 * 70))
    unshared = LLM.load(tiny_checkpoint, dtype="float32", num_kv_blocks=100, enable_prefix_caching=False)
    again = unshared.generate(prompt, sampling)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in output.outputs]
    same = llm.generate(prompt, greedy(8, n=3))[0]
    assert len(same.outputs) == 3 and len({tuple(c.token_ids) for c in same.outputs}) == 1


def test_abort_frees_the_cache_and_leaves_other_requests_alone(tiny_checkpoint):
    llm = LLM.load(tiny_checkpoint, dtype="float32", num_kv_blocks=64, max_num_seqs=2)
    engine = llm.engine
    prompts = random_prompts(3, 30, 40, seed=8)
    sampling = greedy(20)
    keep, running_victim, waiting_victim = (engine.add_request(p, sampling) for p in prompts)
    for _ in range(3):
        engine.step()
    assert llm.metrics()["num_running"] == 2 and llm.metrics()["num_waiting"] == 1
    assert llm.metrics()["kv_cache_usage"] > 0
    assert engine.abort(waiting_victim) and engine.abort(running_victim)
    assert not engine.abort(running_victim) and not engine.abort("no-such-request")
    assert llm.metrics()["num_running"] == 1 and llm.metrics()["num_waiting"] == 0
    done = engine.run_to_completion([keep])
    expected = LLM.load(tiny_checkpoint, dtype="float32", num_kv_blocks=64).generate(prompts[0], sampling)[0]
    assert done[keep].token_ids == expected.token_ids
    late = engine.add_request(prompts[1], sampling)
    engine.step()
    assert llm.metrics()["kv_cache_usage"] > 0
    engine.abort(late)
    assert llm.metrics()["kv_cache_usage"] == 0.0 and not engine.has_unfinished()


def test_run_to_completion_refuses_unknown_ids_instead_of_hanging(tiny_checkpoint):
    llm = LLM.load(tiny_checkpoint, dtype="float32", num_kv_blocks=16)
    with pytest.raises(ValueError, match="unknown request id 'nope'"):
        llm.engine.run_to_completion(["nope"])
    request_id = llm.engine.add_request([5, 6, 7], greedy(3))
    llm.engine.run_to_completion([request_id])
    with pytest.raises(ValueError, match="finished already"):
        llm.engine.run_to_completion([request_id])


def test_streamed_deltas_add_up_to_the_final_output(tiny_checkpoint):
    llm = LLM.load(tiny_checkpoint, dtype="float32", num_kv_blocks=64)
    prompt = "To be, or not to be"
    sampling = SamplingParams(max_tokens=25, temperature=0.8, seed=3)
    request_id = llm.engine.add_request(prompt, sampling)
    text, token_ids, finished_flags = "", [], []
    while True:
        groups = [g for g in llm.engine.step() if g.request_id == request_id]
        if not groups:
            continue
        delta = groups[0].output(delta=True)
        text += delta.text
        token_ids += delta.token_ids
        finished_flags.append(delta.finished)
        if delta.finished:
            break
    full = llm.generate(prompt, sampling)[0]
    assert token_ids == full.token_ids and text == full.text
    assert finished_flags[-1] and not any(finished_flags[:-1])
    assert full.prompt == prompt and full.prompt_token_ids == llm.tokenizer.encode(prompt)


def test_max_tokens_zero_finishes_without_running(tiny_checkpoint):
    llm = LLM.load(tiny_checkpoint, dtype="float32", num_kv_blocks=16)
    (output,) = llm.generate([[5, 6, 7]], greedy(0))
    assert output.finished and output.token_ids == [] and output.finish_reason == "length"
    assert llm.metrics()["num_generated_tokens"] == 0


@pytest.mark.slow
def test_a_thousand_sequential_requests_do_not_grow_memory(tiny_checkpoint):
    psutil = pytest.importorskip("psutil")
    llm = LLM.load(tiny_checkpoint, dtype="float32", num_kv_blocks=256)
    prompts = random_prompts(1100, 4, 24, seed=9)
    sampling = greedy(4, ignore_eos=True)
    process = psutil.Process()
    for prompt in prompts[:100]:  # warm-up: allocator pools, mask caches, prefix-cache index fill up
        llm.generate(prompt, sampling)
    before = process.memory_info().rss
    for prompt in prompts[100:]:
        llm.generate(prompt, sampling)
    after = process.memory_info().rss
    assert after <= before * 1.05, f"RSS grew from {before / 2**20:.1f} MiB to {after / 2**20:.1f} MiB"
    assert not llm.engine.groups and llm.metrics()["kv_cache_usage"] == 0.0


def test_everything_at_once_on_a_tight_cache_matches_each_request_alone(tiny_checkpoint):
    """n > 1, shared prefixes, seeded sampling, penalties, logprobs, eos, chunked prefill and preemption together."""
    rng = random.Random(10)
    prefixes = random_prompts(3, 10, 60, seed=11)
    prompts, params = [], []
    for _ in range(30):
        prompts.append(rng.choice(prefixes) + [rng.randrange(5, 384) for _ in range(rng.randint(1, 30))])
        params.append(SamplingParams(n=rng.choice([1, 1, 2, 3]), max_tokens=rng.randint(1, 40),
                                     temperature=rng.choice([0, 1.0]), top_k=rng.choice([-1, 20]),
                                     seed=rng.randrange(1000), ignore_eos=rng.choice([True, False]),
                                     logprobs=rng.choice([None, 2]), presence_penalty=rng.choice([0, 0.5]),
                                     repetition_penalty=rng.choice([1, 1.2])))
    tight = LLM.load(tiny_checkpoint, dtype="float32", num_kv_blocks=14, block_size=8, max_num_batched_tokens=40,
                     max_num_seqs=10)
    outputs = tight.generate(prompts, params)
    metrics = tight.metrics()
    assert metrics["num_preemptions"] > 0 and metrics["prefix_cache_hit_rate"] > 0.3
    alone = LLM.load(tiny_checkpoint, dtype="float32", num_kv_blocks=64, enable_prefix_caching=False)
    for prompt, sampling, got in zip(prompts, params, outputs, strict=True):
        expected = alone.generate(prompt, sampling)[0]
        assert len(got.outputs) == sampling.n
        for mine, theirs in zip(got.outputs, expected.outputs, strict=True):
            assert (mine.token_ids, mine.text, mine.finish_reason) == (
                theirs.token_ids, theirs.text, theirs.finish_reason)
            if sampling.logprobs is not None:
                for ours, reference in zip(mine.logprobs, theirs.logprobs, strict=True):
                    assert ours.keys() == reference.keys()
                    assert all(abs(ours[t] - reference[t]) < 1e-4 for t in ours)


def test_engine_limits_are_validated(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"max_model_len must be an integer from 1 to this model's context length "
                                         r"\(512\), got 1000"):
        LLM.load(tiny_checkpoint, max_model_len=1000)
    short = LLM.load(tiny_checkpoint, max_model_len=100, num_kv_blocks=16)
    with pytest.raises(ValueError, match="maximum context length is 100 tokens, but the request needs 110"):
        short.generate([5] * 90, greedy(20))
    assert short.generate([5] * 90, greedy(10))[0].finish_reason in ("length", "stop")
    # 2 layers x (key + value) x 16 slots x 2 kv heads x 16 dims x 4 bytes = 8 KiB per block.
    sized = LLM.load(tiny_checkpoint, dtype="float32", kv_cache_memory="1MB")
    assert sized.metrics()["num_kv_blocks"] == 1_000_000 // 8192
    with pytest.raises(ValueError, match="smaller than one KV block"):
        LLM.load(tiny_checkpoint, dtype="float32", kv_cache_memory="1KB")
    with pytest.raises(ValueError, match="'lots' is not a size"):
        LLM.load(tiny_checkpoint, kv_cache_memory="lots")
    for bad in (dict(block_size=0), dict(num_kv_blocks=0), dict(max_num_seqs=0), dict(max_num_batched_tokens=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LLM.load(tiny_checkpoint, **bad)


def test_a_failed_step_aborts_its_requests_and_the_engine_goes_on(tiny_checkpoint):
    from llmasos.engine.llm_engine import StepError

    llm = LLM.load(tiny_checkpoint, dtype="float32")
    prompts = random_prompts(3, 40, 60, seed=9)
    expected = [o.token_ids for o in llm.generate(prompts, greedy(8))]
    failures = {"left": 1}

    def fail_once(_module, _inputs):  # what a CUDA out-of-memory error looks like to the engine
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("simulated out of memory in the forward")

    handle = llm.model.register_forward_pre_hook(fail_once)
    try:
        ids = [llm.engine.add_request(p, greedy(8)) for p in prompts]
        with pytest.raises(StepError) as info:
            llm.engine.step()
        assert sorted(info.value.request_ids) == sorted(ids)
        assert llm.metrics()["kv_cache_usage"] == 0.0 and llm.metrics()["num_running"] == 0
        assert not llm.engine.kv.pool.cached  # nothing half-written can be served from the prefix cache
        assert [o.token_ids for o in llm.generate(prompts, greedy(8))] == expected
    finally:
        handle.remove()
