"""LLMTrainer: pretrain or fine-tune (full or LoRA) a native model, then save a checkpoint that transformers, PEFT
and `LLM.load` all read.

    >>> model = LLMTrainer.from_pretrained("path/to/gpt2")
    >>> model.train(["some text", ...])
    >>> model.save_pretrained("my_llm")
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from llmasos.errors import ModelLoadError
from llmasos.files import atomic_directory
from llmasos.models import CausalLM, ModelConfig, load_config, model_class
from llmasos.models.loader import load_model, read_json_file
from llmasos.spec import ModelSpec, resolve_spec
from llmasos.tokenizer import Tokenizer
from llmasos.train import checkpoint as ckpt
from llmasos.train import lora
from llmasos.train.arguments import TrainingArguments
from llmasos.train.data import read_records
from llmasos.train.dataset import DatasetReport, Example, build_examples
from llmasos.train.distributed import DistContext, full_state_dicts, setup, wrap
from llmasos.train.initialize import complete_config, init_weights
from llmasos.train.loop import Loop, LossModule, TrainResult, count_parameters, evaluate_loss
from llmasos.train.reporting import Reporter
from llmasos.train.save import DTYPE_NAMES, export_model, stored_dtype

DEFAULT_MAX_SEQ_LENGTH = 1024


class LLMTrainer:
    """A model being trained: a native CausalLM (float32 master weights), its tokenizer, and the run settings."""

    def __init__(self, model: CausalLM, tokenizer: Tokenizer, *, source: str | None = None,
                 generation_config: dict[str, Any] | None = None, spec: ModelSpec | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        self.spec = spec  # the model this one was loaded from (None when initialised from scratch)
        self.generation_config = dict(generation_config or {})
        # The dtype the source checkpoint is stored in: a saved model keeps it (a bf16 base gives a bf16 merged
        # model, not one twice its size) while training computes in float32. None: from scratch, keep the weights'.
        self.save_dtype: torch.dtype | None = None
        self.lora_settings: dict[str, Any] | None = None
        self.state: TrainResult | None = None
        self._is_main = True

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: ModelSpec | str | Path, dtype: str | torch.dtype | None = None) -> LLMTrainer:
        """Load a ModelSpec, a library model or a Hugging Face checkpoint directory (our native families) to train
        further; weights in float32 unless `dtype` (or the spec's dtype) says otherwise. The spec's LoRA adapters are
        merged in and its chat template used, so training renders conversations exactly as serving that model does."""
        spec = resolve_spec(model, dtype=dtype if dtype is not None else "auto")
        if spec.kind != "decoder":
            raise ModelLoadError(f"{spec.name} is {'an' if spec.kind == 'encoder' else 'a'} {spec.kind} model; the "
                                 "trainer trains decoder-only models")
        if spec.quantization is not None:
            raise ModelLoadError(f"{spec.name} is {spec.quantization}-quantized, which is for serving; train the "
                                 "unquantized model it was made from instead")
        weights, _ = load_model(spec.path, dtype="float32" if spec.dtype == "auto" else spec.dtype, device="cpu")
        for adapter in spec.adapters:  # a Modelfile ADAPTER: the model served is the base plus it
            lora.apply_adapter(weights, adapter)
        tokenizer = Tokenizer.from_dir(spec.directory)
        if spec.template is not None:
            tokenizer.chat_template = spec.template
        source = str(model) if not isinstance(model, ModelSpec) else spec.name if spec.library else spec.path
        trainer = cls(weights, tokenizer, source=source, spec=spec,
                      generation_config=read_json_file(spec.directory / "generation_config.json", required=False))
        trainer.save_dtype = stored_dtype(weights.config, Path(spec.path))
        return trainer

    @classmethod
    def from_config(cls, config: dict[str, Any] | ModelConfig | str | Path, tokenizer: Tokenizer | str | Path,
                    seed: int = 0) -> LLMTrainer:
        """A randomly initialised model (transformers' initialisation) to pretrain from scratch. `config` is a
        config.json dict (model_type plus sizes; vocab_size defaults to the tokenizer's), a ModelConfig, or a path
        to a config.json; `tokenizer` a Tokenizer or a directory holding tokenizer.json."""
        if not isinstance(tokenizer, Tokenizer):
            tokenizer = Tokenizer.from_dir(Path(tokenizer))
        if isinstance(config, ModelConfig):
            data = dict(config.raw) or {"model_type": config.model_type}
        elif isinstance(config, (str, Path)):
            path = Path(config)
            data = read_json_file(path / "config.json" if path.is_dir() else path)
            if not data:
                raise ModelLoadError(f"{path}: no model config found (expected a config.json)")
        else:
            data = dict(config)
        model_config = load_config(complete_config(data, tokenizer))
        torch.manual_seed(seed)
        model = model_class(model_config)(model_config)
        init_weights(model)
        model.eval()
        return cls(model, tokenizer, source=None)

    # -- training -----------------------------------------------------------------------------------------------
    def _max_seq_length(self, args: TrainingArguments) -> int:
        limit = self.config.max_context_length
        if args.max_seq_length is None:
            return min(limit, DEFAULT_MAX_SEQ_LENGTH)
        if args.max_seq_length > limit:
            raise ValueError(f"max_seq_length {args.max_seq_length} exceeds the model's context of {limit} tokens")
        return args.max_seq_length

    def prepare_data(self, data: Any, args: TrainingArguments,
                     name: str = "train_data") -> tuple[list[Example], DatasetReport]:
        """Records -> examples, with the skip report."""
        return build_examples(read_records(data, name), self.tokenizer, self._max_seq_length(args), name,
                              self.config.vocab_size)

    def _pad_id(self) -> int:
        for token_id in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if token_id is not None:
                return token_id
        return 0

    def train(self, train_data: Any, eval_data: Any = None, args: TrainingArguments | None = None,
              resume_from_checkpoint: str | Path | bool | None = None) -> TrainResult:
        """Train on `train_data` (a list of strings or {"text"} / {"prompt", "completion"} / {"messages"} dicts, or
        a .txt / .jsonl / .json path); evaluate on `eval_data` if given. Under torchrun every rank calls this."""
        args = args or TrainingArguments()
        ctx = setup(args.device)
        self._is_main = ctx.is_main
        output_dir = Path(args.output_dir)
        train_examples, report = self.prepare_data(train_data, args)
        eval_examples = self.prepare_data(eval_data, args, "eval_data")[0] if eval_data is not None else None
        resume_dir = ckpt.resolve_resume(resume_from_checkpoint, output_dir)
        if ctx.is_main:
            ckpt.sweep_temporaries(output_dir)

        torch.manual_seed(args.seed)
        if args.method == "lora" and self.lora_settings is None:
            targets = lora.add_lora(self.model, args.lora_r, args.lora_alpha, args.lora_dropout,
                                    args.lora_target_modules)
            self.lora_settings = {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                                  "targets": targets}
        elif args.method == "full" and self.lora_settings is not None:
            raise ValueError("this model carries LoRA adapters: train it with method='lora', or save it with "
                             "merge=True and load the merged model for full training")
        num_trainable, num_parameters = count_parameters(self.model)  # before FSDP shards them
        self.model.to(ctx.device)
        self.model.gradient_checkpointing = args.gradient_checkpointing
        self.model.train()
        module = LossModule(self.model)
        wrapped = wrap(module, ctx, self.model.decoder_layers(), args.fsdp)
        loop = Loop(module, wrapped, args, ctx, train_examples, eval_examples, self._pad_id(),
                    write_model=self._write_checkpoint_model,
                    reporter_factory=lambda total, start: Reporter(output_dir, total, start, ctx.is_main,
                                                                   args.progress_bar),
                    num_records=report.num_records)
        start_step = 0
        if resume_dir is not None:
            start_step = loop.resume(resume_dir, self._read_checkpoint_model(resume_dir))
        if ctx.is_main and report.num_skipped:
            warnings.warn(f"train_data: {report.skip_summary()}", stacklevel=2)
        result = loop.run(start_step)
        result.skipped = report.skipped
        result.num_trainable_parameters, result.num_parameters = num_trainable, num_parameters
        self._finish(module, ctx, args)
        self.state = result
        return result

    def _finish(self, module: LossModule, ctx: DistContext, args: TrainingArguments) -> None:
        """After training: plain, unsharded weights back on the CPU of rank 0 (FSDP gathers them)."""
        self.model.gradient_checkpointing = False
        if args.fsdp and ctx.distributed:
            state, _ = full_state_dicts(module, None, ctx)
            if ctx.is_main:
                model = model_class(self.config)(self.config)
                if self.lora_settings:
                    s = self.lora_settings
                    lora.add_lora(model, s["r"], s["alpha"], s["dropout"], [t.rsplit(".", 1)[-1] for t in s["targets"]])
                model.load_state_dict({k[len("model."):]: v for k, v in state.items()})
                model.tie_weights()
                self.model = model
        self.model.to("cpu")
        self.model.eval()

    def evaluate(self, eval_data: Any, args: TrainingArguments | None = None) -> dict[str, float]:
        """Mean token loss and perplexity on `eval_data` (same formats as train_data), in this process."""
        args = args or TrainingArguments()
        examples, _ = self.prepare_data(eval_data, args, "eval_data")
        device = next(self.model.parameters()).device
        loss = evaluate_loss(LossModule(self.model), examples, args, DistContext(device=device), self._pad_id())
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700))}

    # -- checkpoints and export ---------------------------------------------------------------------------------
    def _write_checkpoint_model(self, directory: Path, state: dict[str, torch.Tensor]) -> None:
        if self.lora_settings:
            self._write_adapter(directory, state)
            self.tokenizer.save(directory)
        else:
            export_model(state, self.config, self.tokenizer, directory, dtype=torch.float32,
                         existing_generation_config=self.generation_config)

    def _read_checkpoint_model(self, directory: Path) -> dict[str, torch.Tensor]:
        """The weights a checkpoint holds, under our parameter names (the tied head filled in)."""
        if self.lora_settings:
            _, tensors = lora.read_adapter(directory)
            return lora.adapter_to_state(tensors)
        path = directory / "model.safetensors"
        if not path.is_file():
            raise ckpt.CheckpointError(f"{path} is missing: {directory} is not a full-model checkpoint")
        state = load_file(str(path))
        if self.config.tie_word_embeddings:
            state["lm_head.weight"] = _embedding_tensor(self.model, state)
        return state

    def _write_adapter(self, directory: Path, state: dict[str, torch.Tensor]) -> None:
        s = self.lora_settings
        config = lora.adapter_config(self.model, s["r"], s["alpha"], s["dropout"], self.source)
        lora.save_adapter(state, directory, config)

    def save_pretrained(self, out_dir: str | Path, merge: bool = False, dtype: str | torch.dtype | None = None) -> Path:
        """Write a Hugging Face checkpoint (config.json, model.safetensors, tokenizer, chat template,
        generation_config.json). After LoRA training: the PEFT adapter (adapter_config.json +
        adapter_model.safetensors), or with merge=True the merged full model. The weights are stored in `dtype`,
        by default the dtype of the checkpoint this model was loaded from. Only rank 0 writes. `out_dir` is
        replaced whole, atomically (it must be new, empty, or a model directory)."""
        out = Path(out_dir)
        if not self._is_main:
            return out
        torch_dtype = _as_dtype(dtype) if dtype is not None else self.save_dtype
        # Built aside and renamed into place: a crash or a full disk never leaves a half-written `out`, and a
        # previous model there stays intact until the new one is complete.
        with atomic_directory(out) as staged:
            if self.lora_settings and not merge:
                self._write_adapter(staged, self.model.state_dict())
                self.tokenizer.save(staged)
            else:
                model = self.model
                if self.lora_settings:
                    model = copy.deepcopy(self.model)
                    lora.merge_lora(model)
                export_model(model.state_dict(), self.config, self.tokenizer, staged, dtype=torch_dtype,
                             existing_generation_config=self.generation_config)
        return out


def _embedding_tensor(model: CausalLM, state: dict[str, torch.Tensor]) -> torch.Tensor:
    embedding = model.input_embeddings()
    for name, module in model.named_modules():
        if module is embedding:
            return state[f"{name}.weight"]
    raise AssertionError("the input embedding is not a submodule of its model")


def _as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    for value, name in DTYPE_NAMES.items():
        if dtype in (name, {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[name]):
            return value
    raise ValueError(f"dtype {dtype!r} is not supported; use float32, bfloat16 or float16")
