"""Pricing and per-key limits: a price table ($ per 1M tokens, growing with model size by default), and an admission
controller enforcing requests/tokens per minute, concurrent requests and the token quota, with OpenAI's headers."""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from llmasos.server.auth import KeyInfo, tokens_used
from llmasos.server.protocol import APIError

WINDOW_SECONDS = 60.0


@dataclass(frozen=True)
class Price:
    input: float  # dollars per 1M prompt tokens
    output: float  # dollars per 1M completion tokens


def default_price(num_parameters: int) -> Price:
    """$0.05 per 1M input tokens plus $0.20 per billion parameters; output costs twice as much."""
    billions = num_parameters / 1e9
    input_price = round(0.05 + 0.20 * billions, 6)
    return Price(input_price, round(2 * input_price, 6))


class PriceTable:
    def __init__(self, overrides: dict[str, Price] | None = None) -> None:
        self.overrides = dict(overrides or {})

    @classmethod
    def from_file(cls, path: str | Path) -> PriceTable:
        """A JSON file {"model-id": {"input": 0.5, "output": 1.5}, ...} in dollars per 1M tokens."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            prices = {model: Price(float(p["input"]), float(p["output"])) for model, p in data.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"price table {path} is invalid ({exc}); expected "
                             '{"model": {"input": <$ per 1M>, "output": <$ per 1M>}}') from None
        return cls(prices)

    def price(self, model: str, num_parameters: int, base: str | None = None) -> Price:
        """The model's own price, else (a LoRA adapter) its base's, else the default for its size."""
        return self.overrides.get(model) or (self.overrides.get(base) if base else None) or \
            default_price(num_parameters)

    def cost(self, model: str, num_parameters: int, prompt_tokens: int, completion_tokens: int,
             base: str | None = None) -> float:
        price = self.price(model, num_parameters, base)
        return (prompt_tokens * price.input + completion_tokens * price.output) / 1e6


@dataclass
class _KeyState:
    requests: deque = field(default_factory=deque)  # admission times
    tokens: deque = field(default_factory=deque)  # (time, tokens)
    in_flight: int = 0  # sequences (prompts x n) admitted and not yet released
    reserved: int = 0  # tokens promised to in-flight requests, so parallel requests cannot overrun the quota


@dataclass
class Admission:
    key: KeyInfo | None
    max_completion_tokens: int | None  # what the quota still allows, None = unlimited
    reserved: int = 0
    released: bool = False
    sequences: int = 1


class Limiter:
    """Per-process sliding-window limits. The token quota is read from the shared database, so it holds across
    servers; per-minute limits apply per server process."""

    def __init__(self) -> None:
        self._keys: dict[str, _KeyState] = {}
        self._lock = threading.Lock()  # admit runs in a worker thread (its quota check reads the database)

    def _state(self, name: str) -> _KeyState:
        state = self._keys.setdefault(name, _KeyState())
        cutoff = time.monotonic() - WINDOW_SECONDS
        while state.requests and state.requests[0] < cutoff:
            state.requests.popleft()
        while state.tokens and state.tokens[0][0] < cutoff:
            state.tokens.popleft()
        return state

    def headers(self, key: KeyInfo | None) -> dict[str, str]:
        if key is None:
            return {}
        with self._lock:
            return self._headers(key)

    def _headers(self, key: KeyInfo) -> dict[str, str]:
        state = self._state(key.name)
        now = time.monotonic()
        out: dict[str, str] = {}
        if key.rpm:
            out["x-ratelimit-limit-requests"] = str(key.rpm)
            out["x-ratelimit-remaining-requests"] = str(max(0, key.rpm - len(state.requests)))
            reset = state.requests[0] + WINDOW_SECONDS - now if state.requests else 0.0
            out["x-ratelimit-reset-requests"] = f"{max(0.0, reset):.3f}s"
        if key.tpm:
            used = sum(n for _, n in state.tokens)
            out["x-ratelimit-limit-tokens"] = str(key.tpm)
            out["x-ratelimit-remaining-tokens"] = str(max(0, key.tpm - used))
            reset = state.tokens[0][0] + WINDOW_SECONDS - now if state.tokens else 0.0
            out["x-ratelimit-reset-tokens"] = f"{max(0.0, reset):.3f}s"
        if key.max_concurrency:
            out["x-ratelimit-limit-concurrent-requests"] = str(key.max_concurrency)
            out["x-ratelimit-remaining-concurrent-requests"] = str(max(0, key.max_concurrency - state.in_flight))
        return out

    def _reject(self, key: KeyInfo, message: str, retry_after: float, code: str = "rate_limit_exceeded",
                type: str = "rate_limit_error", extra: dict[str, str] | None = None) -> APIError:
        headers = {"Retry-After": str(max(1, math.ceil(retry_after))), **self._headers(key), **(extra or {})}
        return APIError(429, message, type=type, code=code, headers=headers)

    def admit(self, key: KeyInfo | None, prompt_tokens: int, max_tokens: int, sequences: int = 1,
              max_sequences_per_key: int | None = None) -> Admission:
        """Admit a request of `sequences` sequences (prompts x n) or raise a 429 APIError. rpm counts requests;
        concurrency and the key's fair share (`max_sequences_per_key`) count sequences. Caps generation at what the
        key's quota still allows. Thread-safe; blocking (the quota is read from the database)."""
        if key is None:
            return Admission(None, None, sequences=sequences)
        with self._lock:
            return self._admit(key, prompt_tokens, max_tokens, sequences, max_sequences_per_key)

    def _admit(self, key: KeyInfo, prompt_tokens: int, max_tokens: int, sequences: int,
               max_sequences_per_key: int | None) -> Admission:
        state = self._state(key.name)
        now = time.monotonic()
        if key.rpm and len(state.requests) >= key.rpm:
            raise self._reject(key, f"rate limit reached: {key.rpm} requests per minute for key {key.name!r}",
                               state.requests[0] + WINDOW_SECONDS - now)
        if key.tpm:
            used = sum(n for _, n in state.tokens)
            if used + prompt_tokens > key.tpm:
                wait = state.tokens[0][0] + WINDOW_SECONDS - now if state.tokens else WINDOW_SECONDS
                raise self._reject(key, f"rate limit reached: {key.tpm} tokens per minute for key {key.name!r}", wait)
        if key.max_concurrency and state.in_flight + sequences > key.max_concurrency:
            if sequences > key.max_concurrency:
                raise APIError(400, f"the request asks for {sequences} sequences (prompts x n) but key {key.name!r} "
                               f"allows {key.max_concurrency} at once; split it", param="n")
            raise self._reject(key, f"too many concurrent requests: key {key.name!r} allows {key.max_concurrency} "
                               f"sequences at once ({state.in_flight} running)", 1)
        if max_sequences_per_key and state.in_flight + sequences > max_sequences_per_key:
            raise self._reject(key, f"key {key.name!r} already holds {state.in_flight} sequences, its fair share of "
                               f"this server ({max_sequences_per_key}); retry when some finish", 1)
        allowed: int | None = None
        reserve = 0
        if key.token_quota is not None:
            remaining = key.token_quota - tokens_used(key.name) - state.reserved
            if remaining - prompt_tokens <= 0:
                raise self._reject(key, f"key {key.name!r} has used its token quota of {key.token_quota}; ask for a "
                                   "larger quota or a new key", 3600, code="insufficient_quota",
                                   type="insufficient_quota",
                                   extra={"x-ratelimit-limit-quota-tokens": str(key.token_quota),
                                          "x-ratelimit-remaining-quota-tokens": str(max(0, remaining))})
            allowed = remaining - prompt_tokens
            reserve = prompt_tokens + min(max_tokens, allowed)
        state.requests.append(now)
        state.in_flight += sequences
        state.reserved += reserve
        return Admission(key, allowed, reserve, sequences=sequences)

    def release(self, admission: Admission, total_tokens: int) -> None:
        if admission.key is None or admission.released:
            return
        admission.released = True
        with self._lock:
            state = self._state(admission.key.name)
            state.in_flight -= admission.sequences
            state.reserved -= admission.reserved
            if total_tokens:
                state.tokens.append((time.monotonic(), total_tokens))
