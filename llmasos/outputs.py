"""What generation returns: RequestOutput holding n CompletionOutputs (vLLM's shapes)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort", or None while still running
    logprobs: list[dict[int, float]] | None = None  # per generated token: chosen token + top alternatives
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    # LLM.chat with tools: the calls parsed from `text` (OpenAI's shape: id, type, function {name, arguments}) and
    # the text around them; None without tools or when the answer makes no call.
    tool_calls: list[dict] | None = None
    content: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0
    # With SamplingParams.prompt_logprobs: per prompt position (log p of that token, {token: logprob} alternatives).
    prompt_logprobs: list | None = None

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason
