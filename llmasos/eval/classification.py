"""Classification metrics: accuracy and macro-F1 (scikit-learn's f1_score(average="macro"): the mean F1 over every
label that occurs in the references or the predictions) of a sequence classifier on labelled JSONL."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmasos.errors import EvalDataError, TrainingDataError


@dataclass
class ClassificationResult:
    accuracy: float
    macro_f1: float
    num_examples: int
    per_label_f1: dict[str, float] = field(default_factory=dict)


def accuracy_and_macro_f1(predictions: list[int], references: list[int],
                          names: list[str] | None = None) -> ClassificationResult:
    if len(predictions) != len(references) or not references:
        raise ValueError("predictions and references must be non-empty and of the same length")
    correct = sum(p == r for p, r in zip(predictions, references, strict=True))
    per_label: dict[str, float] = {}
    for label in sorted(set(predictions) | set(references)):
        true_positive = sum(p == label and r == label for p, r in zip(predictions, references, strict=True))
        predicted = sum(p == label for p in predictions)
        actual = sum(r == label for r in references)
        f1 = 2 * true_positive / (predicted + actual) if predicted + actual else 0.0
        per_label[names[label] if names else str(label)] = f1
    return ClassificationResult(accuracy=correct / len(references), macro_f1=sum(per_label.values()) / len(per_label),
                                num_examples=len(references), per_label_f1=per_label)


def evaluate_classification(classifier: Any, data: Any, batch_size: int = 16,
                            limit: int | None = None, progress=None) -> ClassificationResult:
    """Score a SequenceClassifier on {"text", ["text_pair"], "label"} records (a .jsonl / .json path or a list);
    a label the model does not have, a missing label or mixed label kinds are EvalDataErrors naming the line."""
    from llmasos.train.labels import label_to_id, read_labelled

    try:
        records = read_labelled(data if not isinstance(data, Path) else str(data), "eval_data")
        if limit is not None:
            records = records[:limit]
        references = [label_to_id(record, classifier.labels) for record in records]
    except TrainingDataError as exc:
        raise EvalDataError(str(exc)) from None
    predictions: list[int] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        logits = classifier.logits([r.text for r in chunk], [r.text_pair for r in chunk], batch_size,
                                   truncation=True)
        predictions.extend(logits.argmax(-1).tolist())
        if progress is not None:
            progress(len(predictions), len(records))
    return accuracy_and_macro_f1(predictions, references, classifier.labels)
