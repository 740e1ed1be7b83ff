"""One Modelfile model (ADAPTER, SYSTEM, TEMPLATE, PARAMETERs), resolved once into a ModelSpec, is the same model
through every entry point: pipelines, the trainer, `llmasos run`, evaluation, and Seq2SeqLM for a T5."""

from __future__ import annotations

import pytest
import torch
from encoders_support import make_sentence_transformer, make_t5_checkpoint

from library.test_modelfile import _peft_adapter
from llmasos import LLM, SamplingParams, pipeline
from llmasos.errors import ModelLoadError
from llmasos.spec import resolve_spec

TEMPLATE = ('{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}'
            '{% if add_generation_prompt %}[assistant] {% endif %}')
CONVERSATION = [{"role": "user", "content": "hello there"}]
RENDERED = "[system] You are a pirate.\n[user] hello there\n[assistant] "


@pytest.fixture
def pirate(cli, workdir, checkpoint):
    """(name, PEFT reference model): a derived model of the tiny qwen2 with every Modelfile instruction that shapes
    what the model computes or how it samples."""
    assert cli("import", str(checkpoint), "--name", "tiny").exit_code == 0
    reference = _peft_adapter(checkpoint, workdir / "lora")
    modelfile = workdir / "Modelfile"
    modelfile.write_text(f'FROM tiny\nADAPTER lora\nSYSTEM You are a pirate.\nPARAMETER temperature 0\n'
                         f'PARAMETER num_predict 5\nTEMPLATE """{TEMPLATE}"""\n')
    result = cli("create", "pirate", "-f", str(modelfile))
    assert result.exit_code == 0, result.output
    return "pirate", reference


def reference_logprobs(reference, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logprobs = torch.log_softmax(reference(torch.tensor([ids])).logits[0].float(), dim=-1)
    return logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def test_the_spec_carries_every_modelfile_value(pirate):
    spec = resolve_spec(pirate[0])
    assert spec.kind == "decoder" and len(spec.adapters) == 1 and spec.system == "You are a pirate."
    assert spec.template == TEMPLATE
    assert spec.sampling_params().temperature == 0 and spec.sampling_params().max_tokens == 5


@pytest.mark.parametrize("task", ["chat", "text-generation"])
def test_pipelines_see_the_spec(pirate, task):
    from llmasos.pipelines.base import sampling_params, spec_of
    from llmasos.pipelines.text_generation import chat_prompt_ids

    name, reference = pirate
    pipe = pipeline(task, model=name, dtype="float32")
    assert spec_of(pipe.model) == resolve_spec(name, dtype="float32")
    ids = chat_prompt_ids(pipe.model, CONVERSATION)
    # The Modelfile's TEMPLATE, with its SYSTEM prompt.
    assert ids == pipe.tokenizer.encode(RENDERED, add_special_tokens=False)
    assert torch.allclose(torch.tensor(pipe.model.prompt_logprobs(ids)[1:]), reference_logprobs(reference, ids),
                          atol=1e-4)  # the ADAPTER merged
    params = sampling_params(pipe.model, {"do_sample": True})  # sampling asked for, but the model's temperature is 0
    assert params.temperature == 0 and params.max_tokens == 5
    answer = pipe(CONVERSATION, do_sample=True)
    message = answer if task == "chat" else answer[0]["generated_text"][-1]
    greedy = pipe.model.generate([ids], SamplingParams(max_tokens=5, temperature=0))[0].outputs[0].text
    assert message == {"role": "assistant", "content": greedy}


def test_the_trainer_sees_the_spec(pirate):
    from llmasos.train.trainer import LLMTrainer

    name, reference = pirate
    trainer = LLMTrainer.from_pretrained(name)
    assert trainer.spec == resolve_spec(name) and trainer.source == name
    assert trainer.tokenizer.chat_template == TEMPLATE
    assert next(trainer.model.parameters()).dtype == torch.float32  # float32 master weights by default
    served, base = LLM.load(resolve_spec(name, dtype="float32")), LLM.load(resolve_spec("tiny", dtype="float32"))
    trained_weights, base_weights = dict(trainer.model.named_parameters()), dict(base.model.named_parameters())
    changed = [key for key, value in served.model.named_parameters()
               if torch.equal(value, trained_weights[key]) and not torch.equal(value, base_weights[key])]
    assert changed and all(".q_proj." in key or ".v_proj." in key for key in changed)  # the adapter's layers
    ids = trainer.tokenizer.encode(RENDERED, add_special_tokens=False)
    assert torch.allclose(torch.tensor(served.prompt_logprobs(ids)[1:]), reference_logprobs(reference, ids),
                          atol=1e-4)
    assert LLMTrainer.from_pretrained(name, dtype="bfloat16").spec.dtype == "bfloat16"


def test_run_and_eval_see_the_spec(cli, pirate):
    from llmasos.eval.backends import GenerationParams, InProcessBackend

    name, _ = pirate
    llm = LLM.load(resolve_spec(name, dtype="float32"))
    expected = llm.chat(CONVERSATION, SamplingParams(max_tokens=5, temperature=0))[0].text
    rendered = llm.tokenizer.encode(RENDERED, add_special_tokens=False)  # LLM.chat applies SYSTEM and TEMPLATE
    assert llm.generate(rendered, SamplingParams(max_tokens=5, temperature=0))[0].text == expected
    # No --temperature and no --max-tokens: the Modelfile's temperature 0 and num_predict 5.
    result = cli("run", name, "hello there", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    assert result.output == expected + "\n"
    backend = InProcessBackend.load(name, dtype="float32")
    assert backend.model_name == name
    assert backend.generate([CONVERSATION], GenerationParams(max_tokens=5)) == [expected]


def test_seq2seq_sampling_defaults_come_from_the_spec(cli, workdir):
    from llmasos.pipelines import Seq2SeqLM
    from llmasos.pipelines.base import sampling_params

    make_t5_checkpoint(workdir / "t5")
    (workdir / "t5" / "generation_config.json").write_text('{"top_k": 0, "repetition_penalty": 1.3}')
    assert cli("import", str(workdir / "t5"), "--name", "t5-tiny").exit_code == 0
    modelfile = workdir / "Modelfile"
    modelfile.write_text("FROM t5-tiny\nPARAMETER temperature 0\nPARAMETER num_predict 4\n")
    assert cli("create", "t5-greedy", "-f", str(modelfile)).exit_code == 0
    spec = resolve_spec("t5-greedy")
    assert spec.kind == "seq2seq"
    t5 = Seq2SeqLM.load("t5-greedy")
    assert t5.spec == spec
    default = t5.default_sampling()
    assert (default.temperature, default.max_tokens, default.top_k, default.repetition_penalty) == (0, 4, -1, 1.3)
    greedy = SamplingParams(temperature=0, max_tokens=4, repetition_penalty=1.3)
    assert t5.generate("a house")[0].outputs[0].token_ids == t5.generate("a house", greedy)[0].outputs[0].token_ids
    params = sampling_params(pipeline("text2text-generation", model="t5-greedy").model, {"do_sample": True})
    assert (params.temperature, params.max_tokens, params.repetition_penalty) == (0, 4, 1.3)
    with pytest.raises(ModelLoadError, match="encoder-decoder model, which cannot take a LoRA adapter"):
        Seq2SeqLM.load(spec.replace(adapters=(str(workdir / "lora"),)))
    with pytest.raises(ModelLoadError, match="t5-greedy is a seq2seq model; evaluations run decoder-only models"):
        from llmasos.eval.backends import InProcessBackend

        InProcessBackend.load("t5-greedy")


def test_kind_comes_from_the_spec(cli, workdir, checkpoint):
    from llmasos.embeddings import Embedder
    from llmasos.train.trainer import LLMTrainer

    make_sentence_transformer(workdir / "encoder")
    assert cli("import", str(workdir / "encoder"), "--name", "encoder").exit_code == 0
    spec = resolve_spec("encoder")
    assert spec.kind == "encoder"
    embed = pipeline("embeddings", model=spec)
    assert isinstance(embed.model, Embedder) and embed.model.spec == spec
    assert next(embed.model.model.parameters()).dtype == torch.float32  # "auto" is float32 for embeddings
    trainer = LLMTrainer.from_pretrained("encoder")  # an encoder trains with objective mlm or classification (#18)
    with pytest.raises(ValueError, match="(?i)mlm|classification|encoder"):
        trainer.train([{"text": "hello there"}] * 4)
    result = cli("run", "encoder", "hi")
    assert result.exit_code == 1 and "encoder is an embedding model" in result.stderr
