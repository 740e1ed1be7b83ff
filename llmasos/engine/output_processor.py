"""The front end's half of generation: turns the engine core's token outputs into text. Per choice: incremental
detokenization, stop strings that span tokens (trimmed, never streamed: the text that could still begin one is held
back), and the n choices of one user request gathered into RequestOutputs (vLLM v1's OutputProcessor)."""

from __future__ import annotations

from llmasos.engine.protocol import EngineCoreOutput, EngineCoreRequest, sampling_to_dict
from llmasos.outputs import CompletionOutput, RequestOutput
from llmasos.sampling_params import SamplingParams


class Choice:
    """One of the n sequences of a request, as the front end sees it: tokens received, text, finish state."""

    def __init__(self, request_id: str, index: int, params: SamplingParams, detokenizer) -> None:
        self.request_id = request_id
        self.index = index
        self.params = params
        self.detokenizer = detokenizer
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self._emitted = 0  # characters of `text` already handed out as deltas
        self._reported_tokens = 0
        self._hold = max((len(s) for s in params.stop_strings), default=1) - 1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def receive(self, output: EngineCoreOutput) -> None:
        """Add the engine's new tokens; a stop string found in the text finishes the choice at that token."""
        # EOS and stop tokens add no text; the last token of a completed grammar is text
        ends_with_stop_token = output.finish_reason == "stop" and not output.stopped_by_grammar
        last = len(output.new_token_ids) - 1
        for position, token_id in enumerate(output.new_token_ids):
            self.token_ids.append(token_id)
            if self.logprobs is not None and output.new_logprobs is not None:
                self.logprobs.append(output.new_logprobs[position])
            if self.detokenizer is None or (position == last and ends_with_stop_token):
                continue  # EOS and stop tokens end the sequence without adding text
            self.text += self.detokenizer.push(token_id)
            if self.params.stop_strings and self._check_stop_strings():
                self._finish_text(check_stops=False)
                return
        if output.finish_reason is not None:
            self.finish_reason = output.finish_reason
            self.stop_reason = output.stop_reason
            self._finish_text(check_stops=output.finish_reason != "stop")

    def _finish_text(self, check_stops: bool) -> None:
        if self.detokenizer is not None:
            self.text += self.detokenizer.flush()
            if self.params.stop_strings and check_stops:
                self._check_stop_strings()

    def _check_stop_strings(self) -> bool:
        """Stop strings can span tokens: search the recent tail of the text, trim the text at the match."""
        best = None
        for stop in self.params.stop_strings:
            position = self.text.find(stop, self._emitted)  # emitted text never holds the start of a stop string
            if position != -1 and (best is None or position < best[0]):
                best = (position, stop)
        if best is None:
            return False
        self.text = self.text[:best[0]]
        self._emitted = min(self._emitted, len(self.text))
        self.finish_reason, self.stop_reason = "stop", best[1]
        return True

    def take_delta(self) -> tuple[str, list[int], list | None]:
        """New text safe to show (while running, the tail that could still begin a stop string is held back), and
        the tokens and logprobs received since the last delta."""
        limit = len(self.text) if self.finished else max(self._emitted, len(self.text) - self._hold)
        text = self.text[self._emitted:limit]
        self._emitted = limit
        start, self._reported_tokens = self._reported_tokens, len(self.token_ids)
        logprobs = self.logprobs[start:] if self.logprobs is not None else None
        return text, self.token_ids[start:], logprobs


class RequestGroup:
    """The n choices of one user request, and what of them has been reported."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], choices: list[Choice]):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.children = choices
        self.num_cached_tokens = 0
        self.prompt_logprobs: list | None = None

    @property
    def finished(self) -> bool:
        return all(choice.finished for choice in self.children)

    def output(self, delta: bool = False) -> RequestOutput:
        """The whole output so far, or (delta=True) only what is new since the last delta."""
        outputs = []
        for choice in self.children:
            if delta:
                text, token_ids, logprobs = choice.take_delta()
            else:
                text, token_ids, logprobs = choice.text, list(choice.token_ids), choice.logprobs
            outputs.append(CompletionOutput(choice.index, text, list(token_ids), choice.finish_reason,
                                            None if logprobs is None else list(logprobs), choice.stop_reason))
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outputs, self.finished,
                             self.num_cached_tokens, self.prompt_logprobs)


class OutputProcessor:
    """All requests in flight on one engine, keyed by user request id and by engine (choice) id."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.groups: dict[str, RequestGroup] = {}
        self._choices: dict[str, tuple[RequestGroup, Choice]] = {}

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
            params: SamplingParams) -> list[EngineCoreRequest]:
        """Register a request; returns the engine requests for its n choices (only choice 0 scores the prompt)."""
        if request_id in self.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        choices, core_requests = [], []
        sampling = sampling_to_dict(params)
        for index in range(params.n):
            child_id = request_id if params.n == 1 else f"{request_id}#{index}"
            detokenizer = (self.tokenizer.incremental_detokenizer(prompt_token_ids, params.skip_special_tokens)
                           if self.tokenizer is not None else None)
            choices.append(Choice(child_id, index, params, detokenizer))
            child_sampling = sampling if index == 0 else {**sampling, "prompt_logprobs": None}
            core_requests.append(EngineCoreRequest(child_id, prompt_token_ids, child_sampling, index))
        group = RequestGroup(request_id, prompt, prompt_token_ids, choices)
        self.groups[request_id] = group
        for choice in choices:
            self._choices[choice.request_id] = (group, choice)
        return core_requests

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestGroup], list[str]]:
        """Apply a batch of engine outputs. Returns the groups that changed (finished ones are then forgotten) and
        the engine ids of choices a stop string ended, which the engine must abort."""
        touched: dict[str, RequestGroup] = {}
        to_abort: list[str] = []
        for output in outputs:
            entry = self._choices.get(output.request_id)
            if entry is None:
                continue  # aborted meanwhile: its late tokens are dropped
            group, choice = entry
            if choice.finished:
                continue
            choice.receive(output)
            if choice.index == 0:
                group.num_cached_tokens = output.num_cached_tokens
            if output.prompt_logprobs is not None:
                group.prompt_logprobs = output.prompt_logprobs
            if choice.finished and output.finish_reason is None:
                to_abort.append(choice.request_id)  # a stop string: the engine is still generating it
            touched[group.request_id] = group
        for request_id, group in touched.items():
            if group.finished:
                self.forget(request_id)
        return list(touched.values()), to_abort

    def parent_of(self, engine_request_id: str) -> str | None:
        entry = self._choices.get(engine_request_id)
        return entry[0].request_id if entry is not None else None

    def abort(self, request_id: str) -> list[str]:
        """Forget a request; returns the engine ids of its choices that may still run."""
        group = self.groups.get(request_id)
        if group is None:
            return []
        running = [choice.request_id for choice in group.children if not choice.finished]
        for choice in group.children:
            if not choice.finished:
                choice.finish_reason = "abort"
        self.forget(request_id)
        return running

    def forget(self, request_id: str) -> None:
        group = self.groups.pop(request_id, None)
        if group is not None:
            for choice in group.children:
                self._choices.pop(choice.request_id, None)
