"""`llmasos import / list / show / rm / cp` through the real CLI in a temporary LLMASOS_HOME, and LLM.load by name."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from safetensors import safe_open

from library.conftest import copy_checkpoint, tree
from llmasos import LLM, SamplingParams


def _list(cli) -> list[dict]:
    result = cli("list", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _reference_parameter_count(directory) -> int:
    """Elements of every tensor in the checkpoint, read with the safetensors library."""
    total = 0
    with safe_open(directory / "model.safetensors", framework="pt") as handle:
        for key in handle.keys():
            count = 1
            for dim in handle.get_slice(key).get_shape():
                count *= dim
            total += count
    return total


def test_import_list_show(cli, home, checkpoint):
    result = cli("import", str(checkpoint), "--name", "tiny:v1")
    assert result.exit_code == 0, result.output
    assert "imported tiny:v1" in result.stdout

    [entry] = _list(cli)
    source_files = ["chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
                    "tokenizer.json", "tokenizer_config.json"]
    assert entry["name"] == "tiny:v1"
    assert entry["family"] == "qwen2"
    assert entry["parameters"] == _reference_parameter_count(checkpoint)
    assert entry["size_bytes"] == sum((checkpoint / name).stat().st_size for name in source_files)
    assert entry["context_length"] == 512
    assert entry["source"] == str(checkpoint.resolve())

    table = cli("list")
    assert table.exit_code == 0 and "tiny:v1" in table.stdout and "qwen2" in table.stdout

    shown = cli("show", "tiny:v1", "--json")
    assert shown.exit_code == 0
    data = json.loads(shown.stdout)
    assert sorted(f["path"] for f in data["files"]) == source_files
    for file in data["files"]:
        assert file["sha256"] == hashlib.sha256((checkpoint / file["path"]).read_bytes()).hexdigest()
    stored = home / "models" / "checkpoints"
    assert os.path.dirname(data["path"]) == str(stored)
    assert data["effective_chat_template"] == (checkpoint / "chat_template.jinja").read_text()
    assert data["dtype"] == "float32"
    config = json.loads((checkpoint / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    # keys and values, every layer, float32
    assert data["kv_cache_bytes_per_token"] == 2 * config["num_hidden_layers"] * config["num_key_value_heads"] \
        * head_dim * 4
    text = cli("show", "tiny:v1")
    assert text.exit_code == 0 and "model.safetensors" in text.stdout and "qwen2" in text.stdout
    assert "per token" in text.stdout


def test_library_name_loads_like_the_directory(cli, checkpoint):
    assert cli("import", str(checkpoint), "--name", "tiny").exit_code == 0
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    by_name = LLM.load("tiny").generate("To be, or not", params)[0].token_ids
    by_path = LLM.load(checkpoint).generate("To be, or not", params)[0].token_ids
    assert by_name == by_path
    generated = cli("generate", "--model", "tiny", "--max-tokens", "4", "To be")
    assert generated.exit_code == 0, generated.output
    assert generated.stdout.startswith("To be")


def test_import_hard_link(cli, home, checkpoint, workdir):
    source = copy_checkpoint(checkpoint, workdir / "src")
    result = cli("import", str(source), "--name", "linked", "--link")
    assert result.exit_code == 0 and "hard-linked" in result.stdout
    path = json.loads(cli("show", "linked", "--json").stdout)["path"]
    assert os.stat(f"{path}/model.safetensors").st_ino == (source / "model.safetensors").stat().st_ino


def test_import_skips_non_runtime_files(cli, checkpoint, workdir):
    source = copy_checkpoint(checkpoint, workdir / "src")
    (source / "optimizer.pt").write_bytes(b"pickle-bytes")
    (source / "notes.txt").write_text("hello")
    assert cli("import", str(source), "--name", "clean").exit_code == 0
    path = json.loads(cli("show", "clean", "--json").stdout)["path"]
    assert not os.path.exists(f"{path}/optimizer.pt") and not os.path.exists(f"{path}/notes.txt")


def test_duplicate_name_refused(cli, checkpoint):
    assert cli("import", str(checkpoint), "--name", "tiny").exit_code == 0
    again = cli("import", str(checkpoint), "--name", "tiny")
    assert again.exit_code == 1
    assert "already exists" in again.stderr and "llmasos rm tiny" in again.stderr
    assert len(_list(cli)) == 1


def test_cp_shares_files_and_rm_frees_them_last(cli, home, checkpoint):
    assert cli("import", str(checkpoint), "--name", "tiny").exit_code == 0
    copied = cli("cp", "tiny", "tiny:copy")
    assert copied.exit_code == 0, copied.output
    a, b = (json.loads(cli("show", n, "--json").stdout) for n in ("tiny", "tiny:copy"))
    assert a["path"] == b["path"] and b["source"]["path"] == a["source"]["path"]
    assert cli("cp", "tiny", "tiny:copy").exit_code == 1  # target taken
    assert cli("cp", "nope", "other").exit_code == 1

    removed = cli("rm", "tiny")
    assert removed.exit_code == 0 and "freed" not in removed.stdout
    assert os.path.isdir(a["path"])
    assert LLM.load("tiny:copy").generate("a", SamplingParams(max_tokens=1))[0].token_ids
    removed = cli("rm", "tiny:copy")
    assert removed.exit_code == 0 and "freed" in removed.stdout
    assert not os.path.exists(a["path"])
    assert _list(cli) == []
    assert tree(home / "models" / "checkpoints") == {}


def test_rm_unknown_model(cli):
    result = cli("rm", "ghost")
    assert result.exit_code == 1 and "no model named 'ghost'" in result.stderr and "llmasos list" in result.stderr
    # 'ghost' is not in the catalog, so `llmasos pull ghost` would fail: the message must not suggest it.
    assert "llmasos pull ghost" not in result.stderr and "llmasos list --available" in result.stderr


def test_show_a_catalog_model_not_pulled_yet_suggests_pulling_it(cli):
    result = cli("show", "qwen3:0.6b")
    assert result.exit_code == 1 and "`llmasos pull qwen3:0.6b` fetches it" in result.stderr


def test_load_unknown_name_says_how_to_get_one(home):
    with pytest.raises(ValueError, match="llmasos pull"):
        LLM.load("not-there:1b")
    with pytest.raises(ValueError, match="llmasos pull Qwen/Nope"):
        LLM.load("Qwen/Nope")


def test_list_empty_home_says_how_to_get_models(cli):
    result = cli("list")
    assert result.exit_code == 0 and "llmasos pull" in result.stdout and "llmasos import" in result.stdout
    assert _list(cli) == []


def test_available_catalog(cli):
    result = cli("list", "--available", "--json")
    entries = {e["name"]: e for e in json.loads(result.stdout)}
    assert entries["qwen2.5:0.5b-instruct"]["repo"] == "Qwen/Qwen2.5-0.5B-Instruct"
    families = {e["family"] for e in entries.values()}
    assert {"qwen2", "qwen3", "llama", "gemma2", "phi3", "mistral", "gpt2"} <= families
    assert any(name.startswith("smollm2") for name in entries) and any("tinyllama" in name for name in entries)
    text = cli("list", "--available")
    assert "Qwen/Qwen2.5-0.5B-Instruct" in text.stdout


def test_show_json_is_valid_for_every_field(cli, checkpoint):
    assert cli("import", str(checkpoint), "--name", "tiny").exit_code == 0
    data = json.loads(cli("show", "tiny", "--json").stdout)
    for key in ("name", "family", "parameters", "dtype", "context_length", "size_bytes", "format", "source", "files",
                "license", "system", "sampling_parameters", "chat_template"):
        assert key in data
    assert data["format"] == "safetensors" and data["source"]["type"] == "local"


def _peft_adapter(base, directory):
    """A LoRA adapter as PEFT itself saves it (adapter_config.json + adapter_model.safetensors, no config.json)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    model.save_pretrained(directory)
    assert not (directory / "config.json").exists()
    return directory


def test_import_of_an_adapter_says_what_it_is_and_how_to_use_it(cli, home, checkpoint, workdir):
    adapter = _peft_adapter(checkpoint, workdir / "adapter")
    before = tree(home)
    result = cli("import", str(adapter), "--name", "tuned")
    assert result.exit_code == 1 and "Traceback" not in result.output
    message = " ".join(result.stderr.split())
    assert "LoRA adapter" in message and str(checkpoint) in message  # names the base from adapter_config.json
    assert f"llmasos import {checkpoint} --name BASE" in message
    assert f"ADAPTER {adapter.resolve()}" in message and "llmasos create NAME -f Modelfile" in message
    assert tree(home) == before and _list(cli) == []  # nothing half-imported

    # The hint works as written.
    assert cli("import", str(checkpoint), "--name", "base").exit_code == 0
    modelfile = workdir / "Modelfile"
    modelfile.write_text(f"FROM base\nADAPTER {adapter.resolve()}\n")
    created = cli("create", "tuned", "-f", str(modelfile))
    assert created.exit_code == 0, created.output
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    assert LLM.load("tuned").generate("To be", params)[0].token_ids != LLM.load("base").generate(
        "To be", params)[0].token_ids


def test_import_of_an_adapter_without_a_recorded_base(cli, home, workdir):
    adapter = workdir / "bare-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    result = cli("import", str(adapter), "--name", "tuned")
    assert result.exit_code == 1 and "Traceback" not in result.output
    message = " ".join(result.stderr.split())
    assert "LoRA adapter" in message and "does not name its base model" in message and "ADAPTER" in message
    assert _list(cli) == []


def test_import_of_an_adapter_of_a_library_model_makes_a_derived_model(cli, checkpoint, workdir):
    """Issue 15: an adapter whose base is in the library (named by adapter_config.json, or by --base) is imported as
    a model FROM that base with the ADAPTER; it generates differently from the base."""
    assert cli("import", str(checkpoint), "--name", "base:v1").exit_code == 0
    adapter = _peft_adapter(checkpoint, workdir / "adapter")  # its config names the checkpoint's path
    result = cli("import", str(adapter), "--name", "tuned", "--base", "base:v1")
    assert result.exit_code == 0, result.output
    assert "a LoRA adapter on base:v1" in result.stdout and "--lora tuned=tuned" in result.stdout
    shown = json.loads(cli("show", "tuned", "--json").stdout)
    assert shown["source"]["base"] == "base:v1" and shown["adapter"]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    tuned, base = LLM.load("tuned", dtype="float32"), LLM.load("base:v1", dtype="float32")
    assert tuned.prompt_logprobs(tuned.tokenizer.encode("To be or not")) != \
        base.prompt_logprobs(base.tokenizer.encode("To be or not"))  # the adapter changes the model
    assert tuned.generate("To be", params)[0].token_ids  # and it generates
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "base:v1"}))
    assert cli("import", str(adapter), "--name", "tuned2").exit_code == 0  # the base from adapter_config.json
    missing = cli("import", str(adapter), "--name", "tuned3", "--base", "nope")
    assert missing.exit_code == 1 and "'nope', which is not in the library" in " ".join(missing.stderr.split())


def test_import_of_an_adapter_onto_the_wrong_base_is_refused_at_import(cli, home, checkpoint, workdir):
    """An adapter for another model was imported, and failed only when the model first loaded; now import refuses
    it naming the tensor, and writes nothing. Two wrong bases: another family (no such layer), and the same family
    at another width (the shapes differ)."""
    from support import family_config, make_checkpoint

    assert cli("import", str(checkpoint), "--name", "base:v1").exit_code == 0
    adapter = _peft_adapter(checkpoint, workdir / "adapter")
    make_checkpoint(workdir / "gpt2", family_config("gpt2"))
    make_checkpoint(workdir / "wide", family_config("qwen2", num_hidden_layers=2, hidden_size=96,
                                                    intermediate_size=128, num_attention_heads=4))
    assert cli("import", str(workdir / "gpt2"), "--name", "other:gpt2").exit_code == 0
    assert cli("import", str(workdir / "wide"), "--name", "other:wide").exit_code == 0
    before = tree(home / "models" / "checkpoints")
    result = cli("import", str(adapter), "--name", "tuned", "--base", "other:gpt2")
    assert result.exit_code == 1 and "which is not a linear layer of 'other:gpt2'" in result.stderr, result.output
    result = cli("import", str(adapter), "--name", "tuned", "--base", "other:wide")
    assert result.exit_code == 1 and "features; was it trained on another base model?" in result.stderr, result.output
    assert tree(home / "models" / "checkpoints") == before and cli("show", "tuned").exit_code == 1
    assert cli("import", str(adapter), "--name", "tuned", "--base", "base:v1").exit_code == 0  # its own base fits
