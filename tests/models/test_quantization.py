"""Weight-only int8 / int4 quantization: the kernels against the float weights they represent, every decoder family
against itself with those weights substituted, quantized checkpoints, and perplexity of the bundled model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support import family_config, make_checkpoint

from llmasos.errors import ModelLoadError
from llmasos.models.attention import AttentionMetadata
from llmasos.models.gpt2 import Conv1D
from llmasos.models.loader import load_model, read_config_json
from llmasos.models.quantization import (
    QuantizedEmbedding,
    QuantizedLinear,
    dequantized_weight,
    dynamic_int8_supported,
    quantize_model,
    quantize_weight,
    unpack_nibbles,
)
from llmasos.models.quantized_checkpoint import save_quantized

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gpt2"]
METHODS = [("int8", 32), ("int4", 32), ("int4", 64), ("int4", 128)]
BUNDLED = Path(__file__).resolve().parents[2] / "llmasos" / "assets" / "default_model"
SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared/data/tinyshakespeare.txt"
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]


# -- one layer ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, group_size", METHODS)
@pytest.mark.parametrize("out_features, in_features", [(64, 128), (40, 688), (392, 100)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 5, 40])  # 40: above the int8 kernel's row limit (converted weight, bf16 GEMM)
@pytest.mark.parametrize("device", DEVICES)
def test_layer_computes_x_times_its_dequantized_weight(method, group_size, out_features, in_features, dtype, rows,
                                                       device):
    """Shapes the kernels reject (out 40 or 392 not a multiple of 16, in 688 or 100 not a multiple of the group) run
    zero-padded. The kernels take bf16 activations and return bf16: the reference rounds x the same way, and the
    tolerance is 1% of the largest output, 2.5x bf16's unit roundoff (2**-8) for the output rounding (twice, for
    int8's convert-and-GEMM path); a wrong scale, zero or nibble order is off by O(1)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=generator).to(device, dtype)
    bias = torch.randn(out_features, generator=generator).to(device, dtype)
    layer = QuantizedLinear.from_float(weight, bias, method, group_size)
    x = torch.randn(2, rows, in_features, generator=generator).to(device, dtype)  # any leading shape
    out = layer(x)
    assert out.shape == (2, rows, out_features) and out.dtype == dtype
    expected = x.to(torch.bfloat16).float() @ dequantized_weight(layer).T + bias.float()
    assert (out.float() - expected).abs().max() <= 0.01 * expected.abs().max()


def test_int8_gemm_path_converts_the_weight_in_blocks(monkeypatch):
    import llmasos.models.quantization as quantization

    weight = torch.randn(100, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    layer = QuantizedLinear.from_float(weight, None, "int8")
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    whole = layer(x)
    monkeypatch.setattr(quantization, "DEQUANTIZE_BLOCK_ELEMENTS", 64 * 7)  # 15 blocks, the last one short
    blocked = layer(x)
    assert torch.allclose(blocked.float(), whole.float(), atol=0.01 * whole.abs().max().item(), rtol=0)


@pytest.mark.parametrize("method, group_size", METHODS)
def test_quantization_error_is_within_half_a_step(method, group_size):
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 256, generator=generator) * torch.rand(48, 1, generator=generator)
    weight[3] = 0  # a zero row gets scale 0 and stays exactly zero
    tensors = quantize_weight(weight, method, group_size)
    error = (tensors.dequantize(256) - weight).abs()
    if method == "int8":
        step = tensors.scales.float()[:, None]
    else:
        step = tensors.scales.float().repeat_interleave(group_size, dim=1)
    assert (error <= 0.5 * step + 1e-2 * step + 1e-7).all()  # bf16 zeros shift the grid by < 1% of a step
    assert tensors.dequantize(256)[3].abs().max() < 1e-5


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantizing_in_row_blocks_changes_nothing(monkeypatch, method):
    import llmasos.models.quantization as quantization

    weight = torch.randn(300, 200, generator=torch.Generator().manual_seed(3))
    whole = quantize_weight(weight, method, 32)
    monkeypatch.setattr(quantization, "QUANTIZE_BLOCK_ELEMENTS", 7000)  # blocks of 35 rows
    blocked = quantize_weight(weight, method, 32)
    for field in ("qweight", "scales", "zeros"):
        a, b = getattr(whole, field), getattr(blocked, field)
        assert (a is None and b is None) or torch.equal(a, b), field


@pytest.mark.parametrize("method, group_size", METHODS)
@pytest.mark.parametrize("device", DEVICES)
def test_packed_layer_gives_back_its_stored_tensors(method, group_size, device):
    """int4 layers are unpacked through the kernel itself (the packed layout depends on the device and on the CPU's
    instruction set); tensors quantized on the CPU pack for any device and come back bit for bit."""
    weight = torch.randn(200, 96, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    stored = quantize_weight(weight, method, group_size)
    layer = QuantizedLinear.from_quantized(stored, 96, None, torch.bfloat16, device)
    back = layer.quantized_tensors()
    assert torch.equal(back.qweight.cpu(), stored.qweight) and torch.equal(back.scales.cpu(), stored.scales)
    if method == "int4":
        assert torch.equal(back.zeros.cpu(), stored.zeros)
        assert unpack_nibbles(stored.qweight).max() <= 15
    assert torch.equal(quantize_weight(weight.to(device), method, group_size).qweight.cpu(), stored.qweight)


# -- every family ---------------------------------------------------------------------------------------------------

def kernel_friendly_config(family: str):
    if family == "gpt2":
        return family_config(family, n_embd=128)
    extra = {"head_dim": 32} if family in ("qwen3", "gemma2") else {}
    return family_config(family, hidden_size=128, intermediate_size=256, **extra)


@pytest.fixture(scope="module", params=FAMILIES)
def family_checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    make_checkpoint(directory, kernel_friendly_config(request.param))
    return request.param, directory


PROMPT_LENGTHS = [37, 20, 1]


@torch.no_grad()
def batch_logits(model) -> torch.Tensor:
    device = next(model.parameters()).device
    ids = torch.randint(3, 384, (sum(PROMPT_LENGTHS),), generator=torch.Generator().manual_seed(0)).to(device)
    positions = torch.cat([torch.arange(n) for n in PROMPT_LENGTHS]).to(device)
    return model.compute_logits(model(ids, positions, AttentionMetadata.for_prompts(PROMPT_LENGTHS)))


@torch.no_grad()
def substitute_dequantized(reference, quantized) -> int:
    """Give the float model the weights the quantized one represents; returns how many layers were substituted."""
    count = 0
    for name, module in quantized.named_modules():
        if isinstance(module, QuantizedLinear):
            target = reference.get_submodule(name)
            weight = dequantized_weight(module)
            target.weight.copy_(weight.T if isinstance(target, Conv1D) else weight)
            count += 1
    return count


def relative_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_family_equals_itself_with_dequantized_weights(family_checkpoint, method, dtype):
    """Quantized model vs the same float model holding the dequantized weights (an int8 head tied to the embeddings
    serves both, as does the substituted float head). What remains is bf16 rounding: the kernels take and return
    bf16, so every projection's input and output is rounded (unit roundoff 2**-8) in places the float model does not
    round, compounded over 3 layers and the head: 0.3-1.2% RMS of the logits on these random models, so the bound
    is 2%. For scale, int4 itself moves these logits by 14-25% RMS."""
    family, directory = family_checkpoint
    quantized, config = load_model(directory, dtype=dtype, quantization=method, group_size=32)
    reference, _ = load_model(directory, dtype=dtype)
    linear_types = (torch.nn.Linear, Conv1D)
    expected_layers = sum(isinstance(m, linear_types) for m in reference.modules())
    assert substitute_dequantized(reference, quantized) == expected_layers  # every projection and the head
    assert not any(isinstance(m, linear_types) for m in quantized.modules())
    assert isinstance(quantized.input_embeddings(), QuantizedEmbedding) == config.tie_word_embeddings
    assert quantized.num_parameters() == reference.num_parameters()  # prices and /api/ps see the model's real size
    ours, theirs = batch_logits(quantized), batch_logits(reference)
    assert relative_rms(ours, theirs) < 0.02, family
    assert (ours - theirs).abs().max() < 0.05 * theirs.abs().max(), family


@pytest.mark.parametrize("method, group_size", [("int8", 32), ("int4", 32), ("int4", 128), ("w8a8", 32)])
def test_saved_checkpoint_reloads_with_identical_logits(family_checkpoint, tmp_path, method, group_size):
    family, directory = family_checkpoint
    at_load, config = load_model(directory, dtype="bfloat16", quantization=method, group_size=group_size)
    save_quantized(at_load, read_config_json(directory), tmp_path / "saved")
    streamed, _ = load_model(directory, dtype="bfloat16")  # a float model quantized while writing
    save_quantized(streamed, read_config_json(directory), tmp_path / "streamed", method=method, group_size=group_size)
    saved, streamed_tensors = (load_file(tmp_path / name / "model.safetensors") for name in ("saved", "streamed"))
    assert saved.keys() == streamed_tensors.keys()
    assert all(torch.equal(saved[name], streamed_tensors[name]) for name in saved)
    stored = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert stored["quantization_config"] == {"quant_method": "llmasos", "method": method, "group_size": group_size}
    reloaded, _ = load_model(tmp_path / "saved", dtype="bfloat16")
    assert reloaded.quantization == {"method": method, "group_size": group_size}
    assert torch.equal(batch_logits(reloaded), batch_logits(at_load)), family
    weight_bytes = sum(t.numel() * t.element_size() for t in saved.values())
    float_bytes = sum(p.numel() * 2 for p in {id(p): p for p in streamed.parameters()}.values())
    assert weight_bytes < (0.5 if method == "int4" else 0.65) * float_bytes


@NEEDS_CUDA
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_stored_checkpoint_on_cuda_matches_cpu(family_checkpoint, tmp_path, method):
    """Saved on the CPU, packed for CUDA's kernels at load: the same weights, so the same logits up to the two
    devices' bf16 kernels (different accumulation orders; see the family test for the bound)."""
    family, directory = family_checkpoint
    cpu, _ = load_model(directory, dtype="bfloat16", quantization=method)
    save_quantized(cpu, read_config_json(directory), tmp_path / "saved")
    cuda, _ = load_model(tmp_path / "saved", dtype="bfloat16", device="cuda")
    assert all(torch.equal(dequantized_weight(layer).cpu(), dequantized_weight(cpu.get_submodule(name)))
               for name, layer in cuda.named_modules() if isinstance(layer, QuantizedLinear))
    assert relative_rms(batch_logits(cuda).cpu(), batch_logits(cpu)) < 0.02, family


def test_quantize_model_keeps_untied_embeddings_float(tmp_path):
    make_checkpoint(tmp_path, kernel_friendly_config("llama"))
    model, _ = load_model(tmp_path, dtype="bfloat16")
    embedding = model.input_embeddings()
    quantize_model(model, "int4", 64)
    assert model.input_embeddings() is embedding and isinstance(model.lm_head, QuantizedLinear)
    assert model.lm_head.method == "int8" and model.model.layers[0].mlp.down_proj.method == "int4"
    head_free, _ = load_model(tmp_path, dtype="bfloat16")
    quantize_model(head_free, "int8", include_head=False)
    assert isinstance(head_free.lm_head, torch.nn.Linear)


# -- refusals -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stored_int8(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("float")
    make_checkpoint(source, kernel_friendly_config("qwen2"))
    model, _ = load_model(source, dtype="bfloat16")
    return save_quantized(model, read_config_json(source), tmp_path_factory.mktemp("int8"), method="int8")


def test_stored_checkpoint_is_not_quantized_again(stored_int8):
    with pytest.raises(ModelLoadError, match="stored quantized \\(int8\\) and cannot be quantized again"):
        load_model(stored_int8, quantization="int4")
    model, _ = load_model(stored_int8, quantization="int8")  # the same method is what it is already
    assert model.quantization["method"] == "int8"


@pytest.mark.parametrize("quantization, group_size, message", [
    ("int3", 32, "quantization method must be one of int8, int4"),
    ("int4", 48, "int4 group size must be one of 32, 64, 128"),
])
def test_bad_options_are_refused(stored_int8, quantization, group_size, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(stored_int8, quantization=quantization, group_size=group_size)


def test_foreign_quantization_configs_are_refused(stored_int8, tmp_path):
    config = json.loads((stored_int8 / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    target = tmp_path / "gptq"
    target.mkdir()
    (target / "config.json").write_text(json.dumps(config))
    (target / "model.safetensors").write_bytes((stored_int8 / "model.safetensors").read_bytes())
    with pytest.raises(ModelLoadError, match="quantized with 'gptq', which llmasos cannot load"):
        load_model(target)


def test_mismatched_quantized_tensor_is_named(stored_int8, tmp_path):
    tensors = load_file(stored_int8 / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.scales"
    tensors[name] = tensors[name][:-1].clone()
    target = tmp_path / "broken"
    target.mkdir()
    (target / "config.json").write_text((stored_int8 / "config.json").read_text())
    save_file(tensors, target / "model.safetensors")
    with pytest.raises(ModelLoadError, match=f"tensor '{name}' in model.safetensors is torch.bfloat16 \\[127\\]"):
        load_model(target)


# -- quality on the bundled model -----------------------------------------------------------------------------------

WINDOW, NUM_TOKENS = 256, 4096


@torch.no_grad()
def perplexity(model, token_ids: list[int]) -> float:
    """exp(mean next-token NLL) over consecutive 256-token windows (each scored from its own start)."""
    windows = torch.tensor(token_ids[:len(token_ids) // WINDOW * WINDOW]).view(-1, WINDOW)
    nll, count = 0.0, 0
    for batch in windows.split(8):
        lengths = [WINDOW] * batch.shape[0]
        positions = torch.arange(WINDOW).repeat(batch.shape[0])
        logits = model.compute_logits(model(batch.reshape(-1), positions, AttentionMetadata.for_prompts(lengths)))
        logprobs = torch.log_softmax(logits.view(batch.shape[0], WINDOW, -1)[:, :-1], dim=-1)
        nll -= logprobs.gather(-1, batch[:, 1:, None]).sum().item()
        count += batch.shape[0] * (WINDOW - 1)
    return math.exp(nll / count)


@pytest.fixture(scope="module")
def held_out_tokens() -> list[int]:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"held-out text not found at {SHAKESPEARE} (the Tiny Shakespeare file the bundled model was "
                    "trained on; its last 10% is held out)")
    from llmasos.tokenizer import Tokenizer

    text = SHAKESPEARE.read_text(encoding="utf-8")
    held_out = text[int(len(text) * 0.9):]
    return Tokenizer.from_dir(BUNDLED).encode(held_out, add_special_tokens=False)[:NUM_TOKENS]


@pytest.mark.parametrize("method, group_size, bound", [("int8", 32, 0.01), ("int4", 32, 0.05), ("w8a8", 32, 0.01)])
def test_bundled_model_perplexity_stays_close_to_bf16(held_out_tokens, method, group_size, bound):
    """The bundled 4.2M-parameter model's intermediate size (688) is not a multiple of 32: its down projections run
    with in_features zero-padded to 704 for int4 g32. w8a8 quantizes activations too (per call, per tensor)."""
    baseline = perplexity(load_model(BUNDLED, dtype="bfloat16")[0], held_out_tokens)
    quantized, _ = load_model(BUNDLED, dtype="bfloat16", quantization=method, group_size=group_size)
    down = quantized.model.layers[0].mlp.down_proj
    assert down.kernel_in_features == (704 if method == "int4" else 688)
    assert (down.dynamic is not None) == (method == "w8a8" and dynamic_int8_supported())
    value = perplexity(quantized, held_out_tokens)
    assert abs(value / baseline - 1) < bound, (method, value, baseline)
