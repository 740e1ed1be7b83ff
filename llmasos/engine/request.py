"""Request: one sequence the engine runs (a process, in the OS picture): its tokens, blocks, progress and text."""

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
    """A single sequence. `n > 1` fans out into n Requests sharing a parent id and the prompt's cached blocks."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, eos_token_ids: set[int],
                 detokenizer=None, parent_id: str | None = None, index: int = 0, arrival: int = 0) -> None:
        self.request_id = request_id
        self.parent_id = parent_id or request_id
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
        self.detokenizer = detokenizer
        self.text = ""
        self._emitted = 0  # characters of `text` already handed out as deltas
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self._hold = max((len(s) for s in params.stop_strings), default=1) - 1

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

    def append_token(self, token_id: int, logprobs: dict[int, float] | None = None) -> None:
        """Add one sampled token and decide whether the sequence is finished."""
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.append(logprobs)
        count = len(self.output_token_ids)
        # The sampler masks these ids until min_tokens are out, so seeing one here always ends the sequence.
        if token_id in self.eos_token_ids or token_id in self.params.stop_token_ids:
            self.finish_reason, self.stop_reason = "stop", (
                token_id if token_id in self.params.stop_token_ids else None)
            self._finish_text()
            return
        if self.detokenizer is not None:
            self.text += self.detokenizer.push(token_id)
            if self.params.stop_strings and self._check_stop_strings():
                return
        if count >= self.params.max_tokens:
            self.finish_reason = "length"
            self._finish_text()

    def _finish_text(self) -> None:
        if self.detokenizer is not None:
            self.text += self.detokenizer.flush()
            if self.params.stop_strings and self.finish_reason != "stop":
                self._check_stop_strings()

    def _check_stop_strings(self) -> bool:
        """Stop strings can span tokens: search the recent tail of the text, trim the text at the match."""
        window_start = self._emitted  # emitted text never holds the start of a stop string
        best = None
        for stop in self.params.stop_strings:
            position = self.text.find(stop, window_start)
            if position != -1 and (best is None or position < best[0]):
                best = (position, stop)
        if best is None:
            return False
        self.text = self.text[:best[0]]
        self._emitted = min(self._emitted, len(self.text))
        self.finish_reason, self.stop_reason = "stop", best[1]
        return True

    def take_delta(self) -> str:
        """New text safe to show: while running, the tail that could still begin a stop string is held back."""
        limit = len(self.text) if self.finished else max(self._emitted, len(self.text) - self._hold)
        delta = self.text[self._emitted:limit]
        self._emitted = limit
        return delta

    def reset_for_recompute(self) -> None:
        """After preemption: the KV state is gone; all tokens, outputs included, are prefilled again."""
        self.num_computed_tokens = 0
        self.blocks = []
        self.status = RequestStatus.WAITING
