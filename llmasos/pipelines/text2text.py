"""The "translation" and "summarization" pipelines, and the prompted-task machinery question answering shares.

Encoder-decoder models get their T5-style task input; decoder-only models get a task prompt, through their chat
template when they have one. Outputs are transformers': `[{"translation_text": ...}]`, `[{"summary_text": ...}]`."""

from __future__ import annotations

from typing import Any

from llmasos.outputs import RequestOutput
from llmasos.pipelines.base import SEQ2SEQ, Pipeline, render_template, sampling_params, split_options
from llmasos.pipelines.beam_search import BeamSettings
from llmasos.pipelines.templates import TEMPLATES, escape_braces, language_code, language_name
from llmasos.pipelines.text_generation import chat_prompt_ids

BEAM_OPTIONS = ("num_beams", "length_penalty", "early_stopping")  # transformers' names; seq2seq models only


class PromptedTaskPipeline(Pipeline):
    """A task asked through a prompt template (see templates.py); `prompt_template=` overrides the template,
    `use_chat_template=False` sends a chat model the plain completion prompt, `system_prompt=` adds a system message."""

    template_name = ""
    default_max_new_tokens = 256
    task_options = frozenset({"prompt_template", "use_chat_template", "system_prompt", *BEAM_OPTIONS})

    def seq2seq_template(self, fields: dict[str, str]) -> tuple[str, dict[str, Any]]:
        """The encoder-decoder input template, and generation defaults from the model's task_specific_params."""
        return TEMPLATES[self.template_name].seq2seq, {}

    def uses_chat(self, task: dict[str, Any]) -> bool:
        wanted = task.get("use_chat_template")
        has_template = self.tokenizer.chat_template is not None
        if wanted and not has_template:
            raise ValueError("use_chat_template=True, but this model has no chat template")
        return has_template if wanted is None else bool(wanted)

    def generate(self, field_sets: list[dict[str, str]], options: dict[str, Any],
                 logprobs: int | None = None) -> list[RequestOutput]:
        """Render each field set into a prompt and generate (greedy unless do_sample=True)."""
        generation, task = split_options(options)
        template = TEMPLATES[self.template_name]
        prompts, params = [], []
        beam_options: dict[str, Any] = {}
        for fields in field_sets:
            stop: list[str] | None = None
            defaults: dict[str, Any] = {}
            if self.kind == SEQ2SEQ:
                text_template, defaults = self.seq2seq_template(fields)
                beam_options = {key: defaults.pop(key) for key in BEAM_OPTIONS if key in defaults}
                ids = self.tokenizer.encode(render_template(task.get("prompt_template") or text_template, **fields))
            elif self.uses_chat(task):
                user = render_template(task.get("prompt_template") or template.chat, **fields)
                ids = chat_prompt_ids(self.model, [{"role": "user", "content": user}],
                                      system_prompt=task.get("system_prompt"))
            else:
                ids = self.tokenizer.encode(render_template(task.get("prompt_template") or template.plain, **fields))
                stop = list(template.stop)
            prompts.append(ids)
            params.append(sampling_params(self.model, {**defaults, **generation}, len(ids),
                                          self.default_max_new_tokens, stop=stop, logprobs=logprobs))
        beam_options.update({key: task[key] for key in BEAM_OPTIONS if task.get(key) is not None})
        beams = BeamSettings(**beam_options) if beam_options else None
        if beams is not None and beams.num_beams > 1:
            if self.kind != SEQ2SEQ:
                raise ValueError("beam search is implemented for encoder-decoder (T5) models; decoder-only models "
                                 "decode greedily or by sampling")
            return self.model.generate(prompts, params, beams=beams) if prompts else []
        return self.model.generate(prompts, params) if prompts else []

    def texts_in(self, inputs: str | list[str], name: str) -> tuple[list[str], bool]:
        single = isinstance(inputs, str)
        texts = [inputs] if single else list(inputs)
        if not all(isinstance(text, str) for text in texts):
            raise ValueError(f"{self.task} takes a string or a list of strings as {name}")
        return texts, single

    def shaped(self, outputs: list[RequestOutput], key: str, single: bool) -> list:
        """transformers' shapes: one input -> a list of n dicts; several -> a flat list (n = 1) or a list of lists."""
        per_input = [[{key: completion.text.strip()} for completion in output.outputs] for output in outputs]
        if single:
            return per_input[0]
        return [entries[0] for entries in per_input] if all(len(e) == 1 for e in per_input) else per_input


def _task_params(backend: Any, key: str) -> dict[str, Any]:
    params = getattr(backend, "task_specific_params", {}).get(key)
    return params if isinstance(params, dict) else {}


def _defaults_from(task_params: dict[str, Any]) -> dict[str, Any]:
    """Generation defaults a T5 config's task_specific_params set, beam search included (n-gram blocking is not
    done)."""
    defaults: dict[str, Any] = {}
    for key in BEAM_OPTIONS:
        if task_params.get(key) is not None:
            defaults[key] = task_params[key]
    if isinstance(task_params.get("max_length"), int):
        defaults["max_new_tokens"] = task_params["max_length"]
    if isinstance(task_params.get("min_length"), int):
        defaults["min_new_tokens"] = task_params["min_length"]
    return defaults


class TranslationPipeline(PromptedTaskPipeline):
    """`translate("Hello", src_lang="en", tgt_lang="fr")` -> `[{"translation_text": "Bonjour"}]`.

    Languages are codes (en, fr, en_XX, eng_Latn) or English names; the task name "translation_en_to_fr" sets
    both. Without languages, a seq2seq model gets the text as it is (an instructed input such as T5's
    "translate English to French: ...")."""

    task = "translation"
    template_name = "translation"
    task_options = PromptedTaskPipeline.task_options | {"src_lang", "tgt_lang"}

    def seq2seq_template(self, fields: dict[str, str]) -> tuple[str, dict[str, Any]]:
        task_params = _task_params(self.model, f"translation_{fields['src_code']}_to_{fields['tgt_code']}")
        if isinstance(task_params.get("prefix"), str):
            return escape_braces(task_params["prefix"]) + "{text}", _defaults_from(task_params)
        return TEMPLATES["translation"].seq2seq, {}

    def __call__(self, inputs: str | list[str], **options: Any) -> list:
        options = self.merged(options)
        texts, single = self.texts_in(inputs, "text")
        src, tgt = options.pop("src_lang", None), options.pop("tgt_lang", None)
        if not src and not tgt and self.kind == SEQ2SEQ:
            # An already instructed input ("translate English to French: ..."), given to the model as it is, as
            # transformers' translation pipeline does for T5.
            options.setdefault("prompt_template", "{text}")
            outputs = self.generate([{"text": text, "src_lang": "", "tgt_lang": "", "src_code": "", "tgt_code": ""}
                                     for text in texts], options)
            return self.shaped(outputs, "translation_text", single)
        if not src or not tgt:
            raise ValueError("translation needs src_lang and tgt_lang, e.g. pipeline('translation', model=..., "
                             "src_lang='en', tgt_lang='fr'); a T5 model also takes an instructed text without them "
                             "('translate English to French: ...')")
        languages = {"src_lang": language_name(src), "tgt_lang": language_name(tgt),
                     "src_code": language_code(src) or src, "tgt_code": language_code(tgt) or tgt}
        outputs = self.generate([{"text": text, **languages} for text in texts], options)
        return self.shaped(outputs, "translation_text", single)


class SummarizationPipeline(PromptedTaskPipeline):
    """`summarize(long_text)` -> `[{"summary_text": "..."}]`."""

    task = "summarization"
    template_name = "summarization"

    def seq2seq_template(self, fields: dict[str, str]) -> tuple[str, dict[str, Any]]:
        task_params = _task_params(self.model, "summarization")
        if isinstance(task_params.get("prefix"), str):
            return escape_braces(task_params["prefix"]) + "{text}", _defaults_from(task_params)
        return TEMPLATES["summarization"].seq2seq, {}

    def __call__(self, inputs: str | list[str], **options: Any) -> list:
        texts, single = self.texts_in(inputs, "text")
        outputs = self.generate([{"text": text} for text in texts], self.merged(options))
        return self.shaped(outputs, "summary_text", single)
