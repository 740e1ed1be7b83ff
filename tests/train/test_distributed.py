"""torchrun: a 2-process data-parallel run (DDP, and FSDP) ends with the weights of a 1-process run with the same
global batch and seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

# Uneven lengths and loss-token counts per rank, so the global token normalisation is exercised.
DATA = [{"prompt": f"Question {i}: " + "why " * (i % 5), "completion": " because" * (1 + i % 3)} for i in range(10)]
DATA += [{"text": "The quality of mercy is not strained; it droppeth as the gentle rain from heaven. " * 3}]


def train(model_dir, data, output, processes: int, *extra: str) -> dict:
    command = [sys.executable, "-m", "llmasos", "train", "--model", str(model_dir), "--data", str(data),
               "--output", str(output), "--max-steps", "4", "--batch-size", "8", "--learning-rate", "5e-3",
               "--seed", "11", "--max-seq-length", "64", "--device", "cpu", *extra]
    if processes > 1:
        command[1:3] = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
                        str(29500 + os.getpid() % 1000 + len(extra)), "-m", "llmasos"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(str(output / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def single_process(tiny_llama, tmp_path_factory):
    directory = tmp_path_factory.mktemp("ddp")
    data = directory / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in DATA))
    return data, train(tiny_llama, data, directory / "one", 1)


MODES = {"ddp": [], "fsdp": ["--fsdp"],
         # 8 micro-batch slots: an epoch's short last batch (the data is not a multiple of 8) leaves some of them
         # empty, and a rank with an empty one must still run it (zero-weight) for the gradient sync to pair up
         "ddp-accumulation": ["--gradient-accumulation-steps", "4"]}


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_two_processes_equal_one(tiny_llama, single_process, tmp_path, mode):
    data, expected = single_process
    weights = train(tiny_llama, data, tmp_path / mode, 2, *MODES[mode])
    original = load_file(str(tiny_llama / "model.safetensors"))
    assert max((expected[k] - original[k]).abs().max().item() for k in expected) > 1e-3  # training moved them
    assert max((weights[k] - expected[k]).abs().max().item() for k in expected) < 1e-4
    metrics = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 4  # rank 0 alone writes the metrics


@pytest.mark.slow
def test_fsdp_resume_is_exact(tiny_llama, single_process, tmp_path):
    data, _ = single_process
    straight = train(tiny_llama, data, tmp_path / "straight", 2, "--fsdp", "--save-steps", "2")
    resumed = train(tiny_llama, data, tmp_path / "resumed", 2, "--fsdp", "--resume",
                    str(tmp_path / "straight" / "checkpoint-2"))
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) < 1e-5


@pytest.mark.slow
def test_two_processes_train_a_classifier_as_one(tmp_path):
    """The classification objective through the same data-parallel loop: 2 processes (DDP) end with the weights of
    1, uneven text lengths and an epoch's short last batch included."""
    import torch
    import transformers as tf
    from encoders_support import bert_tokenizer
    from support import VOCAB_SIZE

    config = tf.BertConfig(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, classifier_dropout=0.0, pad_token_id=0, num_labels=3)
    torch.manual_seed(0)
    tf.BertForSequenceClassification(config).save_pretrained(tmp_path / "bert")
    bert_tokenizer().save_pretrained(tmp_path / "bert")
    rows = [{"text": "why " * (1 + i % 7) + "the question", "label": ["a", "b", "c"][i % 3]} for i in range(11)]
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    one = train(tmp_path / "bert", data, tmp_path / "one", 1, "--task", "classification")
    two = train(tmp_path / "bert", data, tmp_path / "two", 2, "--task", "classification")
    original = load_file(str(tmp_path / "bert" / "model.safetensors"))
    assert max((one[k] - original[k]).abs().max().item() for k in one) > 1e-3  # training moved them
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-4
