"""Fixtures of the training tests: tiny random checkpoints written by transformers, and the Shakespeare corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import family_config, make_checkpoint

SHAKESPEARE = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"the Tiny Shakespeare corpus is not at {SHAKESPEARE.resolve()} (it is never committed)")
    return SHAKESPEARE.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("gpt2")
    make_checkpoint(directory, family_config("gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=256))
    return directory


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("llama")
    config = family_config("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, rope_scaling=None)
    make_checkpoint(directory, config)
    return directory


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    """Tied embeddings and qkv biases."""
    directory = tmp_path_factory.mktemp("qwen2")
    config = family_config("qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256)
    make_checkpoint(directory, config)
    return directory
