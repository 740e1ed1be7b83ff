"""The "text-generation" and "chat" pipelines, with transformers' inputs and outputs, generating through the engine.

text-generation: a prompt (or a conversation) in, `[{"generated_text": ...}]` out, the prompt included unless
return_full_text=False. chat: a conversation in, the assistant's message out."""

from __future__ import annotations

from typing import Any

from llmasos.pipelines.base import DECODER, SEQ2SEQ, Pipeline, sampling_params, spec_of, split_options


def is_conversation(value: Any) -> bool:
    """A list of {"role": ..., "content": ...} messages."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def chat_prompt_ids(llm: Any, messages: list[dict[str, Any]], chat_template: str | None = None,
                    system_prompt: str | None = None, **template_kwargs: Any) -> list[int]:
    """The conversation rendered by the model's chat template (with its spec's system prompt), ready to answer."""
    from llmasos.library import with_system_prompt

    messages = with_system_prompt(messages, system_prompt or spec_of(llm).system)
    return llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             chat_template=chat_template, **template_kwargs)


class TextGenerationPipeline(Pipeline):
    """`gen("Once upon a time", max_new_tokens=20)` -> `[{"generated_text": "Once upon a time..."}]`.

    A list of prompts gives a list of such lists. A conversation (list of messages) is rendered with the chat
    template and, with return_full_text, answered by the conversation plus the new assistant message. For
    encoder-decoder models the generated text never includes the input (transformers' text2text-generation)."""

    task = "text-generation"
    task_options = frozenset({"return_full_text", "return_tensors", "chat_template",
                              "chat_template_kwargs"})

    def __call__(self, inputs: str | list, **options: Any) -> list:
        generation, task = split_options(self.merged(options))
        return_full_text = task.get("return_full_text", self.task != "text2text-generation")
        single = isinstance(inputs, str) or is_conversation(inputs)
        if not single and not isinstance(inputs, (list, tuple)):  # None, a number: not "object is not iterable"
            raise ValueError(f"{self.task} takes a string, a conversation or a list of them, not "
                             f"{type(inputs).__name__}")
        items = [inputs] if single else list(inputs)
        prompts, params = [], []
        for item in items:
            if is_conversation(item):
                if self.kind != DECODER:
                    raise ValueError("conversations need a decoder-only chat model; this is an encoder-decoder model")
                ids = chat_prompt_ids(self.model, item, task.get("chat_template"),
                                      **(task.get("chat_template_kwargs") or {}))
            elif isinstance(item, str):
                ids = self.tokenizer.encode(item)
            else:
                raise ValueError(f"{self.task} takes a string, a conversation or a list of them, not "
                                 f"{type(item).__name__}")
            prompts.append(ids)
            params.append(sampling_params(self.model, generation, len(ids)))
        outputs = self.model.generate(prompts, params) if items else []
        results = []
        for item, ids, output in zip(items, prompts, outputs, strict=True):
            entries = []
            for completion in output.outputs:
                if task.get("return_tensors"):
                    full = return_full_text and self.kind == DECODER
                    entries.append({"generated_token_ids": (ids if full else []) + completion.token_ids})
                elif is_conversation(item):
                    entries.append({"generated_text": [*item, {"role": "assistant", "content": completion.text}]
                                    if return_full_text else completion.text})
                elif return_full_text and self.kind == DECODER:
                    entries.append({"generated_text": item + completion.text})
                else:
                    entries.append({"generated_text": completion.text})
            results.append(entries)
        return results[0] if single else results


class Text2TextGenerationPipeline(TextGenerationPipeline):
    """transformers' text2text-generation: the generated text alone, for any generating model."""

    task = "text2text-generation"
    kinds = (SEQ2SEQ, DECODER)

    def __call__(self, inputs: str | list, **options: Any) -> list:
        """As transformers' (and our summarization and translation): a list of strings with one sequence each gives
        a flat list, one dict per input; the text-generation shape (a list per input) otherwise."""
        results = super().__call__(inputs, **options)
        flat = isinstance(inputs, list) and all(isinstance(item, str) for item in inputs)
        if flat and all(len(entries) == 1 for entries in results):
            return [entries[0] for entries in results]
        return results


class ChatPipeline(Pipeline):
    """`chat([{"role": "user", "content": "Hi"}])` -> `{"role": "assistant", "content": "..."}`.

    A list of conversations gives a list of messages; num_return_sequences > 1 gives a list of messages per
    conversation. The model's chat template renders the conversation (`chat_template=` replaces it)."""

    task = "chat"
    kinds = (DECODER,)
    task_options = frozenset({"chat_template", "chat_template_kwargs", "system_prompt", "tools", "tool_choice",
                              "parallel_tool_calls"})

    def __call__(self, conversations: list, **options: Any) -> dict | list:
        """With `tools` (OpenAI's shape) and `tool_choice`, an answer that calls tools comes back as
        {"role": "assistant", "content": ..., "tool_calls": [...]}."""
        from llmasos.tool_calls import parse_output, plan_tools, prepare_messages

        generation, task = split_options(self.merged(options))
        single = is_conversation(conversations)
        items = [conversations] if single else list(conversations)
        for item in items:
            if not is_conversation(item):
                raise ValueError("chat takes a conversation (a list of {'role': ..., 'content': ...} messages) or a "
                                 "list of conversations")
        template = task.get("chat_template")
        plan = plan_tools(self.tokenizer, template, task.get("tools"), task.get("tool_choice"),
                          task.get("parallel_tool_calls", True))
        if plan.constraint is not None:
            if generation.get("structured_outputs") is not None:
                raise ValueError("structured_outputs cannot be combined with tool_choice required or a named function")
            generation["structured_outputs"] = plan.constraint
        prompts = []
        for item in items:
            messages, template_tools = prepare_messages(self.tokenizer, template, item, plan)
            kwargs = {**(task.get("chat_template_kwargs") or {}),
                      **({"tools": template_tools} if template_tools is not None else {})}
            prompts.append(chat_prompt_ids(self.model, messages, template, task.get("system_prompt"), **kwargs))
        params = [sampling_params(self.model, generation, len(ids)) for ids in prompts]
        outputs = self.model.generate(prompts, params) if items else []
        results: list = []
        for output in outputs:
            messages = []
            for completion in output.outputs:
                content, calls = parse_output(plan, completion.text)
                messages.append({"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})})
            results.append(messages[0] if len(messages) == 1 else messages)
        return results[0] if single else results
