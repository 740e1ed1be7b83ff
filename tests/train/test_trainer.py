"""LLMTrainer end to end: the seeds' three lines, loss falling on real text, and checkpoints that transformers and
LLM.load read with the same logits as the model that was trained."""

from __future__ import annotations

import json
import math

import pytest
import torch
from support import hf_tokenizer

from llmasos import LLM, LLMServing, LLMTrainer, TrainingArguments
from llmasos.tokenizer import Tokenizer
from llmasos.train.loop import lr_lambda

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8, 300, 12, 44, 61]])


def our_logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    from llmasos.models.attention import AttentionMetadata

    with torch.no_grad():
        hidden = model(ids[0], torch.arange(ids.shape[1]), AttentionMetadata.for_prompts([ids.shape[1]]))
        return model.compute_logits(hidden)


def transformers_logits(directory, ids: torch.Tensor = IDS) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return reference(ids).logits[0].float()


def quick_args(tmp_path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
                  max_seq_length=64, save_steps=None, logging_steps=2, progress_bar=False)
    return TrainingArguments(**{**values, **overrides})


def test_the_seeds_three_lines_then_serving(tiny_gpt2, tmp_path, monkeypatch, shakespeare_text):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path / "home"))
    train_data = [line for line in shakespeare_text[:6000].split("\n\n") if line.strip()]

    model = LLMTrainer.from_pretrained(tiny_gpt2)
    model.train(train_data)
    model.save_pretrained("my_llm")

    assert (tmp_path / "llmasos-output" / "metrics.jsonl").is_file()  # the default output_dir
    service = LLMServing.from_pretrained("my_llm").create_service(port=0)
    with service:
        text = service.predict(text="ROMEO:", max_tokens=4, temperature=0)
    expected = LLM.load(tmp_path / "my_llm").generate("ROMEO:", LLM.load(tmp_path / "my_llm").default_sampling(
        max_tokens=4, temperature=0))[0].text
    assert text == expected


@pytest.mark.slow
def test_loss_falls_on_real_text(tiny_llama, tmp_path, shakespeare_text):
    text = shakespeare_text[:40_000]
    model = LLMTrainer.from_pretrained(tiny_llama)
    held_out = shakespeare_text[40_000:44_000]
    before = model.evaluate([held_out], quick_args(tmp_path))["eval_loss"]
    result = model.train([text], args=quick_args(tmp_path, max_steps=20, per_device_train_batch_size=8,
                                                 learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=3))
    after = model.evaluate([held_out], quick_args(tmp_path))["eval_loss"]
    losses = [r["loss"] for r in result.log_history if "loss" in r]
    assert losses[-1] < losses[0] - 0.5, losses
    assert after < before - 0.5, (before, after)
    assert result.global_step == 20 and 20 * 8 * 64 - 64 < result.num_train_tokens <= 20 * 8 * 64


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama", "tiny_qwen2"])
def test_saved_checkpoint_matches_transformers_and_llm_load(fixture, request, tmp_path):
    directory = request.getfixturevalue(fixture)
    model = LLMTrainer.from_pretrained(directory)
    model.train(["the quick brown fox jumps over the lazy dog " * 30], args=quick_args(tmp_path))
    out = model.save_pretrained(tmp_path / "saved")
    ours = our_logits(model.model)
    assert not torch.allclose(ours, transformers_logits(directory), atol=1e-3)  # training changed the model
    assert torch.allclose(transformers_logits(out), ours, atol=1e-5, rtol=0)
    llm = LLM.load(out, dtype="float32")
    assert torch.allclose(our_logits(llm.model), ours, atol=1e-5, rtol=0)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "chat_template.jinja"} <= files
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and config["architectures"]
    from transformers import AutoTokenizer

    reference_tokenizer = AutoTokenizer.from_pretrained(out)
    sample = "To be, or not to be 🙂"
    assert reference_tokenizer(sample)["input_ids"] == Tokenizer.from_dir(out).encode(sample)


def test_pretraining_from_a_config(tmp_path):
    tokenizer_dir = tmp_path / "tok"
    hf_tokenizer().save_pretrained(tokenizer_dir)
    config = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
              "tie_word_embeddings": True}
    model = LLMTrainer.from_config(config, tokenizer=tokenizer_dir, seed=1)
    assert model.config.vocab_size == Tokenizer.from_dir(tokenizer_dir).vocab_size
    std = model.model.model.layers[0].mlp.up_proj.weight.std().item()
    assert abs(std - 0.02) < 0.003  # transformers' initializer_range
    first = model.evaluate(["the quick brown fox " * 50], quick_args(tmp_path))["eval_loss"]
    assert abs(first - math.log(model.config.vocab_size)) < 0.2  # random init predicts ~uniformly
    model.train(["the quick brown fox " * 200], args=quick_args(tmp_path, max_steps=20, learning_rate=3e-3))
    out = model.save_pretrained(tmp_path / "scratch", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = LLM.load(out, dtype="float32")
    with torch.no_grad():
        assert torch.allclose(reference(IDS).logits[0], our_logits(ours.model), atol=1e-4, rtol=0)
    greedy = ours.generate("the quick", ours.default_sampling(max_tokens=6, temperature=0))[0].text
    assert "brown fox" in greedy


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_learning_rate_schedules_match_transformers(kind):
    import transformers

    def schedule(make):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = make(optimizer)
        rates = []
        for _ in range(40):
            rates.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return rates

    args = TrainingArguments(lr_scheduler_type=kind, warmup_steps=7)
    ours = schedule(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args, 40)))
    reference = schedule(lambda opt: transformers.get_scheduler(kind if kind != "constant" else
                                                                "constant_with_warmup", opt, num_warmup_steps=7,
                                                                num_training_steps=40))
    assert ours == pytest.approx(reference, abs=1e-12)


def test_training_arguments_are_validated():
    with pytest.raises(ValueError, match="lr_scheduler_type must be one of constant, linear, cosine"):
        TrainingArguments(lr_scheduler_type="polynomial")
    with pytest.raises(ValueError, match="method must be 'full' or 'lora'"):
        TrainingArguments(method="qlora")
    with pytest.raises(ValueError, match="per_device_train_batch_size must be a positive integer"):
        TrainingArguments(per_device_train_batch_size=0)
    with pytest.raises(ValueError, match="unknown training argument"):
        TrainingArguments.from_dict({"learning_rte": 1e-3})
    assert TrainingArguments().effective_learning_rate == 5e-5
    assert TrainingArguments(method="lora").effective_learning_rate == 2e-4
    assert TrainingArguments(lora_target_modules="q_proj, v_proj").lora_target_modules == ["q_proj", "v_proj"]


def test_a_too_long_context_is_refused(tiny_gpt2, tmp_path):
    model = LLMTrainer.from_pretrained(tiny_gpt2)
    with pytest.raises(ValueError, match="max_seq_length 1000 exceeds the model's context of 256 tokens"):
        model.train(["text"], args=quick_args(tmp_path, max_seq_length=1000))


def test_gradient_checkpointing_and_bf16_autocast(tiny_llama, tmp_path):
    text = ["Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him. " * 6]
    runs = {}
    for name, extra in {"plain": {}, "checkpointed": {"gradient_checkpointing": True}, "bf16": {"bf16": True}}.items():
        model = LLMTrainer.from_pretrained(tiny_llama)
        result = model.train(text, args=quick_args(tmp_path / name, max_steps=4, **extra))
        runs[name] = (result, {k: v.clone() for k, v in model.model.state_dict().items()})
        assert model.model.gradient_checkpointing is False  # switched off again for inference
    plain, checkpointed = runs["plain"][1], runs["checkpointed"][1]
    assert max((plain[k] - checkpointed[k]).abs().max().item() for k in plain) < 1e-6  # recomputation is exact
    assert runs["bf16"][0].train_loss == pytest.approx(runs["plain"][0].train_loss, abs=0.05)
    assert next(iter(runs["bf16"][1].values())).dtype == torch.float32  # master weights stay float32


def test_tensorboard_event_files_when_installed(tiny_gpt2, tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard logging is optional; tensorboard is not installed")
    model = LLMTrainer.from_pretrained(tiny_gpt2)
    model.train(["some text to log " * 30], args=quick_args(tmp_path, max_steps=2, logging_steps=1))
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
