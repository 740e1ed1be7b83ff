"""Multi-node training on one machine: two torchrun "nodes" (one process each) meeting through the c10d rendezvous
over loopback train as one process with the same global batch; and a checkpoint resumes with another number of
processes (2 -> 1, 1 -> 2) as the same run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from .test_distributed import DATA, train

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def losses(output: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (output / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def largest_difference(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("multinode") / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in DATA))
    return path


def train_two_nodes(model_dir: Path, data: Path, output: Path, *extra: str) -> dict:
    """`torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d`, node ranks 0 and 1 as two launchers."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launchers = []
    for node_rank in (0, 1):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                   "--node-rank", str(node_rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                   "--rdzv-id", f"multinode-{os.getpid()}", "-m", "llmasos", "train", "--model", str(model_dir),
                   "--data", str(data), "--output", str(output), "--max-steps", "4", "--batch-size", "8",
                   "--learning-rate", "5e-3", "--seed", "11", "--max-seq-length", "64", "--device", "cpu", *extra]
        launchers.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
    try:
        outputs = [launcher.communicate(timeout=300)[0] for launcher in launchers]
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                launcher.kill()
    for launcher, text in zip(launchers, outputs, strict=True):
        assert launcher.returncode == 0, text[-3000:]
    return load_file(str(output / "final" / "model.safetensors"))


def test_two_nodes_train_as_one_process(tiny_llama, data, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("training:\n  logging_steps: 1\n")  # a loss record per step
    one = train(tiny_llama, data, tmp_path / "one", 1, "--config", str(recipe))
    two = train_two_nodes(tiny_llama, data, tmp_path / "two", "--config", str(recipe), "--save-steps", "2")
    state = json.loads((tmp_path / "two" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["global_batch"] == 8
    original = load_file(str(tiny_llama / "model.safetensors"))
    assert largest_difference(one, original) > 1e-3  # training moved them
    assert len(losses(tmp_path / "two")) == len(losses(tmp_path / "one")) == 4
    assert max(abs(a - b) for a, b in zip(losses(tmp_path / "one"), losses(tmp_path / "two"), strict=True)) < 1e-5
    assert largest_difference(one, two) < 1e-4


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_resume_with_another_number_of_processes(tiny_llama, data, tmp_path, before, after):
    """The data position is the step and the global batch is unchanged, so only the RNG streams (dropout: none
    here) could differ."""
    straight = train(tiny_llama, data, tmp_path / "straight", before, "--save-steps", "2")
    resumed = train(tiny_llama, data, tmp_path / "resumed", after, "--resume",
                    str(tmp_path / "straight" / "checkpoint-2"))
    assert largest_difference(straight, resumed) < 1e-5
