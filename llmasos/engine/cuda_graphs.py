"""CUDA graphs for decode steps: on a GPU a small model's decode step is bound by kernel launches, not by math, so
pure-decode batches replay a captured forward (one graph per batch-size bucket) from static input buffers."""

from __future__ import annotations

import torch

from llmasos.models import CausalLM
from llmasos.models.attention import AttentionMetadata

BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)


class DecodeGraphs:
    """Captured decode forwards. Padding rows of a bucket write to a scratch block no request owns.

    Keys are gathered over a fixed width of `max_context` tokens, so steps whose contexts are longer run eagerly."""

    def __init__(self, model: CausalLM, kv_tensors, block_size: int, scratch_block: int, device: torch.device,
                 max_batch: int = 64, max_context: int = 2048) -> None:
        self.model, self.kv_tensors, self.block_size = model, kv_tensors, block_size
        self.sizes = [size for size in BATCH_SIZES if size <= max_batch]
        self.max_batch = self.sizes[-1]
        self.width = -(-max_context // block_size)
        self.max_context = self.width * block_size
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * block_size
        n = self.max_batch
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slots = torch.full((n,), self.scratch_slot, dtype=torch.long, device=device)
        self.tables = torch.full((n, self.width), scratch_block, dtype=torch.long, device=device)
        self.lengths = torch.ones(n, dtype=torch.long, device=device)
        self.token_index = torch.arange(n, device=device)
        self.key_positions = torch.arange(self.max_context, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._captured = False

    @staticmethod
    def supported(model: CausalLM) -> bool:
        rotary = getattr(model, "rotary", None)
        return rotary is None or not rotary.length_dependent  # per-sequence rope lengths are host-side values

    def _metadata(self, batch: int) -> AttentionMetadata:
        meta = AttentionMetadata(query_lens=[1] * batch, context_lens=[1] * batch, kv_cache=self.kv_tensors,
                                 slot_mapping=self.slots[:batch], block_tables=None, block_size=self.block_size)
        meta._decode.update(tables=self.tables[:batch], token_index=self.token_index[:batch],
                            lengths=self.lengths[:batch], key_positions=self.key_positions)
        return meta

    def capture(self) -> None:
        pool = None
        for batch in reversed(self.sizes):
            args = (self.input_ids[:batch], self.positions[:batch])
            self.model(*args, self._metadata(batch))  # warm-up: lazy initialisations happen outside the graph
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            meta = self._metadata(batch)  # fresh, so the masks are computed inside the graph
            with torch.cuda.graph(graph, pool):
                self.outputs[batch] = self.model(*args, meta)
            pool = graph.pool()
            self.graphs[batch] = graph
        torch.cuda.synchronize()
        self._captured = True

    def fits(self, num_seqs: int, max_context: int) -> bool:
        return num_seqs <= self.max_batch and max_context <= self.max_context

    def run(self, input_ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]],
            lengths: list[int]) -> torch.Tensor:
        if not self._captured:
            self.capture()
        count = len(input_ids)
        batch = next(size for size in self.sizes if size >= count)
        pad = batch - count
        device = self.input_ids.device
        self.input_ids[:batch].copy_(torch.tensor(input_ids + [0] * pad), non_blocking=True)
        self.positions[:batch].copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        self.slots[:batch].copy_(torch.tensor(slots + [self.scratch_slot] * pad), non_blocking=True)
        self.lengths[:batch].copy_(torch.tensor(lengths + [1] * pad), non_blocking=True)
        padded = [table + [self.scratch_block] * (self.width - len(table)) for table in tables]
        padded += [[self.scratch_block] * self.width] * pad
        self.tables[:batch].copy_(torch.tensor(padded, device="cpu").to(device, non_blocking=True))
        self.graphs[batch].replay()
        return self.outputs[batch][:count]
