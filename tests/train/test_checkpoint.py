"""Checkpoints: exact resume (weights, optimizer, scheduler, RNG, data position), save_total_limit, and a process
killed in the middle of a save leaving the previous checkpoint loadable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import family_config, make_checkpoint

from llmasos import LLM, LLMTrainer, TrainingArguments
from llmasos.train.checkpoint import CheckpointError, list_checkpoints

DATA = [{"prompt": f"Q{i}: what is {i} plus {i}?", "completion": f" It is {2 * i}."} for i in range(12)] + \
       ["Now is the winter of our discontent made glorious summer by this sun of York. " * 4]


def run_args(output_dir: Path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(output_dir), max_steps=16, save_steps=8, per_device_train_batch_size=3,
                  gradient_accumulation_steps=2, learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=2,
                  weight_decay=0.1, max_seq_length=48, progress_bar=False, logging_steps=4, seed=7)
    return TrainingArguments(**{**values, **overrides})


def weights(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_from_step_8_ends_with_the_same_weights(tiny_llama, tmp_path, method):
    extra = {"method": "lora", "lora_dropout": 0.2, "lora_r": 4} if method == "lora" else {}
    straight = LLMTrainer.from_pretrained(tiny_llama)
    result = straight.train(DATA, args=run_args(tmp_path / "a", **extra))
    assert [step for step, _ in list_checkpoints(tmp_path / "a")] == [8, 16]

    resumed = LLMTrainer.from_pretrained(tiny_llama)
    resumed_result = resumed.train(DATA, args=run_args(tmp_path / "b", **extra),
                                   resume_from_checkpoint=tmp_path / "a" / "checkpoint-8")
    assert max_difference(weights(straight.model), weights(resumed.model)) < 1e-5
    assert resumed_result.global_step == 16
    assert resumed_result.train_loss == pytest.approx(result.train_loss, abs=1e-5)
    # the resumed run logs only steps 9..16 but keeps the history it resumed from
    assert [r["step"] for r in resumed_result.log_history] == [r["step"] for r in result.log_history]

    # Without the RNG (LoRA dropout) or the optimizer state, a "resume" that only reloads weights drifts.
    if method == "full":
        naive = LLMTrainer.from_pretrained(tmp_path / "a" / "checkpoint-8")
        naive.train(DATA, args=run_args(tmp_path / "c", max_steps=8, save_steps=None))
        assert max_difference(weights(straight.model), weights(naive.model)) > 1e-4


def test_save_total_limit_and_checkpoint_contents(tiny_gpt2, tmp_path):
    model = LLMTrainer.from_pretrained(tiny_gpt2)
    model.train(DATA, args=run_args(tmp_path, max_steps=12, save_steps=3, save_total_limit=2))
    assert [step for step, _ in list_checkpoints(tmp_path)] == [9, 12]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    latest = tmp_path / "checkpoint-12"
    assert {"model.safetensors", "config.json", "tokenizer.json", "trainer_state.json"} <= {
        p.name for p in latest.iterdir()}
    assert {"optimizer.safetensors", "optimizer.json", "scheduler.json", "rng_state_0.safetensors",
            "rng_state_0.json"} == {p.name for p in (latest / "training_state").iterdir()}
    # Pickle-free and loadable as a model: the checkpoint's weights are the final weights.
    saved = load_file(str(latest / "model.safetensors"))
    for name, param in model.model.named_parameters():
        if name in saved:
            assert torch.equal(saved[name], param.detach())
    LLM.load(latest)


def test_resume_refuses_a_different_run(tiny_llama, tmp_path):
    LLMTrainer.from_pretrained(tiny_llama).train(DATA, args=run_args(tmp_path, max_steps=8))
    with pytest.raises(CheckpointError, match="global_batch=6 but this run has global_batch=3"):
        LLMTrainer.from_pretrained(tiny_llama).train(
            DATA, args=run_args(tmp_path, gradient_accumulation_steps=1), resume_from_checkpoint=True)
    with pytest.raises(CheckpointError, match="has no checkpoint-<step>"):
        LLMTrainer.from_pretrained(tiny_llama).train(DATA, args=run_args(tmp_path / "empty"),
                                                     resume_from_checkpoint=True)


TRAIN_SCRIPT = """
import sys
from llmasos import LLMTrainer, TrainingArguments
model = LLMTrainer.from_pretrained(sys.argv[1])
args = TrainingArguments(output_dir=sys.argv[2], max_steps=int(sys.argv[3]), save_steps=2, learning_rate=1e-3,
                         lr_scheduler_type="constant",
                         per_device_train_batch_size=2, max_seq_length=32, progress_bar=False, seed=3)
model.train(["the slings and arrows of outrageous fortune " * 40], args=args, resume_from_checkpoint=sys.argv[4] == "1")
model.save_pretrained(sys.argv[2] + "/final")
"""


@pytest.mark.slow
def test_kill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    # Big enough (~10M parameters) that writing weights and optimizer state takes a noticeable time.
    base = tmp_path / "base"
    make_checkpoint(base, family_config("llama", hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                                        num_attention_heads=8, num_key_value_heads=8, rope_scaling=None))
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    run = tmp_path / "run"
    command = [sys.executable, str(script), str(base), str(run)]
    process = subprocess.Popen([*command, "400", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = None
    deadline = time.monotonic() + 240
    try:
        while partial is None and time.monotonic() < deadline and process.poll() is None:
            if run.is_dir() and (run / "checkpoint-2").is_dir():
                partial = next((p for p in run.iterdir() if p.name.startswith(".tmp-checkpoint-")), None)
            if partial is None:
                time.sleep(0.0005)
        os.kill(process.pid, signal.SIGKILL)  # mid-save: the temporary directory exists right now
    finally:
        process.wait()
    assert partial is not None, "the training process never started a second checkpoint"
    complete = list_checkpoints(run)
    assert complete and complete[-1][0] < int(partial.name.split("-")[-1]), (partial, complete)
    last_step, last = complete[-1]
    LLM.load(last)  # loadable: weights, config and tokenizer all whole

    # Resuming sweeps the half-written directory and continues from the last complete checkpoint; it ends where an
    # uninterrupted run of the same length ends.
    total = last_step + 2
    subprocess.run([*command, str(total), "1"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp")]
    straight = tmp_path / "straight"
    subprocess.run([sys.executable, str(script), str(base), str(straight), str(total), "0"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resumed = load_file(str(run / "final" / "model.safetensors"))
    expected = load_file(str(straight / "final" / "model.safetensors"))
    assert max((resumed[k] - expected[k]).abs().max().item() for k in expected) < 1e-5


def test_rng_state_per_rank_and_after_a_change_of_process_count(tmp_path):
    """Same number of processes: each rank its own stream; another number: every rank rank 0's (dropout masks
    then differ from the uninterrupted run's; nothing else draws from these streams)."""
    from llmasos.train import checkpoint as ckpt

    draws = {}
    for rank in (0, 1):
        torch.manual_seed(100 + rank)
        ckpt.save_rng(tmp_path, rank)
        draws[rank] = torch.rand(3)
    ckpt.load_rng(tmp_path, 1)
    assert torch.equal(torch.rand(3), draws[1])
    ckpt.load_rng(tmp_path, 1, same_world_size=False)
    assert torch.equal(torch.rand(3), draws[0])
    ckpt.load_rng(tmp_path, 3, same_world_size=False)  # 2 -> 4 processes
    assert torch.equal(torch.rand(3), draws[0])
    with pytest.raises(CheckpointError, match="incomplete"):
        ckpt.load_rng(tmp_path, 3)
