"""Continuous-batching scheduler (pure Python, no tensors): each step, give every running request the tokens it
still needs (1 for a decode, a chunk for a prefill) under a token budget, admit waiting requests first come first
served, and preempt the most recently admitted request when blocks run out (it is recomputed later). With LoRA
adapters, at most `max_loras` distinct ones run at once; a request whose adapter cannot fit waits; later ones go."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from llmasos.engine.kv_cache import KVCacheManager
from llmasos.engine.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    """The step's work: (request, number of tokens to compute) in batch order."""

    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                 max_loras: int | None = None) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_loras = max_loras
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_prompt_tokens = 0
        self.num_cached_prompt_tokens = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled_ids: set[str] = set()
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if num_new <= 0:  # nothing to compute this step (cannot happen for unfinished requests)
                index += 1
                continue
            while not self.kv.allocate(request, num_new):
                victim = self.running.pop()
                self._preempt(victim, out)
                if victim is request:
                    break
            else:
                out.scheduled.append((request, num_new))
                scheduled_ids.add(request.request_id)
                budget -= num_new
                index += 1
                continue
            break  # the request itself was preempted: everything after it already was
        if not out.preempted:
            self._admit(out, budget)
        return out

    def running_loras(self) -> set[int]:
        return {r.lora_id for r in self.running if r.lora_id is not None}

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        loras = self.running_loras() if self.max_loras is not None else None
        skipped: list[Request] = []  # their adapter has no slot this step; they keep their place in the queue
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            lora_id = request.lora_id
            if loras is not None and lora_id is not None and lora_id not in loras:
                if len(loras) >= self.max_loras:
                    skipped.append(self.waiting.popleft())
                    continue
            first_time = not request.admitted
            cached = self.kv.find_cached_prefix(request)
            num_cached = len(cached) * self.kv.block_size
            num_new = min(request.num_tokens - num_cached, budget)
            if not self.kv.allocate(request, num_new, cached):
                break  # first come, first served: later requests wait behind this one
            self.waiting.popleft()
            if first_time:
                request.admitted = True
                request.num_cached_tokens = num_cached
                self.num_prompt_tokens += request.num_prompt_tokens
                self.num_cached_prompt_tokens += num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append((request, num_new))
            budget -= num_new
            if loras is not None and lora_id is not None:
                loras.add(lora_id)
        self.waiting.extendleft(reversed(skipped))

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.kv.free(request)
        request.reset_for_recompute()
        self.waiting.appendleft(request)
        self.num_preemptions += 1
        out.preempted.append(request)

    def update(self, out: SchedulerOutput) -> None:
        """After the forward: scheduled tokens are now computed."""
        for request, num_tokens in out.scheduled:
            request.num_computed_tokens += num_tokens

    def finish(self, request: Request) -> None:
        """Remove a finished or aborted request and give back its blocks at once."""
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.WAITING:
            try:
                self.waiting.remove(request)
            except ValueError:
                pass
        self.kv.free(request)
        request.status = RequestStatus.FINISHED

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.num_cached_prompt_tokens / self.num_prompt_tokens if self.num_prompt_tokens else 0.0
