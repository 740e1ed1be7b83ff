"""`llmasos train`: fine-tuning, LoRA, pretraining from a YAML recipe, resuming, and clear errors for bad data."""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner

from llmasos import LLM
from llmasos.cli.main import cli

CHAT = [{"messages": [{"role": "user", "content": f"Say {word}."}, {"role": "assistant", "content": word}]}
        for word in ("yes", "no", "maybe", "never", "always", "sometimes")]


def invoke(*args: str):
    return CliRunner().invoke(cli, ["train", *map(str, args)])


def write_jsonl(path, rows) -> str:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def test_fine_tune_with_eval_data_and_resume(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", CHAT + [{"messages": [{"role": "user", "content": "hm"}]}])
    evaluation = write_jsonl(tmp_path / "eval.jsonl", CHAT[:2])
    out = tmp_path / "run"
    common = ["--model", tiny_llama, "--data", data, "--eval-data", evaluation, "--output", out, "--batch-size", 4,
              "--learning-rate", "1e-3", "--save-steps", 2, "--seed", 5]
    result = invoke(*common, "--max-steps", 4)
    assert result.exit_code == 0, result.output
    assert "trained" in result.output and "eval loss" in result.output
    assert "skipped: 1 without an assistant turn (first: " in result.output and "train.jsonl line 7" in result.output
    llm = LLM.load(out / "final")
    assert llm.chat([{"role": "user", "content": "Say yes."}], llm.default_sampling(max_tokens=3))[0].text
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "learning_rate", "grad_norm", "tokens_per_second"} <= records[0].keys()
    assert records[-1]["step"] == 4 and "eval_loss" in records[-1] and "eval_perplexity" in records[-1]

    resumed = invoke(*common, "--max-steps", 4, "--resume", out / "checkpoint-2", "--output", tmp_path / "resumed")
    assert resumed.exit_code == 0, resumed.output
    from safetensors.torch import load_file

    a = load_file(str(out / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_lora_writes_a_merged_model_and_the_adapter(tiny_gpt2, tmp_path):
    data = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "2+2=", "completion": "4"}] * 4)
    result = invoke("--model", tiny_gpt2, "--data", data, "--output", tmp_path / "run", "--method", "lora",
                    "--max-steps", 2, "--batch-size", 2)
    assert result.exit_code == 0, result.output
    # the adapter matrices were trained, not the whole model (issue 13)
    trained, total = (int(n.replace(",", "")) for n in re.search(r"trained ([\d,]+) of ([\d,]+) parameters \(",
                                                                   result.output).groups())
    assert 0 < trained < total // 4 and total > LLM.load(tiny_gpt2).num_parameters
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "run" / "final" / "adapter_config.json").exists()
    LLM.load(tmp_path / "run" / "final")


@pytest.mark.slow
def test_pretrain_from_a_recipe(tmp_path, shakespeare_text):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare_text[:60_000])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
data: {corpus}
eval_split: 0.1
output: {tmp_path / "scratch"}
tokenizer:
  train: {{vocab_size: 512}}
model_config: {{model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,
                num_attention_heads: 2, max_position_embeddings: 128, tie_word_embeddings: true}}
batch_size: 8
save_dtype: bfloat16
training: {{max_steps: 30, max_seq_length: 128, learning_rate: 3.0e-3, lr_scheduler_type: cosine, warmup_steps: 3,
           progress_bar: false, logging_steps: 10}}
""")
    result = invoke("--config", recipe)
    assert result.exit_code == 0, result.output
    final = tmp_path / "scratch" / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["vocab_size"] == 512 and config["dtype"] == "bfloat16"
    records = [json.loads(line) for line in (tmp_path / "scratch" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] - 0.5  # averages over steps 1-10 and 21-30
    assert records[-1]["eval_loss"] < 6.0  # ln(512) = 6.24 for a uniform guess
    llm = LLM.load(final)
    assert llm.dtype == torch.bfloat16 and llm.generate("ROMEO:", llm.default_sampling(max_tokens=5))[0].text


@pytest.mark.parametrize("rows, message", [
    (['{"text": "fine"}', '{"text": "broken"'], r"bad\.jsonl line 2: not valid JSON"),
    ([], r"bad\.jsonl is empty"),
    ([{"messages": [{"role": "user", "content": "no reply"}]}], r"train_data has no usable examples \(skipped 1 of 1"),
    ([{"prompt": "a " * 300, "completion": "b"}], r"1 longer than the context \(first: .*bad\.jsonl line 1: \d+ > 64"),
])
def test_bad_data_gives_one_clear_error_line(tiny_gpt2, tmp_path, rows, message):
    data = write_jsonl(tmp_path / "bad.jsonl", rows) if rows else str(tmp_path / "bad.jsonl")
    if not rows:
        (tmp_path / "bad.jsonl").write_text("")
    result = invoke("--model", tiny_gpt2, "--data", data, "--output", tmp_path / "run", "--max-steps", 1,
                    "--max-seq-length", 64)
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and "Traceback" not in result.output
    import re

    assert re.search(message, result.output), result.output


def test_usage_errors(tiny_gpt2, tmp_path):
    result = invoke("--data", "x.txt", "--output", tmp_path)
    assert result.exit_code == 2 and "exactly one of --model" in result.output
    result = invoke("--model", tiny_gpt2, "--data", "x.txt", "--output", tmp_path, "--batch-size", 3,
                    "--gradient-accumulation-steps", 2)
    assert result.exit_code == 2 and "must be divisible" in result.output
    bad_recipe = tmp_path / "r.yaml"
    bad_recipe.write_text("modle: x\n")
    result = invoke("--config", bad_recipe)
    assert result.exit_code == 1 and "unknown recipe key(s) modle" in result.output
    bad_recipe.write_text("model: x\n  data: y\n")  # PyYAML's own message is four lines with a caret
    result = invoke("--config", bad_recipe)
    assert result.exit_code == 1
    assert result.output == f"error: {bad_recipe} is not valid YAML: line 2, column 7: mapping values are not " \
                            "allowed here\n"


def test_lora_on_a_bf16_base_saves_a_bf16_model(tmp_path):
    """Issue 13: OUTPUT/final of a LoRA run on a bf16 base was float32, twice the base's size."""
    from safetensors import safe_open
    from support import family_config, make_checkpoint

    base = tmp_path / "base"
    make_checkpoint(base, family_config("qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2), dtype=torch.bfloat16)
    data = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "2+2=", "completion": "4"}] * 4)
    result = invoke("--model", base, "--data", data, "--output", tmp_path / "run", "--method", "lora",
                    "--max-steps", 2, "--batch-size", 2)
    assert result.exit_code == 0, result.output
    final = tmp_path / "run" / "final"
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(final / "model.safetensors", framework="pt") as handle:
        assert {handle.get_tensor(key).dtype for key in handle.keys()} == {torch.bfloat16}
    assert (final / "model.safetensors").stat().st_size <= 1.01 * (base / "model.safetensors").stat().st_size
    assert LLM.load(final).dtype in (torch.bfloat16, torch.float32)
