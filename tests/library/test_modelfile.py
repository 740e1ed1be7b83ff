"""Modelfile parsing and `llmasos create`: derived models share the base's files and carry their own defaults."""

from __future__ import annotations

import json
import os

import pytest

from llmasos import LLM
from llmasos.errors import LibraryError
from llmasos.library.modelfile import parse_modelfile, render_modelfile

FULL = '''# a comment
FROM tiny
SYSTEM """You are a pirate.
Answer in one line."""
PARAMETER temperature 0.2
PARAMETER top_k 5
PARAMETER num_predict 7
PARAMETER stop "<|im_end|>"
PARAMETER stop "END OF TURN"
PARAMETER repeat_penalty 1.1
TEMPLATE """{% for m in messages %}[{{ m.role }}] {{ m.content }}
{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"""
LICENSE apache-2.0
'''


def test_parse_full_modelfile():
    modelfile = parse_modelfile(FULL)
    assert modelfile.base == "tiny"
    assert modelfile.system == "You are a pirate.\nAnswer in one line."
    assert modelfile.parameters == {"temperature": 0.2, "top_k": 5, "max_tokens": 7,
                                    "stop": ["<|im_end|>", "END OF TURN"], "repetition_penalty": 1.1}
    assert modelfile.template.startswith("{% for m in messages %}") and modelfile.template.endswith("{% endif %}")
    assert modelfile.license == "apache-2.0"
    assert parse_modelfile(render_modelfile_from(modelfile)).parameters == modelfile.parameters


def render_modelfile_from(modelfile):
    from llmasos.library.registry import LibraryModel

    row = LibraryModel(name="x", base_name=modelfile.base, system=modelfile.system, parameters=modelfile.parameters,
                       chat_template=modelfile.template, license=modelfile.license)
    return render_modelfile(row)


@pytest.mark.parametrize("text, message", [
    ("SYSTEM hi\n", "no FROM line"),
    ("FROM tiny\nFROM other\n", "line 2: FROM is given twice"),
    ("FROM tiny\nMESSAGE user hi\n", "line 2: unknown instruction 'MESSAGE'"),
    ("FROM tiny\nPARAMETER warmth 3\n", "line 2: unknown PARAMETER 'warmth'"),
    ("FROM tiny\nPARAMETER temperature hot\n", "line 2: PARAMETER temperature takes a number"),
    ("FROM tiny\nPARAMETER top_k 2.5\n", "PARAMETER top_k takes an integer"),
    ("FROM tiny\nPARAMETER temperature 500\n", "temperature must be a number from 0 to 100"),
    ("FROM tiny\nPARAMETER top_p 0\n", "top_p must be in"),
    ('FROM tiny\nSYSTEM """never closed\n', 'line 2: the """ opened here is never closed'),
    ("FROM tiny\nTEMPLATE {% for %}\n", "TEMPLATE: The chat template is not valid Jinja"),
    ("FROM ./some/dir\n", "FROM takes the name of a library model"),
    ("FROM tiny\nSYSTEM a\x00b\n", "NUL"),
])
def test_modelfile_errors_name_the_line(text, message):
    with pytest.raises(LibraryError) as info:
        parse_modelfile(text)
    assert message in str(info.value)


def test_create_derived_model(cli, workdir, checkpoint):
    assert cli("import", str(checkpoint), "--name", "tiny").exit_code == 0
    modelfile = workdir / "Modelfile"
    modelfile.write_text(FULL)
    result = cli("create", "pirate", "-f", str(modelfile))
    assert result.exit_code == 0, result.output
    assert "created pirate from tiny" in result.stdout

    base, derived = (json.loads(cli("show", name, "--json").stdout) for name in ("tiny", "pirate"))
    assert derived["path"] == base["path"]  # the weights are shared, not copied
    assert derived["files"] == base["files"]
    assert derived["source"]["type"] == "derived" and derived["source"]["base"] == "tiny"
    assert derived["system"] == "You are a pirate.\nAnswer in one line."
    assert derived["sampling_parameters"]["max_tokens"] == 7
    assert derived["chat_template_overridden"] and derived["effective_chat_template"].startswith("{% for m")
    listed = {m["name"]: m for m in json.loads(cli("list", "--json").stdout)}
    assert listed["pirate"]["source"] == "from tiny"
    assert "FROM tiny" in cli("show", "pirate", "--modelfile").stdout


def test_derived_defaults_apply_in_llm(cli, workdir, checkpoint):
    assert cli("import", str(checkpoint), "--name", "tiny").exit_code == 0
    modelfile = workdir / "Modelfile"
    modelfile.write_text('FROM tiny\nSYSTEM """Be brief."""\nPARAMETER max_tokens 3\nPARAMETER temperature 0\n')
    assert cli("create", "brief", "-f", str(modelfile)).exit_code == 0

    base, derived = LLM.load("tiny"), LLM.load("brief")
    messages = [{"role": "user", "content": "hello there"}]
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    output = derived.chat(messages)[0]
    assert output.prompt_token_ids == base.tokenizer.apply_chat_template(with_system, add_generation_prompt=True)
    assert len(output.outputs[0].token_ids) <= 3
    assert derived.default_sampling().max_tokens == 3 and derived.default_sampling(max_tokens=9).max_tokens == 9
    # A conversation that brings its own system message keeps it.
    own = [{"role": "system", "content": "Mine."}, *messages]
    assert derived.chat(own)[0].prompt_token_ids == base.tokenizer.apply_chat_template(own, add_generation_prompt=True)
    assert base.chat(messages)[0].prompt_token_ids == base.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True)


def test_template_override_applies(cli, workdir, checkpoint):
    assert cli("import", str(checkpoint), "--name", "tiny").exit_code == 0
    modelfile = workdir / "Modelfile"
    modelfile.write_text(FULL)
    assert cli("create", "pirate", "-f", str(modelfile)).exit_code == 0
    llm = LLM.load("pirate")
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                             tokenize=False)
    assert text == "[user] hi\n[assistant] "


def test_derived_of_derived_and_rm_order(cli, workdir, checkpoint):
    assert cli("import", str(checkpoint), "--name", "tiny").exit_code == 0
    first, second = workdir / "A", workdir / "B"
    first.write_text("FROM tiny\nSYSTEM one\nPARAMETER temperature 0.5\n")
    second.write_text("FROM one\nPARAMETER top_k 3\n")
    assert cli("create", "one", "-f", str(first)).exit_code == 0
    assert cli("create", "two", "-f", str(second)).exit_code == 0
    two = json.loads(cli("show", "two", "--json").stdout)
    assert two["system"] == "one" and two["sampling_parameters"] == {"temperature": 0.5, "top_k": 3}

    refused = cli("rm", "tiny")
    assert refused.exit_code == 1
    assert "one is derived from it" in refused.stderr and "llmasos rm one" in refused.stderr
    refused = cli("rm", "one")
    assert refused.exit_code == 1 and "two is derived from it" in refused.stderr
    path = two["path"]
    for name in ("two", "one", "tiny"):
        assert cli("rm", name).exit_code == 0
    assert not os.path.exists(path)


def test_create_refusals(cli, workdir, checkpoint):
    modelfile = workdir / "Modelfile"
    modelfile.write_text("FROM tiny\n")
    result = cli("create", "x", "-f", str(modelfile))
    assert result.exit_code == 1 and "no model named 'tiny'" in result.stderr
    assert cli("import", str(checkpoint), "--name", "tiny").exit_code == 0
    modelfile.write_text("FROM tiny\n")
    assert cli("create", "tiny", "-f", str(modelfile)).exit_code == 1
    binary = workdir / "Binary"
    binary.write_bytes(b"\xff\xfe\x00")
    result = cli("create", "y", "-f", str(binary))
    assert result.exit_code == 1 and "not UTF-8" in result.stderr


def _peft_adapter(checkpoint, directory):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    # init_lora_weights=False: random B as well as A, so the adapter really changes the model
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(directory)
    return model.eval()


def test_adapter_is_stored_and_released(cli, home, workdir, checkpoint):
    assert cli("import", str(checkpoint), "--name", "tiny").exit_code == 0
    peft_model = _peft_adapter(checkpoint, workdir / "adapters" / "lora")
    modelfile = workdir / "Modelfile"
    modelfile.write_text("FROM tiny\nADAPTER adapters/lora\n")  # relative to the Modelfile's folder
    result = cli("create", "tuned", "-f", str(modelfile))
    assert result.exit_code == 0, result.output
    data = json.loads(cli("show", "tuned", "--json").stdout)
    adapter_dir = home / "models" / "checkpoints" / data["adapter"]
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    import torch

    ids = list(range(3, 40))
    tuned, base = LLM.load("tuned", dtype="float32"), LLM.load("tiny", dtype="float32")
    with torch.no_grad():
        expected = torch.log_softmax(peft_model(torch.tensor([ids])).logits[0].float(), dim=-1)
    expected = expected[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor(tuned.prompt_logprobs(ids)[1:]), expected, atol=1e-4)  # the adapter applied
    assert not torch.allclose(torch.tensor(base.prompt_logprobs(ids)[1:]), expected, atol=1e-3)
    assert cli("rm", "tuned").exit_code == 0
    assert not adapter_dir.exists()


def test_corrupt_adapter_refused(cli, home, workdir, checkpoint):
    assert cli("import", str(checkpoint), "--name", "tiny").exit_code == 0
    lora = workdir / "lora"
    _peft_adapter(checkpoint, lora)
    weights = lora / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    modelfile = workdir / "Modelfile"
    modelfile.write_text(f"FROM tiny\nADAPTER {lora}\n")
    before = sorted(p.name for p in (home / "models" / "checkpoints").iterdir())
    result = cli("create", "tuned", "-f", str(modelfile))
    assert result.exit_code == 1 and "truncated" in result.stderr
    assert sorted(p.name for p in (home / "models" / "checkpoints").iterdir()) == before
    modelfile.write_text(f"FROM tiny\nADAPTER {workdir / 'missing'}\n")
    assert "does not exist" in cli("create", "tuned", "-f", str(modelfile)).stderr


def test_serving_a_modelfile_model_with_an_adapter_serves_the_adapted_model(cli, home, workdir, checkpoint):
    """The bug this guards against: the server re-resolved the bare directory and served the base weights."""
    import torch

    from llmasos.server.serving import Service, free_port, load_served_model
    from llmasos.server.state import ServerSettings

    assert cli("import", str(checkpoint), "--name", "tiny").exit_code == 0
    peft_model = _peft_adapter(checkpoint, workdir / "lora")
    (workdir / "Modelfile").write_text("FROM tiny\nADAPTER lora\n")
    assert cli("create", "tuned", "-f", str(workdir / "Modelfile")).exit_code == 0
    ids = list(range(3, 40))
    with torch.no_grad():
        expected = torch.log_softmax(peft_model(torch.tensor([ids])).logits[0].float(), dim=-1)
    expected = expected[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    served = load_served_model("tuned", engine_process=True, dtype="float32", num_kv_blocks=64)
    with Service({served.id: served}, ServerSettings(port=free_port())) as service:
        import httpx

        response = httpx.post(f"{service.base_url}/v1/completions", timeout=60, json={
            "model": "tuned", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0})
    assert response.status_code == 200, response.text
    served_logprobs = response.json()["choices"][0]["logprobs"]["token_logprobs"][1:]
    assert torch.allclose(torch.tensor(served_logprobs), expected, atol=1e-4)
