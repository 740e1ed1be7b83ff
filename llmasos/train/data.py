"""Training data in: lists of strings or dicts, or .txt / .jsonl / .json files, read into validated records.

Every record remembers where it came from ("data.jsonl line 7", "train_data[3]") so that errors and skip reports can
name the exact place to fix."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmasos.errors import TrainingDataError
from llmasos.files import read_utf8

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".json")
RECORD_SHAPES = ("{'text': ...}, {'prompt': ..., 'completion': ...}, {'messages': [{'role': ..., 'content': ...}]} "
                 "or {'input_ids': [...]}")


@dataclass
class Record:
    """One training example before tokenization. kind: 'text', 'prompt' (prompt/completion), 'chat', or 'ids'
    (already tokenized: input_ids, and labels with -100 where no loss is taken)."""

    kind: str
    text: str = ""
    prompt: str = ""
    completion: str = ""
    messages: list[dict[str, Any]] | None = None
    source: str = ""
    input_ids: list[int] | None = None
    labels: list[int] | None = None


def read_records(data: Any, name: str = "train_data") -> list[Record]:
    """Records from a path (.txt: one document; .jsonl: one JSON object a line; .json: a list of objects) or from an
    in-memory list of strings and dicts. Raises TrainingDataError naming the file and line of anything malformed."""
    if isinstance(data, (str, Path)):
        return read_file(Path(data))
    if isinstance(data, Mapping):
        raise TrainingDataError(f"{name} is a dict: pass a list of examples, or a path to a .txt, .jsonl or .json file")
    if not isinstance(data, Sequence) or isinstance(data, (bytes, bytearray)):
        raise TrainingDataError(
            f"{name} must be a list of strings or dicts, or a path to a .txt, .jsonl or .json file; "
            f"got {type(data).__name__}")
    if len(data) == 0:
        raise TrainingDataError(f"{name} is empty: give at least one example")
    if all(isinstance(item, Record) for item in data):
        return list(data)
    return [record_from_item(item, f"{name}[{index}]") for index, item in enumerate(data)]


def read_file(path: Path) -> list[Record]:
    items = read_items(path)
    if isinstance(items, str):
        return [Record("text", text=items, source=str(path))]
    return [record_from_item(item, source) for item, source in items]


def read_items(path: Path, suffixes: tuple[str, ...] = SUPPORTED_SUFFIXES) -> list[tuple[Any, str]] | str:
    """The JSON values of a .jsonl (one a line) or .json (a list) file, each with where it came from
    ("data.jsonl line 7"); the whole text of a .txt file. The one reader of data files, checked here."""
    if not path.exists():
        raise TrainingDataError(f"data file {str(path)!r} does not exist")
    if not path.is_file():
        raise TrainingDataError(f"{path} is not a file: give a {', '.join(suffixes)} file")
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        raise TrainingDataError(f"{path}: unsupported data format {suffix or '(no extension)'!r}; "
                                f"use {', '.join(suffixes)}")
    content = read_utf8(path, TrainingDataError)
    if not content.strip():
        raise TrainingDataError(f"{path} is empty: there is nothing to train on")
    if suffix == ".txt":
        return content
    if suffix == ".jsonl":
        items = []
        for number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append((json.loads(line), f"{path} line {number}"))
            except json.JSONDecodeError as exc:
                raise TrainingDataError(f"{path} line {number}: not valid JSON ({exc.msg} at column {exc.colno}); "
                                        "each line must be one JSON object") from None
        return items
    try:
        values = json.loads(content)
    except json.JSONDecodeError as exc:
        raise TrainingDataError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(values, list):
        raise TrainingDataError(f"{path} must hold a JSON list of examples, got a {type(values).__name__}")
    if not values:
        raise TrainingDataError(f"{path} holds an empty list: there is nothing to train on")
    return [(value, f"{path} item {index}") for index, value in enumerate(values)]


def record_from_item(item: Any, source: str) -> Record:
    """Validate one example (a string or a dict of a known shape)."""
    if isinstance(item, str):
        return Record("text", text=item, source=source)
    if not isinstance(item, Mapping):
        raise TrainingDataError(f"{source}: expected a string or an object like {RECORD_SHAPES}, "
                                f"got {type(item).__name__}")
    if "messages" in item:
        return Record("chat", messages=_check_messages(item["messages"], source), source=source)
    if "prompt" in item or "completion" in item:
        for key in ("prompt", "completion"):
            if not isinstance(item.get(key), str):
                raise TrainingDataError(f"{source}: '{key}' must be a string (prompt/completion examples need both)")
        if not item["completion"]:
            raise TrainingDataError(f"{source}: 'completion' is empty: there is nothing to train on")
        return Record("prompt", prompt=item["prompt"], completion=item["completion"], source=source)
    if "input_ids" in item:
        return _ids_record(item, source)
    if "text" in item:
        if not isinstance(item["text"], str):
            raise TrainingDataError(f"{source}: 'text' must be a string, got {type(item['text']).__name__}")
        return Record("text", text=item["text"], source=source)
    keys = ", ".join(sorted(map(str, item))) or "none"
    raise TrainingDataError(f"{source}: unknown example shape (keys: {keys}); expected {RECORD_SHAPES}")


def _ids_record(item: Mapping, source: str) -> Record:
    input_ids, labels = item["input_ids"], item.get("labels")
    for key, values in (("input_ids", input_ids), ("labels", labels)):
        if values is not None and (not isinstance(values, list) or not values
                                   or not all(isinstance(v, int) and not isinstance(v, bool) for v in values)):
            raise TrainingDataError(f"{source}: '{key}' must be a non-empty list of integer token ids")
    if labels is not None and len(labels) != len(input_ids):
        raise TrainingDataError(f"{source}: 'labels' has {len(labels)} entries for {len(input_ids)} input_ids")
    return Record("ids", input_ids=list(input_ids), labels=None if labels is None else list(labels), source=source)


def _check_messages(messages: Any, source: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise TrainingDataError(f"{source}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TrainingDataError(f"{source}: messages[{index}] must be an object with 'role' and 'content'")
        if not isinstance(message.get("role"), str) or not message["role"]:
            raise TrainingDataError(f"{source}: messages[{index}] has no 'role' (user, assistant, system, ...)")
        content = message.get("content")
        if not isinstance(content, (str, list)) and not (content is None and message.get("tool_calls")):
            raise TrainingDataError(f"{source}: messages[{index}] ('{message['role']}') needs a string 'content'")
    return [dict(message) for message in messages]


def hold_out(records: list[Record], fraction: float) -> tuple[list[Record], list[Record]]:
    """Split off the last `fraction` of the data for evaluation: of a single text (at a line break), or of the
    records. Returns (train, eval)."""
    if not 0 < fraction < 1:
        raise ValueError(f"the evaluation split must be a fraction between 0 and 1, got {fraction!r}")
    if len(records) == 1 and getattr(records[0], "kind", None) == "text":
        record = records[0]
        cut = int(len(record.text) * (1 - fraction))
        newline = record.text.rfind("\n", 0, cut)
        cut = newline + 1 if newline > 0 else cut
        head, tail = record.text[:cut], record.text[cut:]
        if not head.strip() or not tail.strip():
            raise TrainingDataError(f"{record.source} is too short to hold out {fraction:.0%} for evaluation")
        return ([Record("text", text=head, source=f"{record.source} (first {1 - fraction:.0%})")],
                [Record("text", text=tail, source=f"{record.source} (last {fraction:.0%})")])
    num_eval = math.ceil(len(records) * fraction)
    if num_eval >= len(records):
        raise TrainingDataError(f"{len(records)} example(s) are too few to hold out {fraction:.0%} for evaluation")
    return records[:-num_eval], records[-num_eval:]


def texts_of(records: list[Record]) -> list[str]:
    """The raw text of every record (for training a tokenizer)."""
    texts = []
    for record in records:
        if record.kind == "text":
            texts.append(record.text)
        elif record.kind == "prompt":
            texts.append(record.prompt + record.completion)
        elif record.kind == "chat":
            texts.extend(m["content"] for m in record.messages or [] if isinstance(m.get("content"), str))
    return texts
