"""The bundled default model (recipes/shakespeare.yaml): small bf16 weights that load everywhere, write
Shakespeare-like text, chat, and reach the validation loss docs/training.md records."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import llmasos
from llmasos import LLM, LLMTrainer, SamplingParams, TrainingArguments
from llmasos.train.data import hold_out, read_records

from .conftest import SHAKESPEARE

DEFAULT_MODEL = Path(llmasos.__file__).parent / "assets" / "default_model"
RECORDED_EVAL_LOSS = 4.6236  # docs/training.md


def test_bundled_weights_are_small_bf16_safetensors():
    weights = DEFAULT_MODEL / "model.safetensors"
    assert weights.stat().st_size <= 20 * 1024 * 1024
    with safe_open(weights, framework="pt") as handle:
        assert {handle.get_slice(name).get_dtype() for name in handle.keys()} == {"BF16"}
    config = json.loads((DEFAULT_MODEL / "config.json").read_text())
    assert config["model_type"] == "llama" and config["dtype"] == "bfloat16"
    assert (DEFAULT_MODEL / "chat_template.jinja").is_file()


def test_loads_in_transformers_and_writes_shakespeare():
    llm = LLM.load(DEFAULT_MODEL, dtype="float32")
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    ids = llm.tokenizer.encode("ROMEO:\nBut soft, what light through yonder window breaks?")
    with torch.no_grad():
        expected = torch.log_softmax(reference(torch.tensor([ids])).logits[0], dim=-1)
    chosen = expected[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor(llm.prompt_logprobs(ids)[1:]), chosen, atol=1e-4)

    text = llm.generate("ROMEO:\n", SamplingParams(max_tokens=60, temperature=0))[0].text
    assert re.search(r"\n\n[A-Z][A-Z ]+:\n", text), text  # a new speaker's turn, in the corpus's layout
    reply = llm.chat([{"role": "user", "content": "Good morrow, my lord."}],
                     SamplingParams(max_tokens=30, temperature=0.8, seed=0))[0]
    assert reply.text.strip()


@pytest.mark.slow
def test_validation_loss_matches_the_recorded_figure():
    if not SHAKESPEARE.is_file():
        pytest.skip(f"the Tiny Shakespeare corpus is not at {SHAKESPEARE.resolve()} (it is never committed)")
    _, held_out = hold_out(read_records(SHAKESPEARE), 0.1)  # the recipe's eval_split
    model = LLMTrainer.from_pretrained(DEFAULT_MODEL)
    result = model.evaluate(held_out, TrainingArguments(max_seq_length=256, per_device_eval_batch_size=16))
    assert result["eval_loss"] == pytest.approx(RECORDED_EVAL_LOSS, abs=0.01)


def test_fine_tune_the_default_model_by_its_library_name(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path / "home"))
    model = LLMTrainer.from_pretrained("shakespeare:tiny")
    reply = "Thou art the LLMasOS, good my lord."
    args = TrainingArguments(output_dir=str(tmp_path / "run"), method="lora", max_steps=2, save_steps=None,
                             per_device_train_batch_size=2, progress_bar=False)
    model.train([{"messages": [{"role": "user", "content": "Who art thou?"}, {"role": "assistant", "content": reply}]}],
                args=args)
    adapter = model.save_pretrained(tmp_path / "adapter")
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "shakespeare:tiny"
