"""One template from training to serving: fine-tuning on one conversation makes `LLM.chat` answer it word for word."""

from __future__ import annotations

import json

import pytest

from llmasos import LLM, LLMTrainer, SamplingParams, TrainingArguments

SYSTEM = {"role": "system", "content": "You are the LLMasOS assistant."}
QUESTION = {"role": "user", "content": "What does the scheduler do?"}
ANSWER = "It picks which requests run in each step, like an operating system picks processes."


@pytest.mark.slow
def test_chat_sft_on_one_conversation_is_answered_word_for_word(tiny_llama, tmp_path):
    model = LLMTrainer.from_pretrained(tiny_llama)
    conversation = [SYSTEM, QUESTION, {"role": "assistant", "content": ANSWER}]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=60, per_device_train_batch_size=2,
                             learning_rate=1e-2, lr_scheduler_type="constant", save_steps=None, progress_bar=False,
                             logging_steps=20)
    result = model.train([{"messages": conversation}], args=args)
    assert result.train_loss < 0.05
    out = model.save_pretrained(tmp_path / "chat_model")

    # The chat template's end-of-turn token stops generation, as training taught the model to emit it.
    generation = json.loads((out / "generation_config.json").read_text())
    im_end = model.tokenizer.token_to_id("<|im_end|>")
    assert im_end in generation["eos_token_id"]

    llm = LLM.load(out)
    reply = llm.chat([SYSTEM, QUESTION], SamplingParams(temperature=0, max_tokens=60))[0]
    assert reply.text == ANSWER
    assert reply.finish_reason == "stop"
