"""ModelSpec: a library name or checkpoint directory resolved once into one immutable, serializable description that
every entry point takes (LLM, server, engine process, pipelines, trainer, run, eval); and the one place where
sampling defaults merge: request > Modelfile PARAMETER > generation_config.json > SamplingParams' built-in values."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from llmasos.sampling_params import SamplingParams

ModelKind = Literal["decoder", "encoder", "seq2seq"]
QUANTIZATION_METHODS = ("int8", "int4", "w8a8")
INT4_GROUP_SIZES = (32, 64, 128)
# generation_config.json keys that become request defaults (vLLM's behaviour).
GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def resolve_device(device: Any = None) -> str:
    """The one rule for a device choice: "auto" (or None) is "cuda" when a CUDA GPU is available, else "cpu"; an
    explicit device ("cpu", "cuda", "cuda:1", a torch.device) is kept as given; anything else is a ValueError that
    names the choices (torch's own message lists twenty device types LLMasOS does not run on)."""
    import torch

    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError, ValueError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r} is not supported; use auto, cpu, cuda or cuda:N")
    return str(device)


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs one model: KV cache, batch limits, threads. Immutable; travels inside ModelSpec."""

    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int | str | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    max_model_len: int | None = None
    enforce_eager: bool = False  # no CUDA graphs for decode steps
    num_threads: int | None = None  # torch threads of the engine; None: chosen from the idle cores (llmasos.threads)
    pack_weights: bool = True  # bf16 on CPU: pre-pack linear weights for oneDNN (llmasos.models.packed_linear)
    max_loras: int = 8  # LoRA adapters resident on the device at once (distinct adapters in one batch)
    max_cpu_loras: int | None = None  # adapters kept read in CPU memory (LRU); None: max(32, max_loras)
    max_lora_rank: int = 256  # adapters of a larger rank are refused at load (1..256)

    def __post_init__(self) -> None:
        from llmasos.engine.kv_cache import parse_bytes

        def positive(name: str, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_loras", "max_lora_rank"):
            positive(name)
        if self.max_lora_rank > 256:
            raise ValueError(f"max_lora_rank must be from 1 to 256, got {self.max_lora_rank!r}")
        for name in ("num_kv_blocks", "max_model_len", "num_threads", "max_cpu_loras"):
            positive(name, optional=True)
        if self.kv_cache_memory is not None:
            object.__setattr__(self, "kv_cache_memory", parse_bytes(self.kv_cache_memory))


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, (dict, MappingProxyType)):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to load and run one model, resolved once (`resolve_spec`).

    `parameters` are the Modelfile PARAMETERs (SamplingParams fields); `generation_defaults` the sampling values of
    the checkpoint's generation_config.json; `system` is prepended to conversations without a system message;
    `template` overrides the chat template; `adapters` are LoRA directories merged at load; `lora_adapters` (name ->
    directory) are LoRA adapters served unmerged, selected per request (SamplingParams.lora)."""

    name: str
    path: str
    kind: ModelKind = "decoder"
    adapters: tuple[str, ...] = ()
    lora_adapters: Any = field(default_factory=dict)
    system: str | None = None
    template: str | None = None
    parameters: Any = field(default_factory=dict)
    generation_defaults: Any = field(default_factory=dict)
    dtype: str = "auto"
    device: str = "cpu"
    quantization: str | None = None
    quantization_group_size: int = 32
    engine: EngineOptions = field(default_factory=EngineOptions)
    library: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("decoder", "encoder", "seq2seq"):
            raise ValueError(f"kind must be decoder, encoder or seq2seq, got {self.kind!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)} (or none), "
                             f"got {self.quantization!r}")
        if self.quantization == "int4" and self.quantization_group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {self.quantization_group_size!r}")
        if not isinstance(self.dtype, str):
            object.__setattr__(self, "dtype", str(self.dtype).removeprefix("torch."))
        object.__setattr__(self, "device", resolve_device(self.device))
        if isinstance(self.engine, dict):
            object.__setattr__(self, "engine", EngineOptions(**self.engine))
        object.__setattr__(self, "path", str(self.path))
        object.__setattr__(self, "adapters", tuple(str(a) for a in self.adapters))
        loras = {str(name): str(path) for name, path in dict(self.lora_adapters).items()}
        object.__setattr__(self, "lora_adapters", _freeze(loras))
        object.__setattr__(self, "parameters", _freeze(dict(self.parameters)))
        object.__setattr__(self, "generation_defaults", _freeze(dict(self.generation_defaults)))

    @property
    def directory(self) -> Path:
        return Path(self.path)

    # -- sampling ----------------------------------------------------------------------------------------------
    def sampling_defaults(self) -> dict[str, Any]:
        """The model's default SamplingParams values: generation_config.json, then Modelfile PARAMETERs."""
        return {**_thaw(self.generation_defaults), **_thaw(self.parameters)}

    def sampling_params(self, **request_values: Any) -> SamplingParams:
        """SamplingParams for one request: its own values (None = unset) over the model's defaults."""
        values = self.sampling_defaults()
        values.update({key: value for key, value in request_values.items() if value is not None})
        return SamplingParams(**values)

    # -- serialization -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["engine"] = dataclasses.asdict(self.engine)
        data["parameters"] = _thaw(self.parameters)
        data["lora_adapters"] = _thaw(self.lora_adapters)
        data["generation_defaults"] = _thaw(self.generation_defaults)
        data["adapters"] = list(self.adapters)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelSpec fields: {', '.join(unknown)}")
        return cls(**{**data, "engine": EngineOptions(**data.get("engine", {}))})

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> ModelSpec:
        """A copy with some fields changed; `engine` may be a dict of EngineOptions fields to change."""
        engine = changes.pop("engine", None)
        if isinstance(engine, dict):
            changes["engine"] = dataclasses.replace(self.engine, **engine)
        elif engine is not None:
            changes["engine"] = engine
        return dataclasses.replace(self, **changes)


def generation_defaults(generation_config: dict[str, Any]) -> dict[str, Any]:
    """The SamplingParams values a checkpoint's generation_config.json implies (do_sample false means greedy)."""
    values: dict[str, Any] = {k: generation_config[k] for k in GENERATION_DEFAULT_KEYS
                              if isinstance(generation_config.get(k), (int, float))
                              and not isinstance(generation_config.get(k), bool)}
    if generation_config.get("do_sample") is False:
        values["temperature"] = 0.0
    if values.get("top_k") == 0:
        values["top_k"] = -1
    max_new = generation_config.get("max_new_tokens")
    if isinstance(max_new, int) and not isinstance(max_new, bool) and max_new > 0:
        values["max_tokens"] = max_new  # vLLM's reading of it: the default output length
    return values


def model_kind(directory: Path) -> ModelKind:
    """decoder, encoder (a sentence-embedding / BERT-family model) or seq2seq (T5), from the directory's files."""
    from llmasos.embeddings import is_embedding_model
    from llmasos.models.loader import read_json_file
    from llmasos.models.t5 import is_seq2seq_config

    if is_embedding_model(directory):
        return "encoder"
    config = read_json_file(directory / "config.json", required=False)
    return "seq2seq" if config and is_seq2seq_config(config) else "decoder"


def resolve_spec(name_or_path: str | Path | ModelSpec, *, dtype: Any = None, device: Any = None,
                 quantization: str | None = None, quantization_group_size: int | None = None,
                 **engine_options: Any) -> ModelSpec:
    """Resolve a library name or checkpoint directory (or pass a spec through, with these options applied).

    `device` None or "auto" becomes "cuda" when a GPU is available, else "cpu" (`resolve_device`); `dtype` "auto" is
    resolved at load, where the device is known (llmasos.models.loader.resolve_dtype).

    Quantization comes from the argument, else the Modelfile PARAMETER quantization, else a stored quantized
    checkpoint's config.json."""
    from llmasos.library import resolve_model
    from llmasos.models.loader import read_json_file, resolve_directory

    if isinstance(name_or_path, ModelSpec):
        changes: dict[str, Any] = {}
        if dtype is not None:
            changes["dtype"] = dtype
        if device is not None:
            changes["device"] = resolve_device(device)
        if quantization is not None:
            changes["quantization"] = quantization
        if quantization_group_size is not None:
            changes["quantization_group_size"] = quantization_group_size
        if engine_options:
            changes["engine"] = engine_options
        return name_or_path.replace(**changes) if changes else name_or_path
    resolved = resolve_model(name_or_path)
    directory = resolve_directory(resolved.path)  # a missing or non-directory path is named here, once
    if not (directory / "config.json").exists() and (directory / "adapter_config.json").is_file():
        from llmasos.errors import ModelLoadError

        raise ModelLoadError(f"{directory} is a LoRA adapter, not a model: import it (`llmasos import {directory} "
                             "--name NAME` makes a model of its base plus the adapter) and use NAME, or serve it on "
                             f"its base (`llmasos serve --model BASE --lora NAME={directory}`)")
    parameters = dict(resolved.parameters)
    from llmasos.library.quantized import checkpoint_quantization

    stored_method, stored_group = checkpoint_quantization(directory) or (None, None)
    asked_method, asked_group = parameters.pop("quantization", None), parameters.pop("quantization_group_size", None)
    method = quantization or asked_method or stored_method
    group = quantization_group_size or asked_group or stored_group or 32
    generation = generation_defaults(read_json_file(directory / "generation_config.json", required=False))
    return ModelSpec(
        name=resolved.name, path=str(directory), kind=model_kind(directory),
        adapters=(str(resolved.adapter),) if resolved.adapter is not None else (), system=resolved.system,
        template=resolved.template, parameters=parameters, generation_defaults=generation, dtype=dtype or "auto",
        device=resolve_device(device), quantization=method, quantization_group_size=int(group),
        engine=EngineOptions(**engine_options), library=resolved.library)
