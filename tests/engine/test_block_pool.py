"""BlockPool without any model: reference counts, LRU eviction order, cached-block reuse and hash-collision checks."""

from __future__ import annotations

from llmasos.engine.block_pool import BlockPool
from llmasos.engine.kv_cache import KVCacheManager
from llmasos.engine.request import Request
from llmasos.sampling_params import SamplingParams


def test_allocate_and_free_count_references():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert [b.ref_count for b in blocks] == [1, 1, 1]
    assert len({b.block_id for b in blocks}) == 3
    assert pool.num_free == 1
    pool.take(blocks[:1])  # a second owner of the first block
    assert blocks[0].ref_count == 2
    pool.free(blocks)
    assert [b.ref_count for b in blocks] == [1, 0, 0]
    assert pool.num_free == 3  # the shared block is still held by its other owner
    pool.free(blocks[:1])
    assert blocks[0].ref_count == 0 and pool.num_free == 4


def test_uncached_free_blocks_are_reused_before_cached_ones():
    pool = BlockPool(3)
    cached, plain, other = pool.allocate(3)
    pool.register(cached, 111, (1, 2))
    pool.free([cached])
    pool.free([plain])
    pool.free([other])
    # The cached block was freed first, but plain blocks cost nothing to hand out, so they go first.
    first, second = pool.allocate(2)
    assert {first.block_id, second.block_id} == {plain.block_id, other.block_id}
    assert pool.lookup(111, (1, 2)) is cached
    (third,) = pool.allocate(1)
    assert third is cached
    assert pool.lookup(111, (1, 2)) is None  # evicted: its content is gone from the index
    assert third.block_hash is None and third.token_ids is None


def test_cached_blocks_are_evicted_least_recently_freed_first():
    pool = BlockPool(4)
    blocks = pool.allocate(4)
    for i, block in enumerate(blocks):
        pool.register(block, 1000 + i, (i,))
    for i in (2, 0, 3, 1):  # free order, oldest first
        pool.free([blocks[i]])
    evicted = [pool.allocate(1)[0].block_id for _ in range(4)]
    assert evicted == [blocks[i].block_id for i in (2, 0, 3, 1)]


def test_a_cache_hit_leaves_the_free_queue_and_is_not_evicted():
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    pool.register(a, 7, (5, 6))
    pool.free([a, b, c])
    hit = pool.lookup(7, (5, 6))
    assert hit is a
    pool.take([hit])
    assert a.ref_count == 1 and pool.num_free == 2
    fresh = pool.allocate(2)
    assert a not in fresh
    assert pool.lookup(7, (5, 6)) is a  # still cached while in use
    pool.free([a])
    assert pool.num_free == 1 and pool.lookup(7, (5, 6)) is a  # freed but its content is kept until reused


def test_hash_collision_is_caught_by_comparing_tokens():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.register(block, 42, (1, 2, 3))
    assert pool.lookup(42, (1, 2, 3)) is block
    assert pool.lookup(42, (1, 2, 4)) is None  # same hash, different tokens: not a hit
    assert pool.lookup(43, (1, 2, 3)) is None


def test_first_writer_wins_on_duplicate_content():
    pool = BlockPool(2)
    first, second = pool.allocate(2)
    pool.register(first, 9, (1,))
    pool.register(second, 9, (1,))
    assert pool.lookup(9, (1,)) is first
    pool.free([second, first])
    (evicted,) = pool.allocate(1)
    assert evicted is second
    assert pool.lookup(9, (1,)) is first  # evicting the duplicate must not drop the original from the index


def test_prefix_caching_disabled_registers_nothing():
    pool = BlockPool(2, enable_prefix_caching=False)
    (block,) = pool.allocate(1)
    pool.register(block, 5, (1,))
    assert block.block_hash is None and pool.lookup(5, (1,)) is None


def test_reset_prefix_cache_forgets_everything():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.register(a, 1, (1,))
    pool.register(b, 2, (2,))
    pool.free([a, b])
    pool.reset_prefix_cache()
    assert pool.lookup(1, (1,)) is None and pool.lookup(2, (2,)) is None
    assert pool.num_free == 2


def _request(request_id: str, token_ids: list[int]) -> Request:
    return Request(request_id, token_ids, SamplingParams(max_tokens=4, temperature=0), set())


def test_a_freed_prefix_is_evicted_tail_first():
    """A request's blocks are freed last block first, so the prefix's head (shared most often) stays cached longest."""
    kv = KVCacheManager(num_blocks=4, block_size=4)
    request = _request("a", list(range(16)))
    assert kv.allocate(request, 16)
    held = [block.block_id for block in request.blocks]
    kv.free(request)
    evicted = [kv.pool.allocate(1)[0].block_id for _ in range(4)]
    assert evicted == list(reversed(held))


def test_kv_manager_reuses_a_cached_prefix_and_always_recomputes_the_last_token():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    first = _request("a", list(range(12)))
    assert kv.allocate(first, 12)
    first_ids = [block.block_id for block in first.blocks]
    kv.free(first)
    same = _request("b", list(range(12)))
    hits = kv.find_cached_prefix(same)
    # 12 tokens = 3 full blocks, but the last token's logits are needed, so only 2 blocks come from the cache.
    assert [block.block_id for block in hits] == first_ids[:2]
    assert kv.allocate(same, 12 - 8, hits)
    assert same.num_computed_tokens == 8 and len(same.blocks) == 3
    longer = _request("c", list(range(12)) + [99, 98, 97, 96, 95])
    assert len(kv.find_cached_prefix(longer)) == 3  # the third block was registered when `same` was scheduled
    different = _request("d", [1000] + list(range(1, 12)))
    assert kv.find_cached_prefix(different) == []  # chained hash: a different first block breaks every later hit


def test_kv_manager_refuses_without_side_effects_when_short():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    big = _request("a", list(range(20)))
    assert not kv.allocate(big, 20)
    assert big.blocks == [] and big.num_computed_tokens == 0 and kv.pool.num_free == 3
    assert kv.usage == 0.0
    small = _request("b", list(range(5)))
    assert kv.allocate(small, 5)
    assert abs(kv.usage - 2 / 3) < 1e-9
    kv.free(small)
    assert kv.usage == 0.0


def test_kv_manager_keys_cached_blocks_by_lora_adapter():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    tokens = list(range(13))
    first = _request("a", tokens)
    first.lora_id = 1
    assert kv.allocate(first, 13)
    kv.free(first)
    for lora_id, expected in ((None, 0), (2, 0), (1, 3)):
        request = _request(f"r{lora_id}", tokens)
        request.lora_id = lora_id
        assert len(kv.find_cached_prefix(request)) == expected, lora_id
