"""Scheduler + KVCacheManager without any model: a fake "model" appends a token that depends only on the sequence,
and a fake paged cache checks that every scheduled request would read back exactly its own tokens."""

from __future__ import annotations

import random

import pytest

from llmasos.engine.kv_cache import KVCacheManager
from llmasos.engine.request import Request, RequestStatus
from llmasos.engine.scheduler import Scheduler, SchedulerOutput
from llmasos.sampling_params import SamplingParams


def fake_next_token(token_ids: list[int]) -> int:
    """A deterministic stand-in for a model: the next token depends on the whole sequence."""
    value = 17
    for token in token_ids:
        value = (value * 31 + token) % 1_000_003
    return value % 1000


class Driver:
    """Runs Scheduler steps the way LLMEngine.step does, checking the scheduler's invariants after each one."""

    def __init__(self, num_blocks: int, block_size: int = 4, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 2048, enable_prefix_caching: bool = True) -> None:
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, max_num_seqs, max_num_batched_tokens)
        self.cache: dict[int, int] = {}  # slot -> token id whose key/value the slot holds
        self.finished: list[Request] = []
        self.admission_order: list[str] = []

    def add(self, request_id: str, prompt_len: int, max_tokens: int, first_token: int = 0) -> Request:
        prompt = [(first_token + 7 * i) % 1000 for i in range(prompt_len)]
        request = Request(request_id, prompt, SamplingParams(max_tokens=max_tokens, temperature=0), set())
        self.scheduler.add(request)
        return request

    def step(self) -> SchedulerOutput:
        out = self.scheduler.schedule()
        assert out.num_tokens <= self.scheduler.max_num_batched_tokens
        assert len(self.scheduler.running) <= self.scheduler.max_num_seqs
        for request, _ in out.scheduled:
            if request.request_id not in self.admission_order:
                self.admission_order.append(request.request_id)
        # Like every attention layer: all new keys/values are written before anyone reads.
        for request, num_new in out.scheduled:
            start = request.num_computed_tokens
            assert num_new >= 1 and start + num_new <= request.num_tokens
            for position in range(start, start + num_new):
                self.cache[self.kv.slot(request, position)] = request.all_token_ids[position]
        for request, num_new in out.scheduled:
            context = request.num_computed_tokens + num_new
            read_back = [self.cache.get(self.kv.slot(request, p)) for p in range(context)]
            assert read_back == request.all_token_ids[:context], f"{request.request_id} would read wrong KV"
        self.scheduler.update(out)
        for request, _ in out.scheduled:
            if request.num_computed_tokens == request.num_tokens:
                request.append_token(fake_next_token(request.all_token_ids))
                if request.finished:
                    self.scheduler.finish(request)
                    self.finished.append(request)
        self.check_block_accounting()
        return out

    def check_block_accounting(self) -> None:
        holders: dict[int, int] = {}
        for request in self.scheduler.running:
            needed = self.kv.blocks_needed(request.num_computed_tokens)
            assert needed <= len(request.blocks) <= self.kv.blocks_needed(request.num_tokens)
            for block in request.blocks:
                holders[block.block_id] = holders.get(block.block_id, 0) + 1
        for request in self.scheduler.waiting:
            assert request.blocks == [] and request.num_computed_tokens == 0
        for block in self.kv.pool.blocks:
            assert block.ref_count == holders.get(block.block_id, 0), block
        assert self.kv.pool.num_free == sum(1 for b in self.kv.pool.blocks if b.ref_count == 0)

    def run(self, max_steps: int = 10_000) -> list[SchedulerOutput]:
        outs = []
        while self.scheduler.num_unfinished:
            outs.append(self.step())
            assert len(outs) < max_steps, "scheduler made no progress"
        assert self.kv.usage == 0.0
        return outs


def test_chunked_prefill_stays_under_the_token_budget():
    driver = Driver(num_blocks=64, max_num_batched_tokens=10)
    request = driver.add("a", prompt_len=25, max_tokens=3)
    counts, outputs = [], []
    while driver.scheduler.num_unfinished:
        out = driver.step()
        counts.append([n for _, n in out.scheduled])
        outputs.append(len(request.output_token_ids))
    assert counts == [[10], [10], [5], [1], [1]]
    assert outputs == [0, 0, 1, 2, 3]  # nothing is sampled until the whole prompt is computed
    assert request.finish_reason == "length"


def test_running_decodes_come_first_and_a_new_prompt_gets_the_rest_of_the_budget():
    driver = Driver(num_blocks=64, max_num_batched_tokens=10)
    first = driver.add("a", prompt_len=4, max_tokens=20)
    driver.step()
    second = driver.add("b", prompt_len=30, max_tokens=2)
    out = driver.step()
    assert [(r.request_id, n) for r, n in out.scheduled] == [("a", 1), ("b", 9)]
    out = driver.step()
    assert [(r.request_id, n) for r, n in out.scheduled] == [("a", 1), ("b", 9)]
    driver.run()
    assert len(first.output_token_ids) == 20 and len(second.output_token_ids) == 2


def test_max_num_seqs_caps_the_running_set():
    driver = Driver(num_blocks=64, max_num_seqs=2)
    requests = [driver.add(f"r{i}", prompt_len=3, max_tokens=2 + i) for i in range(5)]
    first = driver.step()
    assert [r.request_id for r, _ in first.scheduled] == ["r0", "r1"]
    assert [r.request_id for r in driver.scheduler.waiting] == ["r2", "r3", "r4"]
    driver.run()
    assert driver.admission_order == ["r0", "r1", "r2", "r3", "r4"]
    assert all(len(r.output_token_ids) == r.params.max_tokens for r in requests)


def test_first_come_first_served_a_big_request_is_not_overtaken():
    driver = Driver(num_blocks=6, block_size=4)
    hog = driver.add("hog", prompt_len=12, max_tokens=4, first_token=1)  # holds 3 to 4 blocks
    driver.step()
    big = driver.add("big", prompt_len=17, max_tokens=2, first_token=2)  # 5 blocks: cannot start beside `hog`
    small = driver.add("small", prompt_len=2, max_tokens=2, first_token=3)  # would fit, but arrived later
    while hog.status != RequestStatus.FINISHED:
        driver.step()
        assert big.status == RequestStatus.WAITING and small.status == RequestStatus.WAITING
    driver.run()
    assert driver.admission_order == ["hog", "big", "small"]


def test_the_most_recently_admitted_request_is_preempted_and_resumes_with_its_outputs():
    driver = Driver(num_blocks=6, block_size=4)
    a, b, c = (driver.add(name, prompt_len=4, max_tokens=8, first_token=i) for i, name in enumerate("abc"))
    preempting = None
    while preempting is None:
        out = driver.step()
        if out.preempted:
            preempting = out
    assert preempting.preempted == [c]
    assert [r.request_id for r, _ in preempting.scheduled] == ["a", "b"]
    assert c.status == RequestStatus.WAITING and c.blocks == [] and c.num_computed_tokens == 0
    assert driver.scheduler.waiting[0] is c and driver.scheduler.num_preemptions == 1
    generated_before = len(c.output_token_ids)
    assert generated_before > 0
    while True:
        out = driver.step()
        chunk = dict((r.request_id, n) for r, n in out.scheduled)
        if "c" in chunk:
            break
    # The recompute covers the prompt and every token generated before preemption.
    assert chunk["c"] == 4 + generated_before
    driver.run()
    for request in (a, b, c):
        expected = list(request.prompt_token_ids)
        for _ in range(8):
            expected.append(fake_next_token(expected))
        assert request.all_token_ids == expected  # no token lost or sampled twice


def test_preempting_every_other_request_when_one_alone_needs_the_whole_cache():
    driver = Driver(num_blocks=4, block_size=4)
    for i in range(3):
        driver.add(f"r{i}", prompt_len=5, max_tokens=11, first_token=i)  # 16 tokens = the whole cache
    driver.run()
    assert len(driver.finished) == 3 and driver.scheduler.num_preemptions >= 1
    assert all(len(r.output_token_ids) == 11 for r in driver.finished)


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_random_load_on_a_tight_cache_matches_a_roomy_one(enable_prefix_caching):
    rng = random.Random(4)
    specs = [(f"r{i}", rng.randint(1, 40), rng.randint(1, 30), rng.choice([0, 0, 5, 9])) for i in range(40)]

    def run(num_blocks: int, budget: int) -> tuple[dict[str, list[int]], int]:
        driver = Driver(num_blocks=num_blocks, block_size=4, max_num_seqs=12, max_num_batched_tokens=budget,
                        enable_prefix_caching=enable_prefix_caching)
        for name, prompt_len, max_tokens, first in specs:  # shared first tokens make shared prefixes
            driver.add(name, prompt_len, max_tokens, first_token=first)
        driver.run()
        return {r.request_id: r.output_token_ids for r in driver.finished}, driver.scheduler.num_preemptions

    roomy, roomy_preemptions = run(num_blocks=1000, budget=4096)
    tight, tight_preemptions = run(num_blocks=18, budget=24)
    assert roomy_preemptions == 0 and tight_preemptions > 0
    assert tight == roomy
    assert all(len(roomy[name]) == max_tokens for name, _, max_tokens, _ in specs)


def test_prefix_hits_are_counted_at_first_admission():
    driver = Driver(num_blocks=32, block_size=4)
    first = driver.add("a", prompt_len=12, max_tokens=2)
    driver.run()
    second = driver.add("b", prompt_len=12, max_tokens=2)  # same tokens: blocks 0-1 cached, the last token not
    third = driver.add("c", prompt_len=14, max_tokens=2)  # same first 12 tokens: 3 blocks cached
    out = driver.step()
    assert dict((r.request_id, n) for r, n in out.scheduled) == {"b": 4, "c": 2}
    assert (second.num_cached_tokens, third.num_cached_tokens) == (8, 12)
    driver.run()
    assert first.num_cached_tokens == 0
    assert driver.scheduler.prefix_cache_hit_rate == pytest.approx((8 + 12) / (12 + 12 + 14))


def test_finishing_a_waiting_or_running_request_frees_it():
    driver = Driver(num_blocks=16, max_num_seqs=1)
    running = driver.add("a", prompt_len=6, max_tokens=50)
    waiting = driver.add("b", prompt_len=6, max_tokens=50)
    driver.step()
    assert running.status == RequestStatus.RUNNING and waiting.status == RequestStatus.WAITING
    driver.scheduler.finish(waiting)
    driver.scheduler.finish(running)
    assert driver.scheduler.num_unfinished == 0 and driver.kv.usage == 0.0
    assert running.status == waiting.status == RequestStatus.FINISHED


def test_invalid_limits_are_rejected():
    kv = KVCacheManager(4, 4)
    with pytest.raises(ValueError, match="max_num_seqs"):
        Scheduler(kv, max_num_seqs=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(kv, max_num_batched_tokens=0)


def test_max_loras_caps_distinct_adapters_running_and_later_requests_go_ahead():
    kv = KVCacheManager(64, 4)
    scheduler = Scheduler(kv, max_num_seqs=16, max_num_batched_tokens=256, max_loras=2)
    requests = []
    for i, lora_id in enumerate([1, 2, 3, None, 1]):
        request = Request(f"r{i}", [i + 3] * 5, SamplingParams(max_tokens=4, temperature=0), set())
        request.lora_id = lora_id
        scheduler.add(request)
        requests.append(request)
    out = scheduler.schedule()
    assert [r.request_id for r, _ in out.scheduled] == ["r0", "r1", "r3", "r4"]  # r2's adapter has no slot
    assert [r.request_id for r in scheduler.waiting] == ["r2"]
    scheduler.update(out)
    scheduler.finish(requests[1])  # adapter 2 is no longer running: adapter 3 fits
    assert [r.request_id for r, _ in scheduler.schedule().scheduled][-1] == "r2"
