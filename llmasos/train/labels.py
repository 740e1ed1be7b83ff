"""Labelled examples for sequence classification: JSONL / JSON / in-memory `{"text", "label"}` or
`{"text", "text_pair", "label"}` records, labels as names or as ids, turned into token examples and label maps
(`id2label` / `label2id`, written to config.json)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmasos.errors import TrainingDataError
from llmasos.tokenizer import Tokenizer
from llmasos.train.data import read_items
from llmasos.train.dataset import Example


@dataclass
class LabelledRecord:
    text: str
    text_pair: str | None
    label: str | int | None
    source: str


def read_labelled(data: Any, name: str = "train_data", require_label: bool = True) -> list[LabelledRecord]:
    """Records from a .jsonl / .json path or a list of dicts; every record needs a string 'text' and (when
    `require_label`) a 'label' that is a string or an integer, the same kind across the data set."""
    if isinstance(data, (str, Path)):
        items = read_items(Path(data), (".jsonl", ".json"))
    elif isinstance(data, Sequence) and not isinstance(data, (bytes, bytearray)) and data:
        if all(isinstance(item, LabelledRecord) for item in data):
            return list(data)
        items = [(item, f"{name}[{index}]") for index, item in enumerate(data)]
    else:
        raise TrainingDataError(f"{name} must be a non-empty list of {{'text', 'label'}} objects or a path to a "
                                ".jsonl / .json file")
    records = []
    for item, source in items:
        if not isinstance(item, Mapping):
            raise TrainingDataError(f"{source}: expected an object like {{'text': ..., 'label': ...}}, got "
                                    f"{type(item).__name__}")
        text, pair = item.get("text"), item.get("text_pair")
        if not isinstance(text, str):
            raise TrainingDataError(f"{source}: 'text' must be a string (classification examples are "
                                    "{'text', 'label'} or {'text', 'text_pair', 'label'})")
        if pair is not None and not isinstance(pair, str):
            raise TrainingDataError(f"{source}: 'text_pair' must be a string")
        label = item.get("label")
        if label is None and require_label:
            if "label" in item:  # present but null: "no 'label' (keys: label, text)" would contradict itself
                raise TrainingDataError(f"{source}: 'label' is null; every classification example needs a label "
                                        "name (string) or a label id (integer)")
            keys = ", ".join(sorted(map(str, item)))
            raise TrainingDataError(f"{source}: no 'label' (keys: {keys}); every classification example needs one")
        if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))):
            raise TrainingDataError(f"{source}: 'label' must be a label name (string) or a label id (integer), got "
                                    f"{json.dumps(label)}")
        records.append(LabelledRecord(text, pair, label, source))
    kinds = {type(record.label) for record in records if record.label is not None}
    if len(kinds) > 1:
        first = {kind: next(r.source for r in records if type(r.label) is kind) for kind in kinds}
        raise TrainingDataError(f"{name} mixes label names and label ids (a string label at {first[str]}, an "
                                f"integer one at {first[int]}); use one kind throughout")
    return records


def is_default_names(id2label: Mapping[int, str]) -> bool:
    """transformers' placeholder names LABEL_0, LABEL_1, ... (a head nobody named)."""
    return all(name == f"LABEL_{index}" for index, name in id2label.items())


def label_names(records: list[LabelledRecord], existing: Mapping[int, str] | None = None) -> list[str]:
    """The label names, in id order, for training on `records`: a model's own named labels when it has them (the
    data must then use those), else the sorted names of the data, or LABEL_0..LABEL_n-1 for integer labels."""
    if existing and not is_default_names(existing):
        names = [existing[index] for index in range(len(existing))]
        for record in records:
            label_to_id(record, names)
        return names
    labels = {record.label for record in records}
    if all(isinstance(label, int) for label in labels):
        if any(label < 0 for label in labels):
            bad = next(r for r in records if r.label < 0)
            raise TrainingDataError(f"{bad.source}: label id {bad.label} is negative")
        count = max(max(labels) + 1, len(existing or {}))
        return [f"LABEL_{index}" for index in range(count)]
    return sorted(labels)


def label_to_id(record: LabelledRecord, names: list[str]) -> int:
    """A record's label as an id of a model with labels `names`; unknown labels are an error naming them all."""
    label = record.label
    if isinstance(label, int):
        if not 0 <= label < len(names):
            raise TrainingDataError(f"{record.source}: label id {label} is outside the model's {len(names)} labels "
                                    f"(0..{len(names) - 1})")
        return label
    try:
        return names.index(label)
    except ValueError:
        raise TrainingDataError(f"{record.source}: unknown label {label!r}; the model's labels are "
                                f"{', '.join(map(repr, names))}") from None


def encode_pair(tokenizer: Tokenizer, text: str, text_pair: str | None) -> tuple[list[int], list[int]]:
    """(input_ids, token_type_ids) as transformers' tokenizer(text, text_pair) gives them."""
    encoding = tokenizer.backend.encode(text, text_pair, add_special_tokens=True)
    return list(encoding.ids), list(encoding.type_ids)


def build_classification_examples(records: list[LabelledRecord], tokenizer: Tokenizer, names: list[str],
                                  max_seq_length: int) -> list[Example]:
    """Token examples (truncated to max_seq_length, as transformers' truncation=True) with their label ids."""
    examples = []
    backend = tokenizer.backend
    previous = backend.truncation
    backend.enable_truncation(max_seq_length)  # longest-first, the special tokens kept, as transformers truncates
    try:
        for record in records:
            encoding = backend.encode(record.text, record.text_pair, add_special_tokens=True)
            if not encoding.ids:
                raise TrainingDataError(f"{record.source}: the text tokenizes to nothing")
            label = label_to_id(record, names) if record.label is not None else -100
            examples.append(Example(list(encoding.ids), [], token_type_ids=list(encoding.type_ids), label=label))
    finally:
        if previous is None:
            backend.no_truncation()
        else:
            backend.enable_truncation(**previous)
    return examples
