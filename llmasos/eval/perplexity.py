"""Perplexity and bits per byte of texts, with sliding windows over the model's context (the HF perplexity guide).

Each text is tokenized with the model's special tokens (so a BOS, if the tokenizer adds one, is token 0). Windows
start at 0, stride, 2*stride, ...; each holds up to `context_length` tokens and scores only the tokens no earlier
window scored, so every token after the first is scored exactly once. A text that fits is one window.
perplexity = exp(total NLL / scored tokens); bits per byte = total NLL / ln 2 / UTF-8 bytes of the texts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

from llmasos.errors import EndpointError
from llmasos.eval.backends import ScoringBackend, as_backend

Progress = Callable[[int, int], None]  # (units done, units in all)


@dataclass
class PerplexityResult:
    perplexity: float
    bits_per_byte: float
    nll: float  # total negative log-likelihood of the scored tokens, in nats
    num_tokens: int  # scored tokens
    num_bytes: int
    num_texts: int
    num_windows: int
    context_length: int
    stride: int

    def metrics(self) -> dict[str, float | int]:
        return asdict(self)


def windows(num_tokens: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) of each window over a text of `num_tokens` tokens: the window is tokens
    [begin, end) and scores positions [first_scored, end)."""
    if context_length < 2:
        raise ValueError(f"context length must be at least 2 tokens, got {context_length}")
    if not 1 <= stride < context_length:
        raise ValueError(f"stride must be from 1 to context length - 1 ({context_length - 1}), got {stride}: each "
                         "window needs at least one token of context before the tokens it scores")
    spans = []
    previous_end = 0
    for begin in range(0, max(num_tokens, 1), stride):
        end = min(begin + context_length, num_tokens)
        spans.append((begin, end, max(previous_end, 1)))
        previous_end = end
        if end >= num_tokens:
            break
    return spans


def _settings(backend: ScoringBackend, context_length: int | None, stride: int | None) -> tuple[int, int]:
    limit = backend.context_length()
    if context_length is None:
        if limit is None:
            raise ValueError(f"{backend.model_name} does not say its context length; pass --context-length")
        context_length = limit
    elif limit is not None and context_length > limit:
        raise ValueError(f"context length {context_length} exceeds the model's {limit} tokens; pass at most {limit}")
    stride = context_length // 2 if stride is None else stride
    windows(0, context_length, stride)  # validates both
    return context_length, stride


def perplexity(model, texts: str | list[str], *, context_length: int | None = None, stride: int | None = None,
               batch_size: int = 8, progress: Progress | None = None) -> PerplexityResult:
    """Perplexity of `texts` under `model` (an LLM, a checkpoint path, or a ScoringBackend such as an endpoint).

    `context_length` defaults to the model's; `stride` (tokens each new window advances) to half of it.
    """
    backend = as_backend(model)
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or any(not isinstance(t, str) or not t for t in texts):
        raise ValueError("perplexity needs one or more non-empty texts")
    context_length, stride = _settings(backend, context_length, stride)

    # A job is one request: (token ids to score, first scored position), or a whole text when ids are unavailable.
    id_jobs: list[tuple[list[int], int]] = []
    text_jobs: list[str] = []
    for text in texts:
        token_ids = backend.tokenize(text)
        if token_ids is None:
            text_jobs.append(text)
            continue
        for begin, end, first in windows(len(token_ids), context_length, stride):
            id_jobs.append((token_ids[begin:end], first - begin))
    total = len(id_jobs) + len(text_jobs)
    nll, num_tokens, done = 0.0, 0, 0
    if progress:
        progress(0, total)
    for start in range(0, len(id_jobs), batch_size):
        batch = id_jobs[start:start + batch_size]
        for (_, first), logprobs in zip(batch, backend.score([ids for ids, _ in batch]), strict=True):
            scored = logprobs[first:]
            nll -= math.fsum(scored)
            num_tokens += len(scored)
        done += len(batch)
        if progress:
            progress(done, total)
    for start in range(0, len(text_jobs), batch_size):
        batch = text_jobs[start:start + batch_size]
        for logprobs in backend.score_texts(batch):
            if len(logprobs) > context_length:
                raise EndpointError(
                    f"a text of {len(logprobs)} tokens is longer than the context length {context_length}; scoring "
                    f"it in windows needs its token ids, but {backend.model_name}'s server has no POST /tokenize. "
                    "Use a server with /tokenize (llmasos serve, vLLM), or split the text")
            nll -= math.fsum(logprobs[1:])
            num_tokens += len(logprobs) - 1
        done += len(batch)
        if progress:
            progress(done, total)
    if num_tokens == 0:
        raise ValueError("no token was scored: every text is a single token; give longer texts")
    num_bytes = sum(len(text.encode("utf-8")) for text in texts)
    return PerplexityResult(perplexity=math.exp(nll / num_tokens), bits_per_byte=nll / math.log(2) / num_bytes,
                            nll=nll, num_tokens=num_tokens, num_bytes=num_bytes, num_texts=len(texts),
                            num_windows=total, context_length=context_length, stride=stride)
