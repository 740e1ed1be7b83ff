"""What every task pipeline shares: loading the right kind of model for a name or path, the Pipeline base class,
and the mapping of transformers-style generation options onto SamplingParams."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmasos.errors import ModelLoadError
from llmasos.sampling_params import SamplingParams

ENCODER, SEQ2SEQ, DECODER = "encoder", "seq2seq", "decoder"
DEFAULT_MAX_NEW_TOKENS = 256
# transformers-style generation options every generating pipeline accepts (besides its task options).
GENERATION_OPTIONS = frozenset({
    "max_new_tokens", "max_length", "min_new_tokens", "do_sample", "temperature", "top_p", "top_k", "min_p",
    "repetition_penalty", "num_return_sequences", "seed", "stop", "stop_strings", "ignore_eos",
})


def model_kind(directory: str | Path) -> str:
    """ENCODER (BERT family, sentence-transformers layout included), SEQ2SEQ (T5 family) or DECODER (the rest)."""
    from llmasos.embeddings import is_embedding_model
    from llmasos.models.loader import read_config_json
    from llmasos.models.t5 import is_seq2seq_config

    if is_embedding_model(directory):
        return ENCODER
    return SEQ2SEQ if is_seq2seq_config(read_config_json(directory)) else DECODER


def kind_of(backend: Any) -> str:
    from llmasos.embeddings import Embedder
    from llmasos.pipelines.seq2seq import Seq2SeqLM

    if isinstance(backend, Embedder):
        return ENCODER
    return SEQ2SEQ if isinstance(backend, Seq2SeqLM) else DECODER


def load_backend(model: Any, dtype: str = "auto", device: str = "cpu") -> Any:
    """An LLM, Seq2SeqLM or Embedder for a library name or checkpoint directory (or a loaded one, returned as is)."""
    from llmasos.embeddings import Embedder
    from llmasos.llm import LLM
    from llmasos.pipelines.seq2seq import Seq2SeqLM

    if isinstance(model, (LLM, Seq2SeqLM, Embedder)):
        return model
    if model is None:
        from llmasos.library import default_model_name

        model = default_model_name()
    from llmasos.library import resolve_model

    path = Path(resolve_model(model).path).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"model directory {str(path)!r} does not exist")
    kind = model_kind(path)
    if kind == ENCODER:
        return Embedder.load(model, dtype="float32" if dtype == "auto" else dtype, device=device)
    if kind == SEQ2SEQ:
        return Seq2SeqLM.load(model, dtype=dtype, device=device)
    return LLM.load(model, dtype=dtype, device=device)


class Pipeline:
    """A task bound to a model. Options given to `pipeline(...)` are defaults; those given to a call override them."""

    task = ""
    kinds: tuple[str, ...] = (DECODER, SEQ2SEQ)
    task_options: frozenset[str] = frozenset()

    def __init__(self, backend: Any, **options: Any) -> None:
        kind = kind_of(backend)
        if kind not in self.kinds:
            if kind == ENCODER:
                hint = "it is an encoder: use pipeline('embeddings', ...)"
            elif self.kinds == (ENCODER,):
                hint = "give a BERT-family encoder (bert, roberta, xlm-roberta), e.g. a sentence-transformers model"
            else:
                hint = f"it runs {' and '.join(self.kinds)} models"
            raise ModelLoadError(f"the {self.task} pipeline cannot run a {kind} model; {hint}")
        self.model, self.kind = backend, kind
        self.options = self._check_options(options)

    def _check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        allowed = self.task_options | (GENERATION_OPTIONS if self.kind != ENCODER else frozenset())
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ValueError(f"unknown option {unknown[0]!r} for the {self.task} pipeline; it accepts: "
                             f"{', '.join(sorted(allowed))}")
        return options

    def merged(self, call_options: dict[str, Any]) -> dict[str, Any]:
        return {**self.options, **self._check_options(call_options)}

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def __repr__(self) -> str:
        return f"<{type(self).__name__} task={self.task!r} model={str(getattr(self.model, 'path', '?'))!r}>"


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(generation options, task options)."""
    generation = {k: v for k, v in options.items() if k in GENERATION_OPTIONS}
    return generation, {k: v for k, v in options.items() if k not in GENERATION_OPTIONS}


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def sampling_params(backend: Any, options: dict[str, Any], prompt_length: int = 0,
                    default_max_new_tokens: int | None = None, stop: list[str] | None = None,
                    logprobs: int | None = None) -> SamplingParams:
    """transformers' generate options -> SamplingParams, over the model's defaults.

    As in transformers, decoding is greedy unless `do_sample=True` (or the checkpoint's generation_config.json says
    do_sample), and sampling uses top_k=50 unless told otherwise. `max_length` counts the prompt, `max_new_tokens`
    does not; without either, generation stops at the model's default (256 tokens) or the end of its context."""
    gen = getattr(backend, "generation_config", {}) or {}
    library = getattr(backend, "default_parameters", {}) or {}
    values: dict[str, Any] = {}
    do_sample = _first(options.get("do_sample"), gen.get("do_sample"), False)
    if do_sample:
        values["temperature"] = _first(options.get("temperature"), library.get("temperature"), gen.get("temperature"),
                                       1.0)
        values["top_p"] = _first(options.get("top_p"), library.get("top_p"), gen.get("top_p"), 1.0)
        top_k = _first(options.get("top_k"), library.get("top_k"), gen.get("top_k"), 50)
        values["top_k"] = -1 if top_k in (0, None) else top_k
        values["min_p"] = _first(options.get("min_p"), library.get("min_p"), 0.0)
    else:
        values["temperature"] = 0.0
    values["repetition_penalty"] = _first(options.get("repetition_penalty"), library.get("repetition_penalty"),
                                          gen.get("repetition_penalty"), 1.0)
    max_new = options.get("max_new_tokens")
    if max_new is None and options.get("max_length") is not None:
        max_new = options["max_length"] - prompt_length
        if max_new < 0:
            raise ValueError(f"max_length {options['max_length']} is shorter than the prompt ({prompt_length} tokens)")
    if max_new is None:
        max_new = _first(library.get("max_tokens"), gen.get("max_new_tokens"), default_max_new_tokens,
                         DEFAULT_MAX_NEW_TOKENS)
        engine = getattr(backend, "engine", None)
        if engine is not None:  # a default must fit the context; an explicit value too long is an error instead
            max_new = max(0, min(max_new, engine.max_model_len - prompt_length))
    values["max_tokens"] = max_new
    values["min_tokens"] = min(options.get("min_new_tokens") or 0, max_new)
    values["n"] = options.get("num_return_sequences") or 1
    values["seed"] = options.get("seed")
    values["ignore_eos"] = bool(options.get("ignore_eos", False))
    stops = _first(options.get("stop"), options.get("stop_strings"), library.get("stop"), stop)
    values["stop"] = stops or None
    values["logprobs"] = logprobs
    return SamplingParams(**values)


def render_template(template: str, **fields: Any) -> str:
    """str.format with the task's fields; a template naming an unknown field gets an error that lists the known."""
    try:
        return template.format(**fields)
    except KeyError as exc:
        raise ValueError(f"prompt template field {{{exc.args[0]}}} is unknown; templates can use "
                         f"{', '.join('{' + name + '}' for name in fields)}") from None
    except (IndexError, ValueError) as exc:
        raise ValueError(f"prompt template {template!r} is not a valid format string ({exc}); write literal braces "
                         "as {{ and }}") from None
