"""Scorer backends: what every evaluation asks of a model, in process (`LLM`) or through an OpenAI-compatible endpoint.

A backend tokenizes text, returns prompt log-probabilities ([None, log p(t1|t0), ...]) for token-id sequences or
texts, and generates for prompts or chat conversations. Evaluations only talk to this interface.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from llmasos.llm import LLM
    from llmasos.spec import ModelSpec

Prompt = str | list[dict]  # plain text, or a chat conversation (list of {"role", "content"})


@dataclass
class GenerationParams:
    """How evaluations generate: greedy by default, so scores are reproducible."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature!r}")


@runtime_checkable
class ScoringBackend(Protocol):
    """The model side of an evaluation."""

    model_name: str
    kind: str  # "in-process" or "endpoint"

    def context_length(self) -> int | None:
        """Most tokens one scored sequence may hold, or None when unknown."""

    def tokenize(self, text: str) -> list[int] | None:
        """Token ids of `text` with the model's special tokens (BOS), or None if this backend cannot tokenize."""

    def score(self, sequences: list[list[int]]) -> list[list[float | None]]:
        """Prompt log-probabilities of each token-id sequence: [None, log p(t1|t0), ...]."""

    def score_texts(self, texts: list[str]) -> list[list[float | None]]:
        """Prompt log-probabilities of each text, tokenized by the model (used when `tokenize` gives None)."""

    def generate(self, prompts: list[Prompt], params: GenerationParams) -> list[str]:
        """The completion of each prompt (text continues; a conversation gets the assistant's reply)."""

    def close(self) -> None: ...


class InProcessBackend:
    """An `LLM` loaded in this process."""

    kind = "in-process"

    def __init__(self, llm: LLM, model_name: str | None = None) -> None:
        self.llm = llm
        self.model_name = model_name or (str(llm.path) if llm.path is not None else type(llm.model).__name__)

    @classmethod
    def load(cls, model: ModelSpec | str | Path, dtype: str = "auto", device: str = "cpu") -> InProcessBackend:
        """Resolve `model` once (a spec, library name or directory) and load that spec."""
        from llmasos.errors import ModelLoadError
        from llmasos.llm import LLM
        from llmasos.spec import ModelSpec, resolve_spec

        spec = resolve_spec(model, dtype=dtype, device=device)
        if spec.kind != "decoder":  # scoring needs prompt log-probabilities, which only the engine's decoders give
            raise ModelLoadError(f"{spec.name} is {'an' if spec.kind == 'encoder' else 'a'} {spec.kind} model; "
                                 "evaluations run decoder-only models")
        return cls(LLM.load(spec), spec.name if isinstance(model, ModelSpec) else str(model))

    def context_length(self) -> int | None:
        return self.llm.engine.max_model_len

    def tokenize(self, text: str) -> list[int] | None:
        return self.llm.tokenizer.encode(text)

    def score(self, sequences: list[list[int]]) -> list[list[float | None]]:
        return [self.llm.prompt_logprobs(ids) for ids in sequences]

    def score_texts(self, texts: list[str]) -> list[list[float | None]]:
        return self.score([self.llm.tokenizer.encode(text) for text in texts])

    def generate(self, prompts: list[Prompt], params: GenerationParams) -> list[str]:
        from llmasos.sampling_params import SamplingParams

        sampling = SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                                  stop=list(params.stop) or None, seed=params.seed)
        texts = [i for i, p in enumerate(prompts) if not isinstance(p, list)]
        chats = [i for i, p in enumerate(prompts) if isinstance(p, list)]
        results: list[str] = [""] * len(prompts)
        if texts:
            for i, output in zip(texts, self.llm.generate([prompts[i] for i in texts], sampling), strict=True):
                results[i] = output.text
        if chats and self.llm.tokenizer.chat_template is None:  # the generic message tells to pass chat_template=
            from llmasos.errors import EvalDataError

            raise EvalDataError(f"{self.llm.spec.name} has no chat template, so chat prompts (--chat, or \"messages\" "
                                "in the data) cannot be rendered: drop --chat, or give the model a template (a "
                                "Modelfile TEMPLATE line, or chat_template.jinja in its directory)")
        if chats:  # through LLM.chat, so a library model's system prompt applies as it does when served
            for i, output in zip(chats, self.llm.chat([prompts[i] for i in chats], sampling), strict=True):
                results[i] = output.text
        return results

    def close(self) -> None:
        pass


def open_backend(model: str | None = None, endpoint: str | None = None, *, api_key: str | None = None,
                 dtype: str = "auto", device: str = "cpu", context_length: int | None = None,
                 concurrency: int = 8, timeout: float = 300.0) -> ScoringBackend:
    """An endpoint backend when `endpoint` is given (`model` is then the served model id), else `model` loaded here.
    `context_length` tells an endpoint's context when the server does not say it (in process, the model says it)."""
    if endpoint:
        from llmasos.eval.endpoint import EndpointBackend

        return EndpointBackend(endpoint, model, api_key=api_key, context_length=context_length,
                               concurrency=concurrency, timeout=timeout)
    if not model:
        raise ValueError("pass --model NAME_OR_PATH to evaluate a model in process, or --endpoint URL for a server")
    return InProcessBackend.load(model, dtype=dtype, device=device)


def as_backend(model) -> ScoringBackend:
    """A backend from an `LLM`, a ModelSpec, a checkpoint path or library name (loaded in process), or a backend
    itself."""
    from llmasos.spec import ModelSpec

    if isinstance(model, (str, Path, ModelSpec)):
        return InProcessBackend.load(model)
    if hasattr(model, "prompt_logprobs") and hasattr(model, "tokenizer"):
        return InProcessBackend(model)
    if isinstance(model, ScoringBackend):
        return model
    raise TypeError(f"cannot evaluate a {type(model).__name__}: pass an LLM, a ModelSpec, a checkpoint path or a "
                    "ScoringBackend")
