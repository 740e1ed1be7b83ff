"""Reading evaluation data: JSONL examples and perplexity texts, with errors that name the file, line and fix."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from llmasos.errors import EvalDataError


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_text(path: str | Path) -> str:
    path = Path(path).expanduser()
    if not path.is_file():
        raise EvalDataError(f"data file {path} does not exist; check the --data path")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise EvalDataError(f"{path} is not UTF-8 text ({exc}); save it as UTF-8") from None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """One JSON object per non-blank line; a malformed line is an error naming its number."""
    examples = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalDataError(f"{path}, line {number}: not valid JSON ({exc.msg} at column {exc.colno}); "
                                "each line must be one JSON object") from None
        if not isinstance(value, dict):
            raise EvalDataError(f"{path}, line {number}: expected a JSON object, got {type(value).__name__}")
        value["_line"] = number
        examples.append(value)
    if not examples:
        raise EvalDataError(f"{path} holds no examples; write one JSON object per line")
    return examples


def where(path: str | Path, example: dict[str, Any]) -> str:
    """'FILE, line N' for error messages about one example."""
    return f"{path}, line {example.get('_line', '?')}"


def read_texts(path: str | Path) -> list[str]:
    """Texts to score for perplexity: a .jsonl file with {"text": ...} per line, else the whole file as one text."""
    if Path(path).suffix.lower() not in (".jsonl", ".ndjson"):
        text = _read_text(path)
        if not text:
            raise EvalDataError(f"{path} is empty; there is nothing to score")
        return [text]
    texts = []
    for example in read_jsonl(path):
        text = example.get("text")
        if not isinstance(text, str) or not text:
            raise EvalDataError(f'{where(path, example)}: expected a non-empty string field "text"')
        texts.append(text)
    return texts


def check_multiple_choice(path: str | Path, examples: list[dict[str, Any]]) -> None:
    """Each line needs {"prompt": str, "choices": [str, ...] (two or more), "answer": index}."""
    for example in examples:
        place = where(path, example)
        if not isinstance(example.get("prompt"), str):
            raise EvalDataError(f'{place}: expected a string field "prompt"')
        choices = example.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise EvalDataError(f'{place}: "choices" must be a list of two or more non-empty strings')
        answer = example.get("answer")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise EvalDataError(f'{place}: "answer" must be the index of the right choice, 0 to {len(choices) - 1}, '
                                f"got {answer!r}")


def check_generation(path: str | Path, examples: list[dict[str, Any]], template: str | None) -> None:
    """Each line needs "reference" (a string or a list of them) and "prompt", "messages" or a template's fields."""
    for example in examples:
        place = where(path, example)
        reference = example.get("reference")
        if not (isinstance(reference, str) or (isinstance(reference, list) and reference
                                                and all(isinstance(r, str) for r in reference))):
            raise EvalDataError(f'{place}: expected "reference", a string or a non-empty list of strings')
        if "messages" in example:
            messages = example["messages"]
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise EvalDataError(f'{place}: "messages" must be a non-empty list of {{"role", "content"}} objects')
        elif template is None and not isinstance(example.get("prompt"), str):
            raise EvalDataError(f'{place}: expected a string field "prompt" (or "messages", or pass a template)')
