"""Engine test fixtures: one tiny random qwen2 checkpoint (2 layers, 512 positions) shared by the whole session,
and single-threaded torch while these tests run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import family_config, make_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-qwen2")
    make_checkpoint(directory, family_config("qwen2", num_hidden_layers=2, max_position_embeddings=512))
    return directory


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """A tiny model's matmuls gain nothing from threads, and on a busy machine OpenMP workers spinning for a core
    make every step up to ~100x slower; restored afterwards for other tests."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
