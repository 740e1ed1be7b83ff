"""LoRA: adapters PEFT loads with matching logits, merged exports, and `apply_adapter` for inference."""

from __future__ import annotations

import json

import pytest
import torch

from llmasos import LLM, LLMTrainer, TrainingArguments
from llmasos.errors import ModelLoadError
from llmasos.models.loader import load_model
from llmasos.train import apply_adapter

from .test_trainer import IDS, our_logits, transformers_logits

TEXT = ["ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. " * 8]


def lora_args(tmp_path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path / "run"), method="lora", max_steps=8, per_device_train_batch_size=2,
                  learning_rate=2e-2, max_seq_length=64, save_steps=None, progress_bar=False, lora_r=4,
                  lora_alpha=8)
    return TrainingArguments(**{**values, **overrides})


def peft_logits(base_dir, adapter_dir) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return model(IDS).logits[0].float()


@pytest.mark.parametrize("fixture, targets", [("tiny_llama", None), ("tiny_gpt2", None),
                                              ("tiny_qwen2", ["q_proj", "v_proj"])])
def test_peft_loads_our_adapter_with_matching_logits(fixture, targets, request, tmp_path):
    base_dir = request.getfixturevalue(fixture)
    model = LLMTrainer.from_pretrained(base_dir)
    frozen = {name: p.detach().clone() for name, p in model.model.named_parameters()}
    model.train(TEXT, args=lora_args(tmp_path, lora_target_modules=targets))
    for name, param in model.model.named_parameters():  # only the adapter matrices moved
        if ".lora_" not in name:
            assert torch.equal(param, frozen[name.replace(".base_layer.", ".")]), name
    ours = our_logits(model.model)
    assert not torch.allclose(ours, transformers_logits(base_dir), atol=1e-3)

    adapter = model.save_pretrained(tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 4
    assert config["base_model_name_or_path"] == str(base_dir)
    if targets:
        assert config["target_modules"] == targets
    assert torch.allclose(peft_logits(base_dir, adapter), ours, atol=1e-5, rtol=0)

    merged = model.save_pretrained(tmp_path / "merged", merge=True)
    assert not (merged / "adapter_config.json").exists()
    assert torch.allclose(transformers_logits(merged), ours, atol=1e-5, rtol=0)
    assert torch.allclose(our_logits(LLM.load(merged, dtype="float32").model), ours, atol=1e-5, rtol=0)

    # Inference without any adapter code: merge the saved adapter into a freshly loaded base model.
    base, _ = load_model(base_dir, dtype="float32")
    merged_paths = apply_adapter(base, adapter)
    assert merged_paths and all(path.split(".")[-1] in config["target_modules"] for path in merged_paths)
    assert torch.allclose(our_logits(base), ours, atol=1e-5, rtol=0)


def test_apply_adapter_reads_an_adapter_peft_wrote(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    peft_model = get_peft_model(reference, LoraConfig(r=2, lora_alpha=6, target_modules=["k_proj", "down_proj"],
                                                      init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "peft_adapter")
    with torch.no_grad():
        expected = peft_model.eval()(IDS).logits[0]
    base, _ = load_model(tiny_llama, dtype="float32")
    apply_adapter(base, tmp_path / "peft_adapter")
    assert torch.allclose(our_logits(base), expected, atol=1e-5, rtol=0)


def test_bad_adapters_are_refused_clearly(tiny_llama, tiny_gpt2, tmp_path):
    base, _ = load_model(tiny_llama, dtype="float32")
    with pytest.raises(ModelLoadError, match="adapter_config.json not found"):
        apply_adapter(base, tmp_path)
    model = LLMTrainer.from_pretrained(tiny_gpt2)
    model.train(TEXT, args=lora_args(tmp_path, max_steps=1))
    adapter = model.save_pretrained(tmp_path / "gpt2_adapter")
    with pytest.raises(ModelLoadError, match="no matching linear layer"):
        apply_adapter(base, adapter)  # a GPT-2 adapter on a Llama model


def test_unknown_target_modules_are_a_clear_error(tiny_llama, tmp_path):
    model = LLMTrainer.from_pretrained(tiny_llama)
    with pytest.raises(ValueError, match="match no linear layer.*q_proj, k_proj, v_proj, o_proj"):
        model.train(TEXT, args=lora_args(tmp_path, lora_target_modules=["c_attn"]))


@pytest.mark.parametrize("fixture, targets", [("tiny_llama", None), ("tiny_gpt2", None),
                                              ("tiny_qwen2", ["q_proj", "v_proj"])])
def test_trained_parameter_count_is_the_adapters_as_peft_counts_it(fixture, targets, request, tmp_path):
    """Issue 13: a LoRA run reported the whole model as trained; PEFT's get_nb_trainable_parameters is the reference."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = request.getfixturevalue(fixture)
    model = LLMTrainer.from_pretrained(base_dir)
    result = model.train(TEXT, args=lora_args(tmp_path, max_steps=1, lora_target_modules=targets))
    reference = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                               LoraConfig(r=4, lora_alpha=8, target_modules=targets or "all-linear"))
    trainable, total = reference.get_nb_trainable_parameters()
    assert (result.num_trainable_parameters, result.num_parameters) == (trainable, total)
    assert 0 < trainable < total // 4
    assert result.parameters_text() == f"{trainable:,} of {total:,} parameters ({100 * trainable / total:.4g}%)"


def test_full_fine_tuning_trains_every_parameter(tiny_qwen2, tmp_path):
    model = LLMTrainer.from_pretrained(tiny_qwen2)
    result = model.train(TEXT, args=lora_args(tmp_path, method="full", max_steps=1))
    total = model.model.num_parameters()  # tied embeddings counted once
    assert (result.num_trainable_parameters, result.num_parameters) == (total, total)
    assert result.parameters_text().endswith("parameters (100%)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merged_export_keeps_the_base_checkpoints_dtype(dtype, tmp_path):
    """Issue 13: a merged LoRA model of a bf16 base was saved in float32, twice the base's size. Training computes in
    float32; the export is stored like its base (config dtype and every tensor), and transformers loads it."""
    from safetensors import safe_open
    from support import family_config, make_checkpoint
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "base"
    make_checkpoint(base_dir, family_config("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, rope_scaling=None),
                    dtype=dtype)
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    assert json.loads((base_dir / "config.json").read_text())["dtype"] == name
    model = LLMTrainer.from_pretrained(base_dir)
    assert next(model.model.parameters()).dtype == torch.float32  # float32 master weights while training
    model.train(TEXT, args=lora_args(tmp_path))
    merged = model.save_pretrained(tmp_path / "merged", merge=True)

    config = json.loads((merged / "config.json").read_text())
    assert config["dtype"] == name and config["torch_dtype"] == name
    with safe_open(merged / "model.safetensors", framework="pt") as handle:
        assert {handle.get_tensor(key).dtype for key in handle.keys()} == {dtype}
    base_size, merged_size = ((d / "model.safetensors").stat().st_size for d in (base_dir, merged))
    assert abs(merged_size - base_size) < 0.01 * base_size
    loaded = AutoModelForCausalLM.from_pretrained(merged)
    assert loaded.dtype == dtype
    ours = our_logits(model.model)  # the trained (unmerged, float32) model
    assert torch.allclose(transformers_logits(merged), ours, atol=0.15, rtol=0)  # rounding to 16 bits only
    assert not torch.allclose(transformers_logits(merged), transformers_logits(base_dir), atol=1e-3)

    # an explicit dtype still wins, and a float32 base stays float32
    assert json.loads((model.save_pretrained(tmp_path / "f32", merge=True, dtype="float32") / "config.json")
                      .read_text())["dtype"] == "float32"
