"""Shared pieces of the benchmarks: random-weight checkpoints of a given shape, timing helpers, result tables."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

QWEN2_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096)
TINY = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=256, vocab_size=4096, tie_word_embeddings=True, max_position_embeddings=2048)


def random_checkpoint(shape: dict, dtype: torch.dtype = torch.bfloat16, directory: Path | None = None) -> Path:
    """A Qwen2 checkpoint with random weights and a byte-level tokenizer, written by transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    directory = directory or Path(tempfile.mkdtemp(prefix="llmasos-bench-"))
    config = Qwen2Config(**shape, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(directory)
    vocab = {f"t{i}": i for i in range(shape["vocab_size"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t2"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="t0", eos_token="t1").save_pretrained(directory)
    return directory


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def copy_bandwidth(device: str, size_bytes: int = 1 << 30) -> float:
    """Measured memory bandwidth in bytes/s: a large tensor copy moves 2x its size (read + write)."""
    src = torch.empty(size_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [timed(lambda: dst.copy_(src), device) for _ in range(5)]
    return 2 * size_bytes / min(times)


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)


def save_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2))
