"""BlockPool: the physical KV blocks (pages) with reference counts, an LRU free queue and the prefix-cache index."""

from __future__ import annotations

from collections import OrderedDict


class Block:
    __slots__ = ("block_id", "ref_count", "block_hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None  # kept to verify cache hits against hash collisions

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_count}, cached={self.block_hash is not None})"


class BlockPool:
    """Free blocks wait in least-recently-freed order; a freed block keeps its cached content until it is reused,
    so a later request with the same prefix can take it back (prefix caching with LRU eviction)."""

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        assert num_blocks > 0
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[int, Block] = {}

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free, including cached ones that would be evicted)."""
        return len(self.free_queue)

    def allocate(self, count: int) -> list[Block]:
        assert count <= len(self.free_queue), "caller must check num_free first"
        taken = []
        for _ in range(count):
            _, block = self.free_queue.popitem(last=False)
            if block.block_hash is not None:  # evict its cached content
                if self.cached.get(block.block_hash) is block:
                    del self.cached[block.block_hash]
                block.block_hash = block.token_ids = None
            block.ref_count = 1
            taken.append(block)
        return taken

    def lookup(self, block_hash: int, token_ids: tuple[int, ...]) -> Block | None:
        block = self.cached.get(block_hash)
        if block is None or block.token_ids != token_ids:
            return None
        return block

    def take(self, blocks: list[Block]) -> None:
        """Add a reference to cache hits; a hit sitting in the free queue leaves it."""
        for block in blocks:
            if block.ref_count == 0:
                del self.free_queue[block.block_id]
            block.ref_count += 1

    def free(self, blocks: list[Block]) -> None:
        """Drop one reference from each block; the caller passes a request's blocks tail first, so a prefix's last
        blocks are evicted before its first ones."""
        for block in blocks:
            block.ref_count -= 1
            assert block.ref_count >= 0
            if block.ref_count == 0:
                if block.block_hash is None:
                    self.free_queue[block.block_id] = block
                    self.free_queue.move_to_end(block.block_id, last=False)  # uncached: reuse first
                else:
                    self.free_queue[block.block_id] = block

    def register(self, block: Block, block_hash: int, token_ids: tuple[int, ...]) -> None:
        """Make a full block findable by its chained hash (first writer wins on a duplicate)."""
        if not self.enable_prefix_caching or block.block_hash is not None:
            return
        block.block_hash, block.token_ids = block_hash, token_ids
        self.cached.setdefault(block_hash, block)

    def reset_prefix_cache(self) -> None:
        for block in self.cached.values():
            block.block_hash = block.token_ids = None
        self.cached.clear()
