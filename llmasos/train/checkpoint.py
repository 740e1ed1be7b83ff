"""Training checkpoints in output_dir/checkpoint-<step>/, written atomically and kept to save_total_limit.

A checkpoint is built in a hidden temporary directory and renamed into place only when complete, so a run killed
mid-save leaves every earlier checkpoint intact (the half-written directory is swept away on the next run). It holds
a loadable model (or LoRA adapter) at the top, the optimizer, scheduler and RNG states in training_state/, and the
step in trainer_state.json; all pickle-free: tensors in safetensors, the rest in JSON."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from llmasos.errors import LLMasOSError
from llmasos.files import fsync_directory, fsync_tree

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
STATE_FILE = "trainer_state.json"
# Optimizer, scheduler and RNG live in a subfolder: model loaders take every top-level *.safetensors as weights.
TRAINING_STATE_DIR = "training_state"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
SCHEDULER_FILE = "scheduler.json"
_STEP = re.compile(rf"^{PREFIX}(\d+)$")


class CheckpointError(LLMasOSError, ValueError):
    """A checkpoint to resume from is missing, incomplete or from a different run configuration."""


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _STEP.match(path.name)
        if match and path.is_dir() and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def resolve_resume(value: str | Path | bool | None, output_dir: Path) -> Path | None:
    """resume_from_checkpoint: True = the latest in output_dir; a checkpoint directory; or a run's output
    directory (its latest checkpoint)."""
    if value is None or value is False:
        return None
    if value is True:
        latest = latest_checkpoint(output_dir)
        if latest is None:
            raise CheckpointError(f"resume_from_checkpoint=True but {output_dir} has no checkpoint-<step> directory")
        return latest
    path = Path(value).expanduser()
    if (path / STATE_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path} is neither a checkpoint (no {STATE_FILE}) nor a run directory holding "
                              f"{PREFIX}<step> checkpoints")
    return latest


def sweep_temporaries(output_dir: Path) -> None:
    """Remove half-written checkpoints a killed run left behind."""
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            if path.name.startswith(TMP_PREFIX) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


def temporary_path(output_dir: Path, step: int) -> Path:
    return output_dir / f"{TMP_PREFIX}{step}"


def begin(output_dir: Path, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of `step` (rank 0 only)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(output_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit(tmp: Path, output_dir: Path, step: int, save_total_limit: int | None) -> Path:
    """fsync the files, rename the temporary directory into place, then drop the oldest checkpoints over the limit."""
    fsync_tree(tmp)
    final = output_dir / f"{PREFIX}{step}"
    if final.exists():  # a resumed run saving the same step again: move the old one aside first
        old = output_dir / f"{TMP_PREFIX}{step}-old-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    fsync_directory(output_dir)
    if save_total_limit is not None:
        checkpoints = list_checkpoints(output_dir)
        for _, path in checkpoints[:max(0, len(checkpoints) - save_total_limit)]:
            doomed = output_dir / f"{TMP_PREFIX}{path.name}-delete"
            path.rename(doomed)  # atomic: a half-deleted checkpoint never looks complete
            shutil.rmtree(doomed, ignore_errors=True)
    return final


# -- optimizer, scheduler, RNG ------------------------------------------------------------------------------------
def _state_dir(directory: Path, create: bool = False) -> Path:
    path = directory / TRAINING_STATE_DIR
    if create:
        path.mkdir(exist_ok=True)
    return path


def save_optimizer(directory: Path, state: dict[str, Any]) -> None:
    """A full optimizer state dict (state keyed by parameter name) as safetensors + JSON."""
    directory = _state_dir(directory, create=True)
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}::{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    save_file(tensors, str(directory / OPTIMIZER_TENSORS))
    groups = [{key: (list(value) if isinstance(value, tuple) else value) for key, value in group.items()}
              for group in state["param_groups"]]
    (directory / OPTIMIZER_META).write_text(json.dumps({"param_groups": groups, "scalars": scalars}), encoding="utf-8")


def load_optimizer(directory: Path) -> dict[str, Any]:
    directory = _state_dir(directory)
    if not (directory / OPTIMIZER_TENSORS).is_file():
        raise CheckpointError(f"{directory / OPTIMIZER_TENSORS} is missing: the checkpoint is incomplete")
    tensors = load_file(str(directory / OPTIMIZER_TENSORS))
    meta = json.loads((directory / OPTIMIZER_META).read_text(encoding="utf-8"))
    state: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        name, _, field = key.rpartition("::")
        state.setdefault(name, {})[field] = tensor
    for name, values in meta["scalars"].items():
        state.setdefault(name, {}).update(values)
    groups = []
    for group in meta["param_groups"]:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def save_scheduler(directory: Path, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    state = {key: value for key, value in scheduler.state_dict().items() if key != "lr_lambdas"}
    (_state_dir(directory, create=True) / SCHEDULER_FILE).write_text(json.dumps(state), encoding="utf-8")


def load_scheduler(directory: Path, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    state = json.loads((_state_dir(directory) / SCHEDULER_FILE).read_text(encoding="utf-8"))
    state["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)
    scheduler.load_state_dict(state)


def save_rng(directory: Path, rank: int) -> None:
    directory = _state_dir(directory, create=True)
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = state
    save_file(tensors, str(directory / f"rng_state_{rank}.safetensors"))
    version, internal, gauss = random.getstate()
    (directory / f"rng_state_{rank}.json").write_text(json.dumps({"python": [version, list(internal), gauss]}),
                                                      encoding="utf-8")


def load_rng(directory: Path, rank: int, same_world_size: bool = True) -> None:
    """This rank's saved RNG streams. When the number of processes changed, the old ranks' streams no longer map
    onto the new ones (each drew its dropout masks for its own part of the global batch): every rank then takes
    rank 0's, as every rank of a new run starts from the same seed. Without dropout (or other random layers) that
    changes nothing; with it the masks, though still random and seeded, differ from the uninterrupted run's."""
    directory = _state_dir(directory)
    if not same_world_size:
        rank = 0
    path = directory / f"rng_state_{rank}.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no RNG state for rank {rank}: the checkpoint is incomplete")
    tensors = load_file(str(path))
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in tensors]
        if states:
            torch.cuda.set_rng_state_all(states)
    python = json.loads((directory / f"rng_state_{rank}.json").read_text(encoding="utf-8"))["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))


def write_state(directory: Path, state: dict[str, Any]) -> None:
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2, default=str) + "\n", encoding="utf-8")


def read_state(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{directory / STATE_FILE} cannot be read ({exc}); pick an earlier checkpoint") from None
