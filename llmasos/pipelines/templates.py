"""Task prompt templates: how translation, summarization and question answering are asked of a model.

Chat models get `chat` as the user message (through their chat template), base models the `plain` completion prompt
(cut at `stop`), encoder-decoder models the T5-style `seq2seq` input (or the prefix in their config's
task_specific_params). Every template is a str.format string; `prompt_template=` replaces it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskTemplate:
    chat: str
    plain: str
    seq2seq: str
    stop: tuple[str, ...] = ()


TEMPLATES: dict[str, TaskTemplate] = {
    "translation": TaskTemplate(
        chat="Translate the following text from {src_lang} to {tgt_lang}. Reply with the translation only.\n\n{text}",
        plain="{src_lang}: {text}\n{tgt_lang}:",
        seq2seq="translate {src_lang} to {tgt_lang}: {text}",
        stop=("\n",),
    ),
    "summarization": TaskTemplate(
        chat="Summarize the following text in a few sentences. Reply with the summary only.\n\n{text}",
        plain="{text}\n\nTL;DR:",
        seq2seq="summarize: {text}",
        stop=("\n\n",),
    ),
    "question-answering": TaskTemplate(
        chat=("Answer the question using the context. Reply with the shortest span of the context that answers it, "
              "and nothing else.\n\nContext: {context}\n\nQuestion: {question}"),
        plain="Context: {context}\nQuestion: {question}\nAnswer:",
        seq2seq="question: {question} context: {context}",
        stop=("\n",),
    ),
}

# ISO 639-1 codes (and the prefixes of codes like en_XX or eng_Latn) -> the names prompts use.
LANGUAGE_NAMES = {
    "ar": "Arabic", "bg": "Bulgarian", "cs": "Czech", "da": "Danish", "de": "German", "el": "Greek", "en": "English",
    "es": "Spanish", "et": "Estonian", "fi": "Finnish", "fr": "French", "he": "Hebrew", "hi": "Hindi",
    "hu": "Hungarian", "id": "Indonesian", "it": "Italian", "ja": "Japanese", "ko": "Korean", "lt": "Lithuanian",
    "lv": "Latvian", "nl": "Dutch", "no": "Norwegian", "pl": "Polish", "pt": "Portuguese", "ro": "Romanian",
    "ru": "Russian", "sk": "Slovak", "sl": "Slovenian", "sv": "Swedish", "th": "Thai", "tr": "Turkish",
    "uk": "Ukrainian", "vi": "Vietnamese", "zh": "Chinese",
}
_THREE_LETTER = {"eng": "en", "fra": "fr", "deu": "de", "spa": "es", "ita": "it", "por": "pt", "ron": "ro",
                 "rus": "ru", "zho": "zh", "jpn": "ja", "kor": "ko", "nld": "nl", "pol": "pl", "tur": "tr"}


def language_code(language: str) -> str | None:
    """'en', 'en_XX', 'eng_Latn' or 'English' -> 'en'; None when unknown."""
    text = language.strip()
    head = text.replace("-", "_").split("_")[0].lower()
    head = _THREE_LETTER.get(head, head)
    if head in LANGUAGE_NAMES:
        return head
    names = {name.lower(): code for code, name in LANGUAGE_NAMES.items()}
    return names.get(text.lower())


def language_name(language: str) -> str:
    """The English name of a language given by code or name; unknown values are used as written."""
    code = language_code(language)
    return LANGUAGE_NAMES[code] if code else language.strip()


def escape_braces(text: str) -> str:
    """Literal text (a model's task prefix) made safe to put in a format template."""
    return text.replace("{", "{{").replace("}", "}}")
