"""Request: one sequence the engine core runs (a process, in the OS picture): its tokens, blocks and progress.
Token level only — text, stop strings and the n choices of one user request live in the front end
(llmasos.engine.output_processor)."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import torch

from llmasos.sampling_params import SamplingParams

if TYPE_CHECKING:
    from llmasos.engine.block_pool import Block


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    """A single sequence. The n choices of a user request are n Requests sharing the prompt's cached blocks."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, eos_token_ids: set[int],
                 index: int = 0, arrival: int = 0) -> None:
        self.request_id = request_id
        self.index = index
        self.arrival = arrival
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids = list(prompt_token_ids)
        self.params = params
        self.eos_token_ids = set() if params.ignore_eos else set(eos_token_ids)
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.admitted = False
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at first admission
        self.blocks: list[Block] = []
        self.block_hashes: list[int] = []
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed + index)
        self.finish_reason: str | None = None
        self.stop_reason: int | None = None
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        # Prompt logprobs (echo, scoring): entry i scores prompt token i; entry 0 is None. Filled chunk by chunk.
        self.prompt_logprobs: list | None = [None] if params.prompt_logprobs is not None else None
        self.num_reported = 0  # output tokens already sent to the front end
        # Structured output: an llguidance matcher that has consumed every output token (they survive preemption,
        # so it never needs rolling back); the engine sets it from params.structured_outputs.
        self.matcher = None
        self.stopped_by_grammar = False
        # The LoRA adapter it runs with (LoRAManager's id of one load; None: the base); also salts its block hashes.
        self.lora_id: int | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def max_total_tokens(self) -> int:
        return self.num_prompt_tokens + self.params.max_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Still has prompt positions to score: those positions must be computed, never read from the cache."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    def append_token(self, token_id: int, logprobs: dict[int, float] | None = None) -> None:
        """Add one sampled token and decide whether the sequence is finished (EOS, stop token, length)."""
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.append(logprobs)
        # The sampler masks these ids until min_tokens are out, so seeing one here always ends the sequence.
        if token_id in self.eos_token_ids or token_id in self.params.stop_token_ids:
            self.finish_reason = "stop"
            self.stop_reason = token_id if token_id in self.params.stop_token_ids else None
        elif self.matcher is not None and self._grammar_complete(token_id):
            self.finish_reason = "stop"
            self.stopped_by_grammar = True
        elif len(self.output_token_ids) >= self.params.max_tokens:
            self.finish_reason = "length"

    def _grammar_complete(self, token_id: int) -> bool:
        """Advance the matcher; True when the grammar admits nothing more (the output is complete)."""
        if not self.matcher.consume_token(token_id):  # cannot happen for a masked token; end rather than go on
            return True
        return self.matcher.is_stopped()

    def reset_for_recompute(self) -> None:
        """After preemption: the KV state is gone; all tokens, outputs included, are prefilled again."""
        self.num_computed_tokens = 0
        self.blocks = []
        self.status = RequestStatus.WAITING
