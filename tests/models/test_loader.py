"""The safetensors loader on broken, unsafe, sharded and legacy checkpoints: every failure is a ModelLoadError that
names the file, key or tensor at fault; pickles are refused without being opened."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support import family_config, make_checkpoint

from llmasos import LLM, ModelLoadError
from llmasos.models import MODEL_FAMILIES
from llmasos.models.attention import AttentionMetadata
from llmasos.models.loader import cpu_supports_bf16, load_model


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pristine")
    make_checkpoint(directory, family_config("qwen2", num_hidden_layers=2))
    return directory


@pytest.fixture
def checkpoint(pristine, tmp_path) -> Path:
    """A private copy of the tiny checkpoint that a test may break."""
    directory = tmp_path / "model"
    shutil.copytree(pristine, directory)
    return directory


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


@torch.no_grad()
def logits_of(model, token_ids: list[int]) -> torch.Tensor:
    attn = AttentionMetadata.for_prompts([len(token_ids)])
    hidden = model(torch.tensor(token_ids), torch.arange(len(token_ids)), attn)
    return model.compute_logits(hidden)


PROBE = list(range(5, 160))


# -- missing pieces -------------------------------------------------------------------------------------------------

def test_a_missing_directory_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path / "home"))  # a string may also be a library name
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="no-such-model.*does not exist"):
        LLM.load(missing)
    with pytest.raises(ModelLoadError) as caught:
        LLM.load(str(missing))
    assert str(missing) in str(caught.value) and "not found" in str(caught.value)


def test_a_file_instead_of_a_directory_is_explained(checkpoint):
    with pytest.raises(ModelLoadError, match="not a directory"):
        load_model(checkpoint / "config.json")


def test_a_missing_config_json_is_named(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"config\.json not found"):
        LLM.load(checkpoint)


def test_an_unparsable_config_json_is_named(checkpoint):
    (checkpoint / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json is not valid JSON"):
        load_model(checkpoint)


def test_an_unsupported_model_type_is_named_with_the_supported_ones(checkpoint):
    edit_config(checkpoint, model_type="mamba")
    with pytest.raises(ModelLoadError) as caught:
        LLM.load(checkpoint)
    message = str(caught.value)
    assert "'mamba'" in message and "not supported" in message
    assert all(family in message for family in MODEL_FAMILIES)


def test_a_config_without_model_type_is_refused(checkpoint):
    edit_config(checkpoint, model_type=None)
    with pytest.raises(ModelLoadError, match="no model_type"):
        load_model(checkpoint)


def test_a_directory_without_weights_says_so(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="has no weights"):
        load_model(checkpoint)


def test_bad_dtype_and_device_are_explained(checkpoint):
    with pytest.raises(ModelLoadError, match="dtype 'float64' is not supported"):
        load_model(checkpoint, dtype="float64")
    with pytest.raises(ModelLoadError, match="device 'meta' is not supported"):
        load_model(checkpoint, device="meta")
    with pytest.raises(ModelLoadError, match="device 'gpu' is not supported"):
        load_model(checkpoint, device="gpu")


# -- corrupt weights ------------------------------------------------------------------------------------------------

def _header(data: bytes) -> tuple[int, dict]:
    (length,) = struct.unpack("<Q", data[:8])
    return length, json.loads(data[8:8 + length])


def _with_header(data: bytes, header: dict) -> bytes:
    length, _ = _header(data)
    encoded = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    assert len(encoded) == length
    return data[:8] + encoded + data[8 + length:]


def _bad_dtype(data: bytes) -> bytes:
    _, header = _header(data)
    name = next(k for k in header if k != "__metadata__")
    header[name] = {**header[name], "dtype": "XYZ"}
    return _with_header(data, header)


def _shifted_offsets(data: bytes) -> bytes:
    _, header = _header(data)
    name = next(k for k in header if k != "__metadata__" and header[k]["data_offsets"][0] > 0)
    start, end = header[name]["data_offsets"]
    header[name] = {**header[name], "data_offsets": [start - 4, end - 4]}
    return _with_header(data, header)


CORRUPTIONS = {
    "truncated": lambda data: data[:len(data) // 2],
    "empty": lambda data: b"",
    "cut inside the header": lambda data: data[:40],
    "garbage header": lambda data: b"\x00" * 64 + data[64:],
    "garbage length": lambda data: b"\xff" * 8 + data[8:],
    "unknown dtype": _bad_dtype,
    "overlapping offsets": _shifted_offsets,
    "trailing bytes": lambda data: data + b"\x00" * 64,
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_safetensors_name_the_file(checkpoint, corruption):
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(CORRUPTIONS[corruption](weights.read_bytes()))
    with pytest.raises(ModelLoadError) as caught:
        LLM.load(checkpoint)
    assert str(weights) in str(caught.value)
    assert any(word in str(caught.value) for word in ("truncated", "corrupt", "not a safetensors"))


def test_a_weight_whose_shape_does_not_match_the_config_is_named(checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    tensors["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(48, 64)
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError) as caught:
        LLM.load(checkpoint)
    message = str(caught.value)
    assert "'model.layers.1.self_attn.q_proj.weight'" in message
    assert "[48, 64]" in message and "[64, 64]" in message and "config.json" in message


def test_a_config_that_disagrees_with_the_weights_names_a_tensor(checkpoint):
    edit_config(checkpoint, intermediate_size=128)
    with pytest.raises(ModelLoadError, match=r"tensor 'model\.layers\.\d\.mlp\.\w+_proj\.weight'.*shape"):
        load_model(checkpoint)


def test_missing_and_unexpected_tensors_are_named(checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    del tensors["model.layers.0.post_attention_layernorm.weight"]
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"missing weights: model\.layers\.0\.post_attention_layernorm\.weight"):
        load_model(checkpoint)
    tensors["model.layers.0.post_attention_layernorm.weight"] = torch.ones(64)
    tensors["model.layers.0.mystery.weight"] = torch.ones(3)
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"does not use: model\.layers\.0\.mystery\.weight"):
        load_model(checkpoint)


# -- pickles are never opened ---------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this creates `marker`: what a malicious checkpoint would do with os.system instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def write_malicious_pickles(directory: Path, marker: Path) -> None:
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, directory / "pytorch_model.bin")
    (directory / "model.pt").write_bytes(pickle.dumps(_Payload(marker)))


def test_the_payload_really_runs_code_when_unpickled(tmp_path):
    """Proves the checks below can fail: loading these files the unsafe way does create the marker."""
    marker = tmp_path / "pwned-by-torch-load"
    write_malicious_pickles(tmp_path, marker)
    torch.load(tmp_path / "pytorch_model.bin", weights_only=False)
    assert marker.exists()
    marker.unlink()
    pickle.loads((tmp_path / "model.pt").read_bytes())
    assert marker.exists()


def test_a_pickle_only_checkpoint_is_refused_without_running_it(checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    (checkpoint / "model.safetensors").unlink()
    write_malicious_pickles(checkpoint, marker)
    with pytest.raises(ModelLoadError) as caught:
        LLM.load(checkpoint)
    message = str(caught.value)
    assert "pytorch_model.bin" in message and "model.pt" in message
    assert "safetensors" in message and "save_pretrained" in message  # says how to convert
    assert not marker.exists()


def test_pickles_next_to_safetensors_are_ignored(checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    write_malicious_pickles(checkpoint, marker)
    llm = LLM.load(checkpoint)
    assert llm.generate([5, 6, 7])[0].finished
    assert not marker.exists()


# -- sharded and legacy checkpoints ---------------------------------------------------------------------------------

def test_sharded_safetensors_load_the_same_model(tmp_path):
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    reference = make_checkpoint(whole, family_config("llama", num_hidden_layers=2))
    reference.save_pretrained(sharded, max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(whole / name, sharded / name)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3 and not (sharded / "model.safetensors").exists()
    one, _ = load_model(whole, dtype="float32")
    many, _ = load_model(sharded, dtype="float32")
    assert torch.equal(logits_of(one, PROBE), logits_of(many, PROBE))
    assert LLM.load(sharded).generate(PROBE[:9])[0].finished


def test_a_shard_missing_from_an_index_is_named(tmp_path):
    directory = tmp_path / "sharded"
    make_checkpoint(tmp_path / "whole", family_config("qwen2", num_hidden_layers=2)).save_pretrained(
        directory, max_shard_size="20KB")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (directory / victim).unlink()
    with pytest.raises(ModelLoadError, match=f"{victim} is listed in model.safetensors.index.json but missing"):
        load_model(directory)
    index["weight_map"]["model.norm.weight"] = "../outside.safetensors"
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="outside the model directory"):
        load_model(directory)


LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}
ROPE_FORMS = {
    "rope_parameters": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 50000.0, **LLAMA3_SCALING}},
    "legacy type": {"rope_parameters": None, "rope_theta": 50000.0,
                    "rope_scaling": {"type": "llama3", **LLAMA3_SCALING}},
    "legacy rope_type": {"rope_parameters": None, "rope_theta": 50000.0,
                         "rope_scaling": {"rope_type": "llama3", **LLAMA3_SCALING}},
}


def test_legacy_rope_keys_load_the_same_as_rope_parameters(tmp_path):
    base = tmp_path / "base"
    make_checkpoint(base, family_config("llama", num_hidden_layers=2))
    results = {}
    for name, changes in ROPE_FORMS.items():
        directory = tmp_path / name.replace(" ", "-")
        shutil.copytree(base, directory)
        edit_config(directory, **changes)
        model, config = load_model(directory, dtype="float32")
        assert config.rope_theta == 50000.0 and config.rope_scaling["rope_type"] == "llama3"
        results[name] = logits_of(model, PROBE)
    assert torch.equal(results["legacy type"], results["rope_parameters"])
    assert torch.equal(results["legacy rope_type"], results["rope_parameters"])
    # Against transformers reading the current form: the edited theta and scaling are really applied.
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "rope_parameters", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([PROBE])).logits[0]
    assert torch.allclose(results["rope_parameters"], expected, atol=1e-4, rtol=0)
    default_theta, _ = load_model(base, dtype="float32")  # theta 10000: a loader ignoring the keys would match this
    assert not torch.allclose(logits_of(default_theta, PROBE), results["rope_parameters"], atol=1e-3)


# -- dtype "auto" ---------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no avx512_bf16 / amx_bf16: auto stays float32")
def test_a_float32_checkpoint_runs_in_bfloat16_under_auto_on_a_bf16_cpu(pristine):
    assert json.loads((pristine / "config.json").read_text())["dtype"] == "float32"
    model, _ = load_model(pristine, dtype="auto", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert LLM.load(pristine).dtype == torch.bfloat16  # the default of LLM.load is auto


def test_auto_keeps_float32_on_a_cpu_without_bf16(pristine, monkeypatch):
    monkeypatch.setattr("llmasos.models.loader.cpu_supports_bf16", lambda: False)
    model, _ = load_model(pristine, dtype="auto", device="cpu")
    assert next(model.parameters()).dtype == torch.float32


def test_an_explicit_dtype_is_kept(pristine):
    model, _ = load_model(pristine, dtype="float32", device="cpu")
    assert next(model.parameters()).dtype == torch.float32
    assert LLM.load(pristine, dtype="float32").dtype == torch.float32


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
def test_a_half_precision_checkpoint_keeps_its_dtype_under_auto(tmp_path, stored):
    make_checkpoint(tmp_path, family_config("qwen2", num_hidden_layers=1), dtype=stored)
    model, _ = load_model(tmp_path, dtype="auto", device="cpu")
    assert next(model.parameters()).dtype == stored
