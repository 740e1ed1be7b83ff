"""torch.distributed plumbing for training: join the process group torchrun describes, wrap for DDP or FSDP,
sum across ranks, and gather or scatter full state dicts for checkpoints.

A single process (no WORLD_SIZE in the environment) needs none of it: every helper then works locally."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def choose_device(requested: str, local_rank: int = 0) -> torch.device:
    """The training device: "auto" follows llmasos.spec.resolve_device; a CUDA device without an index is this
    process's GPU (LOCAL_RANK)."""
    from llmasos.spec import resolve_device

    device = torch.device(resolve_device(requested))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but no CUDA GPU is available; use device='cpu' or 'auto'")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def setup(requested_device: str = "auto") -> DistContext:
    """Join torchrun's process group when WORLD_SIZE > 1 (nccl on GPUs, gloo on CPUs); else a one-process context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(requested_device, local_rank)
    if world_size <= 1:
        return DistContext(device=device)
    initialized_here = False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        initialized_here = True
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device,
                       initialized_here=initialized_here)


def teardown(ctx: DistContext) -> None:
    if ctx.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_reduce_sum(ctx: DistContext, values: list[float]) -> list[float]:
    """Sum a few numbers over all ranks (in float64, so token counts stay exact)."""
    if not ctx.distributed:
        return list(values)
    backend_device = ctx.device if ctx.device.type == "cuda" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=backend_device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def broadcast_object(ctx: DistContext, value: Any) -> Any:
    """Rank 0's value on every rank."""
    if not ctx.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def wrap(module: nn.Module, ctx: DistContext, layers: nn.ModuleList, fsdp: bool) -> nn.Module:
    """DDP (every rank holds the whole model, gradients averaged) or FSDP (parameters, gradients and optimizer
    state sharded across ranks; each decoder layer gathered only while it runs)."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        if not ctx.distributed:
            return module
        for layer in layers:
            fully_shard(layer)
        fully_shard(module)
        return module
    if not ctx.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


def full_state_dicts(module: nn.Module, optimizer: torch.optim.Optimizer | None,
                     ctx: DistContext) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The whole model's (and optimizer's) state on rank 0, on the CPU, parameters by name; a collective call
    under FSDP (every rank must make it), other ranks get empty dicts."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(module, options=options)
    optimizer_state = None if optimizer is None else get_optimizer_state_dict(module, optimizer, options=options)
    if not ctx.is_main:
        return {}, None
    return model_state, optimizer_state


def load_full_state_dicts(module: nn.Module, optimizer: torch.optim.Optimizer | None,
                          model_state: dict[str, torch.Tensor] | None, optimizer_state: dict[str, Any] | None) -> None:
    """Put full (unsharded) state dicts, which every rank has read, into a possibly sharded module and optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if model_state is not None:
        set_model_state_dict(module, model_state, options=StateDictOptions(full_state_dict=True, strict=False))
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(module, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))
