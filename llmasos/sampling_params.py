"""SamplingParams: everything that shapes one request's generation, validated up front."""

from __future__ import annotations

import json as json_module
from dataclasses import dataclass, field
from typing import Any

from llmasos.engine.validation import StructuredOutputError

MAX_LOGPROBS = 20
_CONSTRAINT_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """A constraint on the output, enforced by token masks while decoding (vLLM's StructuredOutputsParams): exactly
    one of `json` (a JSON schema, dict or string), `json_object` (True: any JSON object), `regex`, `choice` (the
    output is one of these strings) or `grammar` (a Lark grammar, as llguidance reads it). Shape errors raise
    StructuredOutputError here; schema, regex and grammar errors when the engine checks the request."""

    json: dict[str, Any] | str | None = None
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = [kind for kind in _CONSTRAINT_KINDS if getattr(self, kind) not in (None, False)]
        if len(given) != 1:
            raise StructuredOutputError(
                "structured_outputs needs exactly one of json, json_object, regex, choice, grammar; got "
                + (", ".join(given) if given else "none"))
        kind = given[0]
        value = getattr(self, kind)
        if kind == "json":
            if isinstance(value, str):
                try:
                    parsed = json_module.loads(value)
                except ValueError as exc:
                    raise StructuredOutputError(f"structured_outputs.json is not valid JSON: {exc}") from None
            else:
                parsed = value
            if not isinstance(parsed, (dict, bool)):
                raise StructuredOutputError("structured_outputs.json must be a JSON schema (an object), got "
                                            f"{type(parsed).__name__}")
        elif kind == "json_object" and value is not True:
            raise StructuredOutputError(f"structured_outputs.json_object must be true, got {value!r}")
        elif kind in ("regex", "grammar") and not (isinstance(value, str) and value):
            raise StructuredOutputError(f"structured_outputs.{kind} must be a non-empty string, got {value!r}")
        elif kind == "choice":
            if not (isinstance(value, (list, tuple)) and value and all(isinstance(c, str) and c for c in value)):
                raise StructuredOutputError("structured_outputs.choice must be a non-empty list of non-empty "
                                            f"strings, got {value!r}")
            object.__setattr__(self, "choice", list(value))

    @property
    def kind(self) -> str:
        return next(kind for kind in _CONSTRAINT_KINDS if getattr(self, kind) not in (None, False))

    @property
    def value(self) -> Any:
        return getattr(self, self.kind)

    def key(self) -> str:
        """A canonical string naming the constraint: the key of the compiled-grammar caches."""
        value = self.value
        if self.kind == "json" and isinstance(value, str):
            value = json_module.loads(value)
        return json_module.dumps([self.kind, value], sort_keys=True, separators=(",", ":"))

    def to_dict(self) -> dict[str, Any]:
        """The wire form (plain data for MessagePack): only the field that is set."""
        return {self.kind: self.value}

    @classmethod
    def coerce(cls, value: StructuredOutputsParams | dict[str, Any] | None) -> StructuredOutputsParams | None:
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(_CONSTRAINT_KINDS))
            if unknown:
                raise StructuredOutputError(f"structured_outputs has unknown field {unknown[0]!r}; use one of "
                                            + ", ".join(_CONSTRAINT_KINDS))
            return cls(**value)
        raise StructuredOutputError(f"structured_outputs must be a StructuredOutputsParams or a dict, got "
                                    f"{type(value).__name__}")


@dataclass
class SamplingParams:
    """How to generate; the names and meanings follow vLLM and the OpenAI API. temperature 0 means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None  # score the prompt: logprob of each prompt token (+ this many alternatives)
    structured_outputs: StructuredOutputsParams | dict[str, Any] | None = None  # JSON schema, regex, choice, grammar
    lora: str | None = None  # the name of a loaded LoRA adapter to generate with; None: the base model
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        check(is_int(self.max_tokens) and self.max_tokens >= 0,
              f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")
        check(is_int(self.n) and 1 <= self.n <= 128, f"n must be an integer from 1 to 128, got {self.n!r}")
        check(isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 100,
              f"temperature must be a number from 0 to 100, got {self.temperature!r}")
        check(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1,
              f"top_p must be in (0, 1], got {self.top_p!r}")
        check(is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 0),
              f"top_k must be -1 (disabled) or a non-negative integer, got {self.top_k!r}")
        check(isinstance(self.min_p, (int, float)) and 0 <= self.min_p <= 1,
              f"min_p must be in [0, 1], got {self.min_p!r}")
        check(self.seed is None or is_int(self.seed), f"seed must be an integer, got {self.seed!r}")
        check(self.logprobs is None or (is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
              f"logprobs must be an integer from 0 to {MAX_LOGPROBS}, got {self.logprobs!r}")
        check(self.prompt_logprobs is None
              or (is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
              f"prompt_logprobs must be an integer from 0 to {MAX_LOGPROBS}, got {self.prompt_logprobs!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and -2 <= value <= 2, f"{name} must be in [-2, 2], got {value!r}")
        check(isinstance(self.repetition_penalty, (int, float)) and 0 < self.repetition_penalty <= 10,
              f"repetition_penalty must be in (0, 10], got {self.repetition_penalty!r}")
        check(is_int(self.min_tokens) and 0 <= self.min_tokens,
              f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        check(self.min_tokens <= self.max_tokens,
              f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        check(all(isinstance(s, str) and s for s in stops), "stop must be a non-empty string or a list of them")
        self.stop_strings = stops
        ids = list(self.stop_token_ids or [])
        check(all(is_int(i) and i >= 0 for i in ids), "stop_token_ids must be a list of non-negative integers")
        self.stop_token_ids = ids
        if self.logit_bias is not None:
            check(isinstance(self.logit_bias, dict), "logit_bias must map token ids to numbers")
            bias: dict[int, float] = {}
            for key, value in self.logit_bias.items():
                try:
                    token = int(key)
                except (TypeError, ValueError):
                    raise ValueError(f"logit_bias key {key!r} is not a token id") from None
                check(token >= 0, f"logit_bias key {key!r} is not a token id")
                check(isinstance(value, (int, float)) and -100 <= value <= 100,
                      f"logit_bias values must be in [-100, 100], got {value!r} for token {token}")
                bias[token] = float(value)
            self.logit_bias = bias
        self.structured_outputs = StructuredOutputsParams.coerce(self.structured_outputs)
        check(self.lora is None or (isinstance(self.lora, str) and self.lora != ""),
              f"lora must be the name of a loaded LoRA adapter (a non-empty string) or None, got {self.lora!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
