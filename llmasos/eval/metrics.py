"""Text metrics from the libraries the field trusts: sacreBLEU (BLEU, chrF), rouge-score (ROUGE), SQuAD (EM, F1).

Scales follow each reference: BLEU and chrF on sacreBLEU's 0-100 scale; ROUGE, exact match and F1 as fractions 0-1.
`references` is one string per prediction, or a list of strings per prediction (multi-reference).
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Callable, Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_PUNCTUATION = frozenset(string.punctuation)
References = Sequence[str] | Sequence[Sequence[str]]


def _reference_lists(predictions: Sequence[str], references: References) -> list[list[str]]:
    """Each prediction's references as a non-empty list of strings; lengths checked."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise ValueError("predictions and references must be lists of strings, not a single string")
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references")
    lists = []
    for index, refs in enumerate(references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs or not all(isinstance(ref, str) for ref in refs):
            raise ValueError(f"reference {index} must be a string or a non-empty list of strings, got {refs!r}")
        lists.append(refs)
    for index, prediction in enumerate(predictions):
        if not isinstance(prediction, str):
            raise ValueError(f"prediction {index} must be a string, got {type(prediction).__name__}")
    return lists


def _reference_streams(lists: list[list[str]]) -> list[list[str | None]]:
    """sacreBLEU's layout: stream k holds every example's k-th reference (None where an example has fewer)."""
    width = max((len(refs) for refs in lists), default=1)
    return [[refs[k] if k < len(refs) else None for refs in lists] for k in range(width)]


def bleu(predictions: Sequence[str], references: References, **options) -> float:
    """sacreBLEU's corpus BLEU (0-100, default 13a tokenisation); `options` go to `sacrebleu.corpus_bleu`."""
    import sacrebleu

    streams = _reference_streams(_reference_lists(predictions, references))
    return float(sacrebleu.corpus_bleu(list(predictions), streams, **options).score)


def chrf(predictions: Sequence[str], references: References, **options) -> float:
    """sacreBLEU's corpus chrF (0-100); `word_order=2` gives chrF++. `options` go to `sacrebleu.corpus_chrf`."""
    import sacrebleu

    streams = _reference_streams(_reference_lists(predictions, references))
    return float(sacrebleu.corpus_chrf(list(predictions), streams, **options).score)


def rouge(predictions: Sequence[str], references: References, use_stemmer: bool = True) -> dict[str, float]:
    """Mean F1 of rouge1, rouge2 and rougeL from rouge-score (stemming on); with several references, the best."""
    from rouge_score import rouge_scorer

    lists = _reference_lists(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, refs in zip(predictions, lists, strict=True):
        scores = scorer.score(refs[0], prediction) if len(refs) == 1 else scorer.score_multi(refs, prediction)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    count = max(len(lists), 1)
    return {name: total / count for name, total in totals.items()}


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def f1_score(prediction: str, reference: str) -> float:
    """SQuAD token F1 between normalised answers (1.0 when both are empty, 0.0 when only one is)."""
    predicted = normalize_answer(prediction).split()
    expected = normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = collections.Counter(predicted) & collections.Counter(expected)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


def _mean_best(score: Callable[[str, str], float], predictions: Sequence[str], references: References) -> float:
    lists = _reference_lists(predictions, references)
    if not lists:
        return 0.0
    return sum(max(score(p, ref) for ref in refs) for p, refs in zip(predictions, lists, strict=True)) / len(lists)


def exact_match(predictions: Sequence[str], references: References) -> float:
    """Fraction of predictions equal to a reference after SQuAD normalisation (best over references)."""
    return _mean_best(exact_match_score, predictions, references)


def f1(predictions: Sequence[str], references: References) -> float:
    """Mean SQuAD token F1 (best over each prediction's references)."""
    return _mean_best(f1_score, predictions, references)


METRICS = ("bleu", "chrf", "rouge", "exact_match", "f1")


def compute(metric: str, predictions: Sequence[str], references: References) -> dict[str, float]:
    """One named metric as a flat dict of numbers ({"bleu": ...}, or rouge's three keys)."""
    if metric == "rouge":
        return rouge(predictions, references)
    functions = {"bleu": bleu, "chrf": chrf, "exact_match": exact_match, "f1": f1}
    if metric not in functions:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    return {metric: functions[metric](predictions, references)}
