"""TrainingArguments: every knob of a training run, with transformers' names, validated when built."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

SCHEDULERS = ("constant", "linear", "cosine")
METHODS = ("full", "lora")
OBJECTIVES = ("causal", "mlm", "classification")
DEFAULT_LEARNING_RATES = {"full": 5e-5, "lora": 2e-4}


@dataclass
class TrainingArguments:
    """How to train. Names and meanings follow `transformers.TrainingArguments`; LoRA knobs follow PEFT's LoraConfig.

    One optimizer step sees `per_device_train_batch_size * gradient_accumulation_steps * world_size` examples (the
    global batch). `max_steps > 0` overrides `num_train_epochs`. `learning_rate=None` picks 5e-5 for full fine-tuning
    and 2e-4 for LoRA. `eval_steps=None` evaluates once, at the end; `max_seq_length=None` uses the model's context,
    capped at 1024 tokens. `objective` picks what is learnt: "causal" (next-token prediction, decoders), "mlm"
    (masked language modelling with `mlm_probability`, BERT encoders) or "classification" (a label per text: data
    of {"text", "label"} or {"text", "text_pair", "label"} records)."""

    output_dir: str = "llmasos-output"
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float | None = None
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    eval_steps: int | None = None
    save_steps: int | None = 500
    save_total_limit: int | None = None
    seed: int = 42
    bf16: bool = False
    gradient_checkpointing: bool = False
    max_seq_length: int | None = None
    device: str = "auto"
    fsdp: bool = False
    progress_bar: bool = True
    method: str = "full"
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None
    objective: str = "causal"  # causal (next token), mlm (BERT's masked LM) or classification (one label per text)
    mlm_probability: float = 0.15
    mlm_whole_word: bool = False  # mask whole words (all the pieces of a chosen word), as whole_word_mask=True

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"TrainingArguments: {message}")

        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        check(isinstance(self.output_dir, str) and bool(self.output_dir), "output_dir must be a non-empty path")
        check(isinstance(self.num_train_epochs, (int, float)) and self.num_train_epochs > 0
              and math.isfinite(self.num_train_epochs), f"num_train_epochs must be > 0, got {self.num_train_epochs!r}")
        check(is_int(self.max_steps) and (self.max_steps == -1 or self.max_steps > 0),
              f"max_steps must be -1 (use num_train_epochs) or a positive integer, got {self.max_steps!r}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "lora_r"):
            value = getattr(self, name)
            check(is_int(value) and value > 0, f"{name} must be a positive integer, got {value!r}")
        for name in ("eval_steps", "save_steps", "save_total_limit", "max_seq_length"):
            value = getattr(self, name)
            check(value is None or (is_int(value) and value > 0),
                  f"{name} must be a positive integer or None, got {value!r}")
        check(self.learning_rate is None or (isinstance(self.learning_rate, (int, float)) and self.learning_rate >= 0),
              f"learning_rate must be a number >= 0, got {self.learning_rate!r}")
        check(isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0,
              f"weight_decay must be >= 0, got {self.weight_decay!r}")
        check(self.lr_scheduler_type in SCHEDULERS,
              f"lr_scheduler_type must be one of {', '.join(SCHEDULERS)}, got {self.lr_scheduler_type!r}")
        check(is_int(self.warmup_steps) and self.warmup_steps >= 0,
              f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        check(isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm >= 0,
              f"max_grad_norm must be >= 0 (0 turns clipping off), got {self.max_grad_norm!r}")
        check(is_int(self.seed), f"seed must be an integer, got {self.seed!r}")
        check(self.objective in OBJECTIVES,
              f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        check(isinstance(self.mlm_probability, (int, float)) and 0 < self.mlm_probability < 1,
              f"mlm_probability must be in (0, 1), got {self.mlm_probability!r}")
        check(isinstance(self.mlm_whole_word, bool),
              f"mlm_whole_word must be true or false, got {self.mlm_whole_word!r}")
        check(self.method in METHODS, f"method must be 'full' or 'lora', got {self.method!r}")
        check(isinstance(self.lora_alpha, (int, float)) and self.lora_alpha > 0,
              f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        check(isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1,
              f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [name.strip() for name in self.lora_target_modules.split(",") if name.strip()]
        check(self.lora_target_modules is None or (
            isinstance(self.lora_target_modules, list) and self.lora_target_modules
            and all(isinstance(name, str) and name for name in self.lora_target_modules)),
            "lora_target_modules must be a non-empty list of module names (e.g. ['q_proj', 'v_proj']) or None")
        check(self.device == "auto" or str(self.device).split(":")[0] in ("cpu", "cuda"),
              f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")

    @property
    def effective_learning_rate(self) -> float:
        return DEFAULT_LEARNING_RATES[self.method] if self.learning_rate is None else float(self.learning_rate)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingArguments:
        """Build from a recipe's `training:` mapping; unknown keys are an error that lists the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)
