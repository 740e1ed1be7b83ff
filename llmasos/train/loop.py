"""The training loop: one optimizer step per global batch, split across ranks and gradient-accumulation steps.

The loss of a step is the mean over every loss-carrying token of the global batch, whatever the split: each rank
scales its summed token losses by world_size / (tokens in the whole global batch), and DDP's gradient averaging then
yields exactly the gradient a single process computes on the whole batch."""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmasos.files import disk_full_error, is_disk_full
from llmasos.models.attention import AttentionMetadata
from llmasos.models.base import CausalLM
from llmasos.threads import ThreadGovernor
from llmasos.train import checkpoint as ckpt
from llmasos.train.arguments import TrainingArguments
from llmasos.train.dataset import IGNORE_INDEX, DataOrder, Example, collate, count_loss_tokens, rank_micro_batches
from llmasos.train.distributed import DistContext, all_reduce_sum, barrier, full_state_dicts, load_full_state_dicts
from llmasos.train.reporting import Reporter


class LossModule(nn.Module):
    """Wraps a CausalLM so that one forward returns the summed token loss: DDP and FSDP wrap this module, so the
    output head's weights are gathered and synchronised like every other parameter."""

    def __init__(self, model: CausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """input_ids, labels (batch, length), padded at the end -> summed cross-entropy over labelled tokens."""
        batch, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device).repeat(batch)
        hidden = self.model(input_ids.reshape(-1), positions, AttentionMetadata.for_prompts([length] * batch))
        hidden = hidden.view(batch, length, -1)[:, :-1]  # position t predicts token t + 1
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = self.model.compute_logits(hidden[keep])  # (num_loss_tokens, vocab), float32
        return F.cross_entropy(logits, targets[keep], reduction="sum")


@dataclass
class TrainResult:
    """What `LLMTrainer.train` returns."""

    global_step: int
    train_loss: float | None
    eval_loss: float | None = None
    eval_perplexity: float | None = None
    num_train_tokens: int = 0
    train_seconds: float = 0.0
    num_examples: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)
    log_history: list[dict[str, Any]] = field(default_factory=list)
    num_trainable_parameters: int = 0  # what the optimizer updated: the LoRA matrices only, after a LoRA run
    num_parameters: int = 0  # every parameter of the model trained (LoRA matrices included, as PEFT counts)

    def parameters_text(self) -> str:
        """'12,288 of 4,369,152 parameters (0.2812%)', the numbers PEFT's print_trainable_parameters shows."""
        share = 100 * self.num_trainable_parameters / max(self.num_parameters, 1)
        return f"{self.num_trainable_parameters:,} of {self.num_parameters:,} parameters ({share:.4g}%)"


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) elements of a module's parameters, each shared (tied) tensor counted once."""
    unique = {id(param): param for param in module.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)


def lr_lambda(args: TrainingArguments, total_steps: int):
    warmup = args.warmup_steps

    def factor(step: int) -> float:  # transformers' get_{constant,linear,cosine}_schedule_with_warmup
        if step < warmup:
            return step / max(1, warmup)
        if args.lr_scheduler_type == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if args.lr_scheduler_type == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return factor


def make_optimizer(module: nn.Module, args: TrainingArguments) -> torch.optim.Optimizer:
    """AdamW; biases and norm weights (1-D parameters) get no weight decay, as in transformers."""
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=args.effective_learning_rate,
                             betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)


def total_steps_for(args: TrainingArguments, num_examples: int, global_batch: int) -> int:
    """max_steps, else num_train_epochs times ceil(examples / global batch) steps (transformers' count)."""
    if args.max_steps > 0:
        return args.max_steps
    return max(1, math.ceil(args.num_train_epochs * DataOrder(num_examples, 0).steps_per_epoch(global_batch)))


@torch.no_grad()
def evaluate_loss(module: nn.Module, examples: list[Example], args: TrainingArguments, ctx: DistContext,
                  pad_id: int, objective: Any = None) -> float:
    """Mean loss per target (token, masked token or example: the objective's) over all examples. Every rank runs
    the same number of forwards (FSDP gathers weights in each), a rank short of examples running a zero-weight
    one."""
    base = module.module if hasattr(module, "no_sync") else module  # DDP's forward is not needed without gradients
    make_batch = objective.collate if objective is not None else collate
    count = objective.count if objective is not None else (lambda batch: count_loss_tokens(batch[-1]))
    was_training = base.training
    base.eval()
    batch_size = args.per_device_eval_batch_size
    num_batches = math.ceil(len(examples) / (batch_size * ctx.world_size))
    loss_sum, tokens = 0.0, 0
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=args.bf16)
    for batch in range(num_batches):
        start = (batch * ctx.world_size + ctx.rank) * batch_size
        chunk = examples[start:start + batch_size]
        weight = 1.0 if chunk else 0.0
        batch = make_batch(chunk or examples[:1], pad_id, ctx.device)
        with autocast:
            loss_sum += weight * float(base(*batch))
        tokens += int(weight) * count(batch)
    loss_sum, tokens = all_reduce_sum(ctx, [loss_sum, tokens])
    base.train(was_training)
    return loss_sum / max(tokens, 1)


class Loop:
    """One run of `LLMTrainer.train`: holds the wrapped module, optimizer and scheduler."""

    def __init__(self, module: nn.Module, wrapped: nn.Module, args: TrainingArguments, ctx: DistContext,
                 train_examples: list[Example], eval_examples: list[Example] | None, pad_id: int,
                 write_model: Callable[[Path, dict[str, torch.Tensor]], None],
                 reporter_factory: Callable[[int, int], Reporter], num_records: int | None = None,
                 objective: Any = None) -> None:
        self.module, self.wrapped, self.args, self.ctx = module, wrapped, args, ctx
        self.train_examples, self.eval_examples, self.pad_id = train_examples, eval_examples, pad_id
        self.write_model = write_model  # (directory, model_state) -> None, rank 0: the loadable model part
        self.reporter_factory = reporter_factory
        self.num_records = num_records  # the records the examples were built from (texts are packed into blocks)
        self.objective = objective  # tasks.Objective; None: the causal LM's collate and token count
        self.global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * ctx.world_size
        self.total_steps = total_steps_for(args, len(train_examples), self.global_batch)
        self.optimizer = make_optimizer(module, args)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(args, self.total_steps))
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.output_dir = Path(args.output_dir)
        self.log_history: list[dict[str, Any]] = []

    # -- checkpoints --------------------------------------------------------------------------------------------
    def run_state(self, step: int) -> dict[str, Any]:
        return {"global_step": step, "total_steps": self.total_steps, "global_batch": self.global_batch,
                "world_size": self.ctx.world_size, "num_examples": len(self.train_examples),
                "method": self.args.method, "seed": self.args.seed, "args": self.args.to_dict()}

    def save_checkpoint(self, step: int) -> None:
        model_state, optimizer_state = full_state_dicts(self.module, self.optimizer, self.ctx)  # collective
        tmp = ckpt.temporary_path(self.output_dir, step)
        if self.ctx.is_main:
            ckpt.begin(self.output_dir, step)
            try:
                self.write_model(tmp, _strip(model_state))
                ckpt.save_optimizer(tmp, {"state": _strip(optimizer_state["state"]), "param_groups": [
                    {**g, "params": [_strip_name(p) for p in g["params"]]} for g in optimizer_state["param_groups"]]})
                ckpt.save_scheduler(tmp, self.scheduler)
                ckpt.write_state(tmp, {**self.run_state(step), "log_history": self.log_history})
            except BaseException as exc:  # a full disk: no half-written checkpoint is left behind
                shutil.rmtree(tmp, ignore_errors=True)
                if is_disk_full(exc):
                    raise disk_full_error(exc, f"checkpoint {step}", self.output_dir) from exc
                raise
        barrier(self.ctx)
        ckpt.save_rng(tmp, self.ctx.rank)
        barrier(self.ctx)
        if self.ctx.is_main:
            ckpt.commit(tmp, self.output_dir, step, self.args.save_total_limit)
        barrier(self.ctx)

    def resume(self, directory: Path, model_state: dict[str, torch.Tensor]) -> int:
        """Restore optimizer, scheduler, RNG and (through `model_state`, read by the caller) the weights."""
        state = ckpt.read_state(directory)
        for key, now in (("global_batch", self.global_batch), ("num_examples", len(self.train_examples)),
                         ("method", self.args.method)):
            if state.get(key) != now:
                raise ckpt.CheckpointError(
                    f"cannot resume from {directory}: it was saved with {key}={state.get(key)!r} but this run has "
                    f"{key}={now!r}; resume with the same data, (global) batch size and method")
        optimizer_state = ckpt.load_optimizer(directory)
        optimizer_state = {"state": {f"model.{k}": v for k, v in optimizer_state["state"].items()},
                           "param_groups": [{**g, "params": [f"model.{p}" for p in g["params"]]}
                                            for g in optimizer_state["param_groups"]]}
        load_full_state_dicts(self.module, self.optimizer, {f"model.{k}": v for k, v in model_state.items()},
                              optimizer_state)
        ckpt.load_scheduler(directory, self.scheduler)
        # The data position is the step (a seeded permutation per epoch, cut into global batches), so another
        # number of processes with the same global batch continues the same run.
        saved_world_size = state.get("world_size", self.ctx.world_size)
        ckpt.load_rng(directory, self.ctx.rank, same_world_size=saved_world_size == self.ctx.world_size)
        self.log_history = list(state.get("log_history", []))
        return int(state["global_step"])

    # -- the loop -----------------------------------------------------------------------------------------------
    def run(self, start_step: int = 0) -> TrainResult:
        args, ctx = self.args, self.ctx
        order = DataOrder(len(self.train_examples), args.seed)
        reporter: Reporter = self.reporter_factory(self.total_steps, start_step)
        reporter.message(self.plan(order))
        autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=args.bf16)
        is_ddp = hasattr(self.wrapped, "no_sync")
        # On CPU, an intra-op team wider than the idle cores stalls at every barrier; OMP_NUM_THREADS still wins.
        governor = ThreadGovernor.from_environment() if ctx.device.type == "cpu" else None
        threads_before = torch.get_num_threads()
        if governor is not None:
            governor.apply()
        window_loss, window_tokens, window_seen = 0.0, 0, 0
        last_loss = None
        started = window_start = time.perf_counter()
        total_seen = 0
        eval_loss = None
        self.wrapped.train()
        try:
            for step in range(start_step, self.total_steps):
                if governor is not None:
                    governor.maybe_adjust()
                indices = order.step_indices(step, self.global_batch)
                micro = rank_micro_batches(indices, ctx.world_size, ctx.rank, args.per_device_train_batch_size,
                                           args.gradient_accumulation_steps)
                if ctx.world_size == 1:  # an epoch's short last batch leaves slots empty: nothing to run for them
                    micro = [part for part in micro if part]
                # Under DDP / FSDP every rank runs each micro-batch (their collectives must pair up): a rank with
                # an empty slot runs a zero-weight forward, as evaluate_loss does.
                weights = [1.0 if part else 0.0 for part in micro]
                make_batch = self.objective.collate if self.objective is not None else collate
                batches = [make_batch([self.train_examples[i] for i in part or [0]], self.pad_id, ctx.device)
                           for part in micro]
                seen = sum(len(self.train_examples[i].input_ids) for part in micro for i in part)
                count = self.objective.count if self.objective is not None else (
                    lambda batch: count_loss_tokens(batch[-1]))
                local_targets = sum(count(batch) for batch, weight in zip(batches, weights, strict=True) if weight)
                step_targets, step_seen = all_reduce_sum(ctx, [local_targets, seen])
                scale = ctx.world_size / max(step_targets, 1)  # a masked-LM batch may draw no target at all
                step_loss = 0.0
                for index, (batch, weight) in enumerate(zip(batches, weights, strict=True)):
                    last = index == len(batches) - 1
                    sync = contextlib.nullcontext() if (last or not is_ddp) else self.wrapped.no_sync()
                    with sync:
                        with autocast:
                            loss_sum = self.wrapped(*batch) * weight
                        (loss_sum * scale).backward()
                    step_loss += float(loss_sum.detach())
                grad_norm = self._clip()
                learning_rate = self.scheduler.get_last_lr()[0]  # this step's; after step() it is the next one's
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                (step_loss,) = all_reduce_sum(ctx, [step_loss])
                window_loss += step_loss
                window_tokens += int(step_targets)
                window_seen += int(step_seen)
                total_seen += int(step_seen)
                done = step + 1
                if done % args.logging_steps == 0 or done == self.total_steps:
                    elapsed = time.perf_counter() - window_start
                    last_loss = window_loss / max(window_tokens, 1)
                    record = {"step": done, "epoch": round(order.epochs_done(done, self.global_batch), 4),
                              "loss": last_loss, "learning_rate": learning_rate,
                              "grad_norm": grad_norm, "tokens_per_second": window_seen / max(elapsed, 1e-9)}
                    self.log_history.append(record)
                    reporter.log(record)
                    reporter.advance(done, last_loss, record["tokens_per_second"])
                    window_loss, window_tokens, window_seen = 0.0, 0, 0
                    window_start = time.perf_counter()
                else:
                    reporter.advance(done)
                if self.eval_examples and args.eval_steps and done % args.eval_steps == 0 and done < self.total_steps:
                    eval_loss = self._evaluate(done, reporter)
                if args.save_steps and done % args.save_steps == 0:
                    self.save_checkpoint(done)
            if self.eval_examples:
                eval_loss = self._evaluate(self.total_steps, reporter)
        finally:
            reporter.close()
            torch.set_num_threads(threads_before)  # the caller's setting again, for whatever it runs next
        return TrainResult(global_step=self.total_steps, train_loss=last_loss, eval_loss=eval_loss,
                           eval_perplexity=None if eval_loss is None else math.exp(min(eval_loss, 700)),
                           num_train_tokens=total_seen, train_seconds=time.perf_counter() - started,
                           num_examples=len(self.train_examples), log_history=list(self.log_history))

    def plan(self, order: DataOrder) -> str:
        """e.g. '20 records, 2 examples: 1 step per epoch of a global batch of 8, 1 step in all'."""
        num_examples = len(self.train_examples)
        steps = order.steps_per_epoch(self.global_batch)
        records = f"{self.num_records:,} records, " if self.num_records is not None else ""
        return (f"{records}{num_examples:,} example{'s' * (num_examples != 1)}: {steps:,} step"
                f"{'s' * (steps != 1)} per epoch of a global batch of {self.global_batch}, {self.total_steps:,} "
                f"step{'s' * (self.total_steps != 1)} in all")

    def _clip(self) -> float:
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP: a sharded DTensor
            norm = norm.full_tensor()
        return float(norm)

    def _evaluate(self, step: int, reporter: Reporter) -> float:
        loss = evaluate_loss(self.wrapped, self.eval_examples, self.args, self.ctx, self.pad_id, self.objective)
        record = {"step": step, "eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700))}
        self.log_history.append(record)
        reporter.log(record)
        return loss


def _strip_name(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


def _strip(state: dict[str, Any]) -> dict[str, Any]:
    """LossModule names (model.<name>) -> the CausalLM's own names."""
    return {_strip_name(name): value for name, value in state.items()}
