"""What every task pipeline shares: loading the right kind of model for a ModelSpec, name or path, the Pipeline base
class, and the mapping of transformers-style generation options onto the request values of the model's spec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmasos.errors import ModelLoadError
from llmasos.sampling_params import SamplingParams
from llmasos.spec import ModelSpec, generation_defaults, resolve_spec

ENCODER, SEQ2SEQ, DECODER = "encoder", "seq2seq", "decoder"
DEFAULT_MAX_NEW_TOKENS = 256
TRANSFORMERS_TOP_K = 50  # what transformers samples with when neither the call nor the model sets top_k
# transformers-style generation options every generating pipeline accepts (besides its task options).
GENERATION_OPTIONS = frozenset({
    "max_new_tokens", "max_length", "min_new_tokens", "do_sample", "temperature", "top_p", "top_k", "min_p",
    "repetition_penalty", "num_return_sequences", "seed", "stop", "stop_strings", "ignore_eos",
    "structured_outputs",  # a constraint on the output: {json | json_object | regex | choice | grammar}
})


def kind_of(backend: Any) -> str:
    from llmasos.embeddings import Embedder
    from llmasos.pipelines.seq2seq import Seq2SeqLM

    if isinstance(backend, Embedder):
        return ENCODER
    return SEQ2SEQ if isinstance(backend, Seq2SeqLM) else DECODER


def spec_of(backend: Any) -> ModelSpec:
    """The ModelSpec a loaded LLM, Seq2SeqLM or Embedder was made from."""
    spec = getattr(backend, "spec", None)
    if isinstance(spec, ModelSpec):
        return spec
    # A backend built by hand rather than by `load`: a spec of its checkpoint alone.
    path = getattr(backend, "path", None)
    return ModelSpec(name=Path(path).name if path else type(backend).__name__, path=str(path or ""),
                     kind=kind_of(backend),
                     generation_defaults=generation_defaults(getattr(backend, "generation_config", None) or {}))


def load_backend(model: Any, dtype: str = "auto", device: str = "cpu") -> Any:
    """An LLM, Seq2SeqLM or Embedder for a ModelSpec, library name or checkpoint directory (or a loaded one, returned
    as is). The name is resolved once, here; the spec's kind picks the backend and every backend gets that spec."""
    from llmasos.embeddings import Embedder
    from llmasos.llm import LLM
    from llmasos.pipelines.seq2seq import Seq2SeqLM

    if isinstance(model, (LLM, Seq2SeqLM, Embedder)):
        return model
    if model is None:
        from llmasos.library import default_model_name

        model = default_model_name()
    spec = resolve_spec(model, dtype=dtype, device=device)
    if not spec.directory.is_dir():
        raise ModelLoadError(f"model directory {spec.path!r} does not exist")
    if spec.kind == ENCODER:
        return Embedder.load(spec)
    if spec.kind == SEQ2SEQ:
        return Seq2SeqLM.load(spec)
    return LLM.load(spec)


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
            article = "an" if kind[0] in "aeiou" else "a"
            raise ModelLoadError(f"the {self.task} pipeline cannot run {article} {kind} model; {hint}")
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


def _checkpoint_generation_config(backend: Any, spec: ModelSpec) -> dict[str, Any]:
    """generation_config.json as the checkpoint wrote it: its do_sample and max_new_tokens are transformers' own
    defaults, which the spec's sampling defaults do not carry."""
    config = getattr(backend, "generation_config", None)
    if config is None and spec.path:
        from llmasos.models.loader import read_json_file

        config = read_json_file(spec.directory / "generation_config.json", required=False)
    return config or {}


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def sampling_params(backend: Any, options: dict[str, Any], prompt_length: int = 0,
                    default_max_new_tokens: int | None = None, stop: list[str] | None = None,
                    logprobs: int | None = None) -> SamplingParams:
    """transformers' generate options -> request values for the model's spec, whose `sampling_params` merges them
    over the model's defaults (Modelfile PARAMETERs, then generation_config.json).

    As in transformers, decoding is greedy unless `do_sample=True` (or the checkpoint's generation_config.json says
    do_sample), and sampling uses top_k=50 unless the call or the model says otherwise. `max_length` counts the
    prompt, `max_new_tokens` does not; without either, generation stops at the model's default (256 tokens) or the
    end of its context."""
    spec = spec_of(backend)
    model_defaults = spec.sampling_defaults()
    checkpoint_config = _checkpoint_generation_config(backend, spec)
    request: dict[str, Any] = {key: options.get(key) for key in ("temperature", "top_p", "top_k", "min_p",
                                                                 "repetition_penalty")}
    if not _first(options.get("do_sample"), checkpoint_config.get("do_sample"), False):
        request["temperature"] = 0.0
    elif request["top_k"] is None and model_defaults.get("top_k") is None:
        request["top_k"] = TRANSFORMERS_TOP_K
    if request["top_k"] == 0:
        request["top_k"] = -1
    max_new = options.get("max_new_tokens")
    if max_new is None and options.get("max_length") is not None:
        max_new = options["max_length"] - prompt_length
        if max_new < 0:
            raise ValueError(f"max_length {options['max_length']} is shorter than the prompt ({prompt_length} tokens)")
    if max_new is None:
        max_new = _first(model_defaults.get("max_tokens"), checkpoint_config.get("max_new_tokens"),
                         default_max_new_tokens, DEFAULT_MAX_NEW_TOKENS)
        engine = getattr(backend, "engine", None)
        if engine is not None:  # a default must fit the context; an explicit value too long is an error instead
            max_new = max(0, min(max_new, engine.max_model_len - prompt_length))
    request["max_tokens"] = max_new
    request["min_tokens"] = min(_first(options.get("min_new_tokens"), model_defaults.get("min_tokens"), 0), max_new)
    request["n"] = options.get("num_return_sequences") or None
    request["seed"] = options.get("seed")
    request["ignore_eos"] = options.get("ignore_eos")
    # The task's own stop strings (a plain completion prompt's) come after the model's.
    request["stop"] = _first(options.get("stop"), options.get("stop_strings"), model_defaults.get("stop"), stop)
    request["logprobs"] = logprobs
    params = spec.sampling_params(**request)
    if options.get("structured_outputs") is not None:
        params.structured_outputs = options["structured_outputs"]
        params.__post_init__()  # coerced and checked as SamplingParams does
    return params


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
