"""KV cache: the preallocated tensors (sized from a memory budget) and the per-request block accounting on top of
the BlockPool (allocation, prefix-cache lookup by chained hash, freeing)."""

from __future__ import annotations

import re

import psutil
import torch

from llmasos.engine.block_pool import Block, BlockPool
from llmasos.engine.request import Request
from llmasos.models.config import ModelConfig

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | float | str) -> int:
    """4 << 30, "4GiB", "512MB", "1.5g" -> bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {value}")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"kv_cache_memory {value!r} is not a size; use bytes or a string like '4GiB' or '512MB'")
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError(f"kv_cache_memory must be positive, got {value!r}")
    return size


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim * element


def default_kv_memory(device: torch.device) -> int:
    """A sensible share of what is free: 90% of free GPU memory, or a quarter of available RAM capped at 8 GiB."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.9)
    return min(psutil.virtual_memory().available // 4, 8 << 30)


def allocate_kv_tensors(config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                        device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (config.num_hidden_layers, 2, num_blocks, block_size, config.num_key_value_heads, config.head_dim)
    pool = torch.zeros(shape, dtype=dtype, device=device)
    return [(pool[i, 0], pool[i, 1]) for i in range(config.num_hidden_layers)]


class KVCacheManager:
    """Gives requests blocks for the tokens they are about to compute, reusing cached prefix blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.enable_prefix_caching = enable_prefix_caching

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        """Share of blocks held by requests (cached-but-free blocks count as free)."""
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _hashes(self, request: Request, num_full_blocks: int) -> list[int]:
        """Chained hashes of the request's first num_full_blocks full blocks (extended lazily, kept on the request)."""
        hashes, size, tokens = request.block_hashes, self.block_size, request.all_token_ids
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            # A LoRA adapter changes every layer's K and V: its chain starts from its own root, never the base's.
            parent = hashes[-1] if hashes else (None if request.lora_id is None else ("lora", request.lora_id))
            hashes.append(hash((parent, tuple(tokens[i * size:(i + 1) * size]))))
        return hashes

    def _block_key(self, request: Request, i: int) -> tuple:
        """What a cache hit is verified against besides the hash: the block's tokens (and the adapter's id)."""
        tokens = tuple(request.all_token_ids[i * self.block_size:(i + 1) * self.block_size])
        return tokens if request.lora_id is None else (("lora", request.lora_id), *tokens)

    def find_cached_prefix(self, request: Request) -> list[Block]:
        """Cached blocks matching the request's leading full blocks. The last token is always recomputed, since
        its logits are needed to sample. A request scoring its prompt computes every position itself."""
        if not self.enable_prefix_caching or request.wants_prompt_logprobs:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[Block] = []
        for i, block_hash in enumerate(self._hashes(request, max_blocks)):
            block = self.pool.lookup(block_hash, self._block_key(request, i))
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate(self, request: Request, num_new_tokens: int, cached: list[Block] | None = None) -> bool:
        """Reserve blocks so `num_new_tokens` more tokens fit; False (and no change) when the pool is short."""
        cached = cached or []
        total = request.num_computed_tokens + len(cached) * self.block_size + num_new_tokens
        needed = self.blocks_needed(total) - len(request.blocks) - len(cached)
        evictable_hits = sum(1 for block in cached if block.ref_count == 0)
        if needed > self.pool.num_free - evictable_hits:
            return False
        if cached:
            self.pool.take(cached)
            request.blocks.extend(cached)
            request.num_computed_tokens += len(cached) * self.block_size
        if needed > 0:
            request.blocks.extend(self.pool.allocate(needed))
        self._register_full_blocks(request, total)
        return True

    def _register_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Full blocks become findable as soon as they are scheduled: the forward that fills them runs before any
        later step can read them, and a same-step reader sees them because every layer writes before it attends."""
        if not self.enable_prefix_caching:
            return
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        hashes = self._hashes(request, num_full)
        for i in range(num_full):
            block = request.blocks[i]
            if block.block_hash is None:
                self.pool.register(block, hashes[i], self._block_key(request, i))

    def free(self, request: Request) -> None:
        self.pool.free(list(reversed(request.blocks)))
        request.blocks = []

    def slot(self, request: Request, position: int) -> int:
        return request.blocks[position // self.block_size].block_id * self.block_size + position % self.block_size
