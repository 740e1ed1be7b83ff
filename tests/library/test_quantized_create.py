"""`llmasos create` with PARAMETER quantization: the quantized weights become a new checkpoint in the store that
reloads exactly as the model quantized at load; `show` reports it; bad values change nothing."""

from __future__ import annotations

import json

import pytest
import torch

from library.conftest import tree
from llmasos.models.attention import AttentionMetadata
from llmasos.models.loader import load_model
from llmasos.models.quantization import quantize_model

IDS = list(range(3, 60))


@torch.no_grad()
def logits_of(model) -> torch.Tensor:
    hidden = model(torch.tensor(IDS), torch.arange(len(IDS)), AttentionMetadata.for_prompts([len(IDS)]))
    return model.compute_logits(hidden)


def create(cli, workdir, name: str, text: str):
    modelfile = workdir / f"Modelfile.{name}"
    modelfile.write_text(text)
    return cli("create", name, "-f", str(modelfile))


def show(cli, name: str) -> dict:
    result = cli("show", name, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("method, group_size", [("int8", 32), ("int4", 32), ("int4", 128)])
def test_created_quantized_model_reloads_as_quantized_at_load(cli, workdir, checkpoint, method, group_size):
    assert cli("import", str(checkpoint), "--name", "tiny").exit_code == 0
    group = f"PARAMETER quantization_group_size {group_size}\n" if method == "int4" else ""
    result = create(cli, workdir, "tiny-q", f"FROM tiny\nPARAMETER quantization {method}\n{group}"
                                            "PARAMETER temperature 0.3\nSYSTEM Be brief.\n")
    assert result.exit_code == 0, result.output
    shown = method if method == "int8" else f"int4, group size {group_size}"
    assert f"created tiny-q from tiny: weights quantized to {shown}" in result.stdout

    base, quantized = show(cli, "tiny"), show(cli, "tiny-q")
    assert quantized["path"] != base["path"]  # its own checkpoint, not the base's files
    assert quantized["quantization"] == {"method": method, "group_size": group_size}
    assert base["quantization"] is None
    assert quantized["weight_bytes"] < (0.7 if method == "int8" else 0.55) * base["weight_bytes"]
    assert quantized["sampling_parameters"] == {"temperature": 0.3}  # no quantization among the sampling defaults
    assert quantized["system"] == "Be brief." and quantized["source"] == {**quantized["source"], "type": "derived",
                                                                          "base": "tiny"}
    paths = {entry["path"] for entry in quantized["files"]}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= paths

    stored, _ = load_model(quantized["path"], dtype="float32")
    at_load, _ = load_model(checkpoint, dtype="float32", quantization=method, group_size=group_size)
    assert torch.equal(logits_of(stored), logits_of(at_load))
    text = cli("show", "tiny-q").stdout
    assert f"quantized   {shown} (output head int8)" in text and "weights" in text
    modelfile = cli("show", "tiny-q", "--modelfile").stdout
    assert f"PARAMETER quantization {method}\n" in modelfile
    assert ("PARAMETER quantization_group_size" in modelfile) == (method == "int4")


def test_spec_of_a_quantized_model(cli, workdir, checkpoint):
    from llmasos.spec import resolve_spec

    assert cli("import", str(checkpoint), "--name", "tiny").exit_code == 0
    assert create(cli, workdir, "tiny-q", "FROM tiny\nPARAMETER quantization int4\n").exit_code == 0
    spec = resolve_spec("tiny-q")
    assert (spec.quantization, spec.quantization_group_size) == ("int4", 32)
    assert "quantization" not in spec.parameters and "quantization_group_size" not in spec.parameters


def test_adapter_is_merged_before_quantizing(cli, workdir, checkpoint):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmasos.train.lora import apply_adapter

    assert cli("import", str(checkpoint), "--name", "tiny").exit_code == 0
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint),
                                LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    peft_model.save_pretrained(workdir / "lora")
    result = create(cli, workdir, "tuned-q", "FROM tiny\nADAPTER lora\nPARAMETER quantization int8\n")
    assert result.exit_code == 0, result.output
    data = show(cli, "tuned-q")
    assert data["adapter"] is None  # merged into the stored weights
    expected, _ = load_model(checkpoint, dtype="float32")
    with torch.no_grad():
        apply_adapter(expected, workdir / "lora")
    quantize_model(expected, "int8")
    stored, _ = load_model(data["path"], dtype="float32")
    assert torch.equal(logits_of(stored), logits_of(expected))
    unmerged, _ = load_model(checkpoint, dtype="float32", quantization="int8")
    assert not torch.allclose(logits_of(stored), logits_of(unmerged), atol=1e-2)


@pytest.mark.parametrize("text, message", [
    ("FROM tiny\nPARAMETER quantization int3\n",
     "line 2: PARAMETER quantization takes int8 or int4 or w8a8, got 'int3'"),
    ("FROM tiny\nPARAMETER quantization int4\nPARAMETER quantization_group_size 48\n",
     "line 3: PARAMETER quantization_group_size takes 32, 64, 128, got '48'"),
    ("FROM tiny\nPARAMETER quantization_group_size 64\n", "applies to int4 quantization only"),
    ("FROM tiny\nPARAMETER quantization int8\nPARAMETER quantization_group_size 64\n", "applies to int4"),
    ("FROM tiny-q\nPARAMETER quantization int4\n", "'tiny-q' is stored quantized already"),
    ("FROM tiny-q\nADAPTER lora\n", "'tiny-q' is stored quantized and a LoRA adapter cannot be merged"),
    ("FROM missing\nPARAMETER quantization int8\n", "no model named 'missing'"),
])
def test_bad_quantization_leaves_the_store_unchanged(cli, home, workdir, checkpoint, text, message):
    assert cli("import", str(checkpoint), "--name", "tiny").exit_code == 0
    assert create(cli, workdir, "tiny-q", "FROM tiny\nPARAMETER quantization int8\n").exit_code == 0
    (workdir / "lora").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (workdir / "lora" / name).write_text("{}")
    before = {path: size for path, size in tree(home / "models").items() if not path.startswith(".locks/")}
    result = create(cli, workdir, "other", text)
    assert result.exit_code == 1 and message in result.stderr, result.output
    after = {path: size for path, size in tree(home / "models").items() if not path.startswith(".locks/")}
    assert after == before
    assert "other" not in cli("list").stdout


def test_removing_the_quantized_model_frees_its_files(cli, home, workdir, checkpoint):
    assert cli("import", str(checkpoint), "--name", "tiny").exit_code == 0
    assert create(cli, workdir, "tiny-q", "FROM tiny\nPARAMETER quantization int4\n").exit_code == 0
    data = show(cli, "tiny-q")
    assert cli("rm", "tiny").exit_code == 1  # still the base of tiny-q
    result = cli("rm", "tiny-q")
    assert result.exit_code == 0 and "freed" in result.stdout
    assert not (home / "models" / "checkpoints" / data["directory"]).exists()
    assert isinstance(load_model(show(cli, "tiny")["path"])[0].model.layers[0].mlp.down_proj, torch.nn.Linear)
