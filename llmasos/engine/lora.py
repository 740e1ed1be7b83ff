"""LoRA adapters served unmerged: reading and checking PEFT adapters against the base, and the engine's adapter
store — registered names, an LRU of adapters held in CPU memory (`max_cpu_loras`) and `max_loras` device slots whose
weights the wrapped linear layers read (llmasos.models.lora_linear).

Each load gets a fresh `lora_id`: requests, prefix-cache hashes and slots key on it, so an adapter unloaded and
loaded again under the same name never meets KV computed with the old weights."""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from llmasos.errors import LLMasOSError

log = logging.getLogger(__name__)

MAX_LORA_RANK = 256
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class LoRAError(LLMasOSError, ValueError):
    """An adapter that cannot be served (unreadable, pickle-only, another base, rank too large) or an unknown name."""


@dataclass
class LoRAAdapter:
    """One adapter in CPU memory: per target module path, A (r, in) and B (out, r) in float32 and its scale."""

    name: str
    path: str
    lora_id: int
    weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]]

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _, _ in self.weights.values())


def _pattern_value(path: str, pattern: dict, default):
    for key, value in (pattern or {}).items():
        if path == key or path.endswith("." + key):
            return value
    return default


def read_lora_adapter(path: str | Path, targets: dict[str, tuple[int, int]], max_rank: int = MAX_LORA_RANK,
                      name: str = "", lora_id: int = 0) -> LoRAAdapter:
    """Read a PEFT LoRA adapter directory and check it against the base's target layers (path -> (in, out))."""
    directory = Path(path).expanduser()
    label = f"LoRA adapter {name!r} ({directory})" if name else f"LoRA adapter {directory}"
    if not directory.is_dir():
        raise LoRAError(f"{label}: directory not found")
    weights_path, config_path = directory / ADAPTER_WEIGHTS, directory / ADAPTER_CONFIG
    if not weights_path.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise LoRAError(f"{label} holds only adapter_model.bin (a pickle, which can run code when loaded); save "
                            f"it as {ADAPTER_WEIGHTS} (PEFT's save_pretrained(safe_serialization=True))")
        raise LoRAError(f"{label}: {ADAPTER_WEIGHTS} not found")
    if not config_path.is_file():
        raise LoRAError(f"{label}: {ADAPTER_CONFIG} not found")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoRAError(f"{label}: {ADAPTER_CONFIG} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"{label}: only LoRA adapters are supported, got peft_type "
                        f"{config.get('peft_type') if isinstance(config, dict) else None!r}")
    if config.get("use_dora"):
        raise LoRAError(f"{label}: DoRA adapters (use_dora: true) are not supported")
    alpha, use_rslora = float(config.get("lora_alpha", 8)), bool(config.get("use_rslora", False))
    alpha_pattern = config.get("alpha_pattern") or {}
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
    except Exception as exc:  # safetensors raises its own error types on corrupt files
        raise LoRAError(f"{label}: {weights_path.name} is not a valid safetensors file: {exc}") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, sep, kind = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if not sep or kind not in ("A.weight", "B.weight"):
            raise LoRAError(f"{label}: tensor {key!r} is not a LoRA A/B matrix of a linear layer (bias, "
                            "modules_to_save and embedding adapters are not supported unmerged; merge it instead)")
        pairs.setdefault(module, {})[kind[0]] = tensor
    if not pairs:
        raise LoRAError(f"{label}: the adapter holds no LoRA weights")
    weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise LoRAError(f"{label}: {module!r} has lora_{'A' if 'B' in pair else 'B'} but not its partner")
        if module not in targets:
            example = next(iter(targets), "none")
            raise LoRAError(f"{label} targets {module!r}, which is not a linear layer inside this base model's "
                            f"decoder layers (e.g. {example!r}); was it trained on another base model?")
        a, b = pair["A"], pair["B"]
        in_features, out_features = targets[module]
        rank = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_features or b.shape != (out_features, rank):
            raise LoRAError(f"{label}: {module!r} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, but the base "
                            f"layer maps {in_features} -> {out_features} features; was it trained on another base "
                            "model?")
        if not 1 <= rank <= max_rank:
            raise LoRAError(f"{label}: rank {rank} of {module!r} is over the limit of {max_rank} (max_lora_rank; "
                            f"ranks 1 to {MAX_LORA_RANK} are supported)")
        module_alpha = float(_pattern_value(module, alpha_pattern, alpha))
        scale = module_alpha / math.sqrt(rank) if use_rslora else module_alpha / rank
        weights[module] = (a.float(), b.float(), scale)
    return LoRAAdapter(name, str(directory), lora_id, weights)


def checkpoint_targets(directory: str | Path) -> dict[str, tuple[int, int]]:
    """The LoRA targets of a checkpoint's model, from its config.json alone (the model is built on the meta
    device): lets a front end check an adapter without the weights."""
    from llmasos.models import model_class
    from llmasos.models.loader import read_config
    from llmasos.models.lora_linear import lora_targets

    config = read_config(Path(directory))
    with torch.device("meta"):
        model = model_class(config)(config)
    return lora_targets(model)


class LoRAManager:
    """The engine's adapters: names that accept requests, adapters being retired (unloaded with requests in flight),
    the CPU LRU and the device slots. Wrapping the model's linears waits for the first adapter, so an engine that
    never loads one runs its plain layers."""

    def __init__(self, model: torch.nn.Module, max_loras: int, max_cpu_loras: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        from llmasos.models.lora_linear import LoRABatch, lora_targets

        self.model = model
        self.max_loras, self.max_cpu_loras, self.max_rank = max_loras, max(max_cpu_loras, max_loras), max_rank
        self.dtype, self.device = dtype, device
        self.batch = LoRABatch()
        self.targets = lora_targets(model)
        self.layers: dict | None = None
        self.names: dict[str, int] = {}  # name -> lora_id, accepting requests
        self.paths: dict[int, tuple[str, str]] = {}  # lora_id -> (name, path), registered or retiring
        self.retiring: set[int] = set()
        self.cpu: OrderedDict[int, LoRAAdapter] = OrderedDict()  # LRU: most recently used last
        self.slots: OrderedDict[int, int] = OrderedDict()  # lora_id -> slot, LRU
        self._ids = itertools.count(1)

    # -- registry ----------------------------------------------------------------------------------------------
    def load(self, name: str, path: str | Path) -> int:
        """Register an adapter under `name` (read and checked now); returns its lora_id."""
        if not isinstance(name, str) or not name:
            raise LoRAError(f"a LoRA adapter needs a non-empty name, got {name!r}")
        path = str(Path(path).expanduser())
        if name in self.names:
            loaded = self.paths[self.names[name]][1]
            if loaded == path:
                return self.names[name]
            raise LoRAError(f"a LoRA adapter named {name!r} is already loaded (from {loaded}); unload it first")
        lora_id = next(self._ids)
        adapter = read_lora_adapter(path, self.targets, self.max_rank, name, lora_id)
        self.names[name] = lora_id
        self.paths[lora_id] = (name, path)
        self._cache(adapter)
        log.info("LoRA adapter %s loaded from %s (rank %d, %d layers)", name, path, adapter.rank,
                 len(adapter.weights))
        return lora_id

    def unload(self, name: str) -> None:
        """Stop accepting requests for `name`; its weights go once its requests in flight are done (`collect`)."""
        lora_id = self.names.pop(name, None)
        if lora_id is None:
            raise LoRAError(f"no LoRA adapter named {name!r} is loaded (loaded: {', '.join(self.names) or 'none'})")
        self.retiring.add(lora_id)

    def lora_id(self, name: str) -> int:
        try:
            return self.names[name]
        except KeyError:
            raise LoRAError(f"unknown LoRA adapter {name!r}; loaded adapters: "
                            f"{', '.join(sorted(self.names)) or 'none'}") from None

    def list(self) -> dict[str, str]:
        """Adapters accepting requests: name -> path."""
        return {name: self.paths[lora_id][1] for name, lora_id in self.names.items()}

    def collect(self, in_flight: set[int]) -> None:
        """Drop retired adapters that no request in flight uses any more."""
        for lora_id in [i for i in self.retiring if i not in in_flight]:
            self.retiring.discard(lora_id)
            self.paths.pop(lora_id, None)
            self.cpu.pop(lora_id, None)
            slot = self.slots.pop(lora_id, None)
            if slot is not None:
                self._clear_slot(slot)

    # -- memory tiers ------------------------------------------------------------------------------------------
    def _cache(self, adapter: LoRAAdapter) -> None:
        self.cpu[adapter.lora_id] = adapter
        self.cpu.move_to_end(adapter.lora_id)
        while len(self.cpu) > self.max_cpu_loras:
            self.cpu.popitem(last=False)  # read back from disk when next needed

    def _adapter(self, lora_id: int) -> LoRAAdapter:
        adapter = self.cpu.get(lora_id)
        if adapter is None:
            name, path = self.paths[lora_id]
            adapter = read_lora_adapter(path, self.targets, self.max_rank, name, lora_id)
        self._cache(adapter)
        return adapter

    def activate(self, lora_ids: set[int]) -> None:
        """Make every adapter of the step resident in a device slot (the scheduler admits at most max_loras distinct
        adapters, so they fit), evicting the least recently used ones the step does not need."""
        for lora_id in lora_ids:
            if lora_id in self.slots:
                self.slots.move_to_end(lora_id)
                continue
            if len(self.slots) < self.max_loras:
                slot = min(set(range(self.max_loras)) - set(self.slots.values()))
            else:
                victim = next(i for i in self.slots if i not in lora_ids)
                slot = self.slots.pop(victim)
            self._fill_slot(slot, self._adapter(lora_id))
            self.slots[lora_id] = slot

    def slot_of(self, lora_id: int) -> int:
        return self.slots[lora_id]

    def _fill_slot(self, slot: int, adapter: LoRAAdapter) -> None:
        if self.layers is None:
            from llmasos.models.lora_linear import install_lora_layers

            self.layers = install_lora_layers(self.model, self.batch)
        for path, layer in self.layers.items():
            weights = adapter.weights.get(path)
            if weights is None:
                layer.slots.pop(slot, None)
                continue
            a, b, scale = weights
            # A^T (in, r) and (B * scale)^T (r, out): y += (x @ A^T) @ (scale B)^T, two contiguous GEMMs
            layer.slots[slot] = (a.t().to(self.device, self.dtype).contiguous(),
                                 (b * scale).t().to(self.device, self.dtype).contiguous())

    def _clear_slot(self, slot: int) -> None:
        for layer in (self.layers or {}).values():
            layer.slots.pop(slot, None)
