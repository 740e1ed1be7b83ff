"""llmasos.spec's device rule: "auto" (and None) is a CUDA GPU when there is one, else the CPU; explicit devices are
kept; every entry point (resolve_spec, LLM.load) goes through it."""

from __future__ import annotations

import pytest
import torch
from support import family_config, make_checkpoint

from llmasos.spec import ModelSpec, resolve_device, resolve_spec


def test_auto_is_the_cpu_without_a_gpu_and_cuda_with_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == resolve_device(None) == "cuda"


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1", torch.device("cuda", 1)])
def test_explicit_devices_are_kept(device):
    assert resolve_device(device) == str(device)


@pytest.mark.parametrize("device", ["gpu", "cuda0", "mps", "meta", ""])
def test_devices_llmasos_cannot_run_on_are_refused_when_resolved(device):
    with pytest.raises(ValueError, match=f"device '{device}' is not supported; use auto, cpu, cuda or cuda:N"):
        resolve_device(device)


def test_specs_resolve_auto_once(tmp_path):
    make_checkpoint(tmp_path, family_config("qwen2", num_hidden_layers=1))
    here = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_spec(tmp_path).device == here
    assert resolve_spec(tmp_path, device="auto").device == here
    assert resolve_spec(tmp_path, device="cpu").device == "cpu"
    assert resolve_spec(resolve_spec(tmp_path, device="cpu"), device="auto").device == here
    assert ModelSpec(name="m", path=str(tmp_path), device="auto").device == here
