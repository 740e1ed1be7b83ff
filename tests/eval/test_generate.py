"""Generation evaluations: prompts from templates, few-shot examples and chat; outputs scored by the real metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import sacrebleu
from support import family_config, make_checkpoint

from llmasos import LLM, SamplingParams
from llmasos.errors import EvalDataError
from llmasos.eval import GenerationParams, PromptFormat, exact_match, f1, generate_and_score
from llmasos.eval.data import read_jsonl
from llmasos.eval.generate import fill_template

EVALS = Path(__file__).resolve().parents[2] / "evals"
QA = [{"question": "What do bees make?", "reference": "honey", "_line": 1},
      {"question": "How many legs has a cat?", "reference": ["four", "4"], "_line": 2},
      {"question": "Capital of Italy?", "reference": "Rome", "_line": 3}]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    make_checkpoint(directory, family_config("llama"))
    return LLM.load(directory, dtype="float32")


def test_template_and_few_shot_build_the_prompt():
    prompt_format = PromptFormat(template="Q: {question}\nA:", few_shot=QA[:2])
    assert prompt_format.build(QA[2]) == "Q: What do bees make?\nA: honey\n\nQ: How many legs has a cat?\nA: four\n\n" \
                                         "Q: Capital of Italy?\nA:"
    assert fill_template("{{literal}} {question}", QA[0]) == "{literal} What do bees make?"
    with pytest.raises(EvalDataError, match="qa.jsonl, line 3: the template needs field 'answer'"):
        PromptFormat(template="{answer}").build(QA[2], "qa.jsonl, line 3")


def test_chat_prompts_put_few_shot_examples_in_turns():
    prompt_format = PromptFormat(template="Q: {question}", few_shot=QA[:1], chat=True, system="Be brief.")
    assert prompt_format.build(QA[2]) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q: What do bees make?"},
        {"role": "assistant", "content": "honey"},
        {"role": "user", "content": "Q: Capital of Italy?"},
    ]
    example = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], "reference": "r"}
    assert PromptFormat(few_shot=[{"prompt": "P", "reference": "R"}]).build(example) == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "P"}, {"role": "assistant", "content": "R"},
        {"role": "user", "content": "U"}]


def test_generation_scores_the_model_outputs(llm):
    params = GenerationParams(max_tokens=8, stop=["\n"])
    prompt_format = PromptFormat(template="Q: {question}\nA:", few_shot=QA[:1])
    result = generate_and_score(llm, QA[1:], ["exact_match", "f1", "bleu"], prompt_format=prompt_format,
                                params=params)
    prompts = ["Q: What do bees make?\nA: honey\n\nQ: How many legs has a cat?\nA:",
               "Q: What do bees make?\nA: honey\n\nQ: Capital of Italy?\nA:"]
    expected = [out.text.strip() for out in llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0,
                                                                                 stop=["\n"]))]
    assert result.prompts == prompts
    assert result.predictions == expected
    references = [["four", "4"], ["Rome"]]
    assert result.metrics == {"exact_match": exact_match(expected, references), "f1": f1(expected, references),
                              "bleu": sacrebleu.corpus_bleu(expected, [["four", "Rome"], ["4", None]]).score}


def test_chat_examples_use_the_chat_template(llm):
    examples = read_jsonl(EVALS / "tiny_summaries.jsonl")[:2]
    result = generate_and_score(llm, examples, "rouge", params=GenerationParams(max_tokens=6))
    expected = [out.text.strip() for out in llm.chat([ex["messages"] for ex in examples],
                                                     SamplingParams(max_tokens=6, temperature=0))]
    assert result.predictions == expected
    assert set(result.metrics) == {"rouge1", "rouge2", "rougeL"}


def test_bad_examples_and_metrics_are_clear_errors(llm):
    with pytest.raises(ValueError, match="unknown metric 'meteor'"):
        generate_and_score(llm, QA, "meteor")
    with pytest.raises(EvalDataError, match='qa.jsonl, line 4: expected "reference"'):
        generate_and_score(llm, [{"prompt": "x", "_line": 4}], "f1", source="qa.jsonl")
    with pytest.raises(EvalDataError, match='line 2: expected a string field "prompt"'):
        generate_and_score(llm, [{"question": "x", "reference": "y", "_line": 2}], "f1")
    with pytest.raises(EvalDataError, match='"messages" must be a non-empty list'):
        generate_and_score(llm, [{"messages": [{"role": "user"}], "reference": "y"}], "f1")


def test_chat_prompts_for_a_model_without_a_chat_template_say_what_to_do(tmp_path):
    """Was the generic "... or pass `chat_template=` explicitly", which no eval command takes."""
    from click.testing import CliRunner

    from llmasos.cli.main import cli

    make_checkpoint(tmp_path / "plain", family_config("llama", num_hidden_layers=1), chat_template=None)
    data = tmp_path / "qa.jsonl"
    data.write_text('{"prompt": "Q: bees make?", "reference": "honey"}\n')
    result = CliRunner().invoke(cli, ["eval", "generate", "-m", str(tmp_path / "plain"), "--data", str(data),
                                      "--metric", "f1", "--chat", "--max-tokens", "2"])
    assert result.exit_code == 1 and result.stderr.strip().startswith("error: plain has no chat template, so chat")
    assert "drop --chat" in result.stderr and "chat_template=" not in result.stderr
