"""ModelRunner: turns a scheduled step into one batched forward over the paged KV cache, then samples."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import torch

from llmasos.engine.cuda_graphs import DecodeGraphs
from llmasos.engine.kv_cache import KVCacheManager, allocate_kv_tensors
from llmasos.engine.lora import LoRAManager
from llmasos.engine.request import Request
from llmasos.engine.sampler import sample
from llmasos.engine.structured_output import GrammarCompiler
from llmasos.models import CausalLM
from llmasos.models.attention import AttentionMetadata, sdpa_backends


class ModelRunner:
    def __init__(self, model: CausalLM, kv: KVCacheManager, dtype: torch.dtype, device: torch.device,
                 enforce_eager: bool = False, max_model_len: int | None = None,
                 grammars: GrammarCompiler | None = None, lora: LoRAManager | None = None) -> None:
        self.model = model
        self.lora = lora
        self.grammars = grammars
        # Structured output: compute the token bitmasks on a worker thread while the forward runs (llguidance drops
        # the GIL); False computes them after the forward (see docs/performance.md for which is faster where).
        self.overlap_masks = True
        self._mask_worker: ThreadPoolExecutor | None = None
        self.mask_seconds: list[float] = []  # per step with constrained rows: time to fill the bitmask (benchmarks)
        self.kv = kv
        self.device = device
        use_graphs = device.type == "cuda" and not enforce_eager and DecodeGraphs.supported(model)
        # With CUDA graphs, one extra block takes the writes of a bucket's padding rows.
        num_blocks = kv.num_blocks + (1 if use_graphs else 0)
        self.kv_tensors = allocate_kv_tensors(model.config, num_blocks, kv.block_size, dtype, device)
        self.graphs = None
        if use_graphs:
            max_context = min(max_model_len or 2048, 4096)
            self.graphs = DecodeGraphs(model, self.kv_tensors, kv.block_size, kv.num_blocks, device,
                                       max_context=max_context)

    @torch.inference_mode()
    def execute(self, scheduled: list[tuple[Request, int]]) -> list[tuple[Request, int, dict | None]]:
        """Run one step. Returns (request, sampled token, logprobs) for each request whose known tokens are now all
        computed; requests in the middle of a chunked prefill sample nothing."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens, context_lens, block_tables = [], [], []
        sampling_rows: list[int] = []
        sampling_requests: list[Request] = []
        scoring: list[tuple[Request, int, int, int]] = []  # (request, first row, first position, number of rows)
        size = self.kv.block_size
        lora_segments: list[tuple[int, int, int]] = []  # (slot, first row, end row) of the adapter rows
        if self.lora is not None and any(request.lora_id is not None for request, _ in scheduled):
            scheduled = self._sort_by_adapter(scheduled)
        for request, num_new in scheduled:
            if request.lora_id is not None:
                slot = self.lora.slot_of(request.lora_id)
                if lora_segments and lora_segments[-1][0] == slot:
                    lora_segments[-1] = (slot, lora_segments[-1][1], len(input_ids) + num_new)
                else:
                    lora_segments.append((slot, len(input_ids), len(input_ids) + num_new))
            start = request.num_computed_tokens
            end = start + num_new
            if request.wants_prompt_logprobs:
                # Hidden state at position p scores prompt token p + 1; positions scored before are skipped.
                first = max(start, len(request.prompt_logprobs) - 1)
                last = min(end, request.num_prompt_tokens - 1)
                if last > first:
                    scoring.append((request, len(input_ids) + first - start, first, last - first))
            input_ids.extend(request.all_token_ids[start:end])
            positions.extend(range(start, end))
            table = [block.block_id for block in request.blocks]
            slots.extend(table[p // size] * size + p % size for p in range(start, end))
            query_lens.append(num_new)
            context_lens.append(end)
            block_tables.append(table)
            if end == request.num_tokens and request.params.max_tokens > 0:
                sampling_rows.append(len(input_ids) - 1)
                sampling_requests.append(request)
        # Constrained rows only; a batch without any pays nothing here.
        constrained = [i for i, r in enumerate(sampling_requests) if r.matcher is not None]
        masks = None
        if constrained:
            matchers = [sampling_requests[i].matcher for i in constrained]
            if self.overlap_masks:
                if self._mask_worker is None:
                    self._mask_worker = ThreadPoolExecutor(1, thread_name_prefix="llmasos-masks")
                masks = self._mask_worker.submit(self._fill_bitmask, matchers)
        device = self.device
        num_seqs = len(query_lens)
        if (self.graphs is not None and not lora_segments and len(input_ids) == num_seqs
                and self.graphs.fits(num_seqs, max(context_lens))):
            hidden = self.graphs.run(input_ids, positions, slots, block_tables, context_lens)
        else:
            attn = AttentionMetadata(
                query_lens=query_lens, context_lens=context_lens, kv_cache=self.kv_tensors,
                slot_mapping=torch.tensor(slots, device=device), block_tables=block_tables, block_size=size)
            if lora_segments:
                self.lora.batch.segments = lora_segments
            try:
                with sdpa_backends(device):
                    hidden = self.model(torch.tensor(input_ids, device=device),
                                        torch.tensor(positions, device=device), attn)
            finally:
                if lora_segments:
                    self.lora.batch.segments = []
        for request, row, position, count in scoring:
            self._score_prompt(request, hidden[row:row + count], position, count)
        if not sampling_requests:
            return []
        logits = self.model.compute_logits(hidden[torch.tensor(sampling_rows, device=device)])
        bitmask = None
        if constrained:
            bitmask = masks.result() if masks is not None else self._fill_bitmask(matchers)
        token_ids, logprobs = sample(logits, sampling_requests, (constrained, bitmask) if constrained else None)
        return list(zip(sampling_requests, token_ids, logprobs, strict=True))

    def _sort_by_adapter(self, scheduled: list[tuple[Request, int]]) -> list[tuple[Request, int]]:
        """Base rows first, then each adapter's rows together (stable), so every adapter is one slice of the batch."""
        return sorted(scheduled, key=lambda item: -1 if item[0].lora_id is None else self.lora.slot_of(item[0].lora_id))

    def _fill_bitmask(self, matchers: list) -> torch.Tensor:
        started = time.perf_counter()
        bitmask = self.grammars.fill_bitmask(matchers)
        self.mask_seconds.append(time.perf_counter() - started)
        if len(self.mask_seconds) > 100_000:
            del self.mask_seconds[:50_000]
        return bitmask

    def _score_prompt(self, request: Request, hidden: torch.Tensor, position: int, count: int,
                      chunk: int = 512) -> None:
        """Append (log p(prompt token), top alternatives) for prompt tokens position+1 .. position+count; logits are
        made `chunk` rows at a time so a long prompt never holds (prompt, vocab) floats at once."""
        top_k = request.params.prompt_logprobs
        targets = torch.tensor(request.prompt_token_ids[position + 1:position + 1 + count], device=hidden.device)
        for begin in range(0, count, chunk):
            logprobs = torch.log_softmax(self.model.compute_logits(hidden[begin:begin + chunk]).float(), dim=-1)
            chosen = logprobs.gather(1, targets[begin:begin + chunk].unsqueeze(1)).squeeze(1).tolist()
            if top_k:
                values, indices = logprobs.topk(top_k, dim=-1)
                request.prompt_logprobs.extend(
                    (lp, dict(zip(idx, vals, strict=True)))
                    for lp, vals, idx in zip(chosen, values.tolist(), indices.tolist(), strict=True))
            else:
                request.prompt_logprobs.extend((lp, {}) for lp in chosen)
