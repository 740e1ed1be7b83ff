"""BLEU, chrF and ROUGE equal sacreBLEU and rouge-score called directly; EM and F1 follow SQuAD's normalisation."""

from __future__ import annotations

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from llmasos.eval import bleu, chrf, exact_match, f1, normalize_answer, rouge

PREDICTIONS = [
    "The cat is sitting on the mat.",
    "Operating systems share memory between processes in pages",
    "Le chat dort sur le canapé.",
    "running runners ran quickly",
]
REFERENCES = [
    "The cat sat on the mat.",
    "An operating system lends memory to processes in pages.",
    "Le chat dort.",
    "the runner runs quickly",
]
MULTI_REFERENCES = [
    ["The cat sat on the mat.", "A cat was sitting on the mat."],
    ["An operating system lends memory to processes in pages."],
    ["Le chat dort.", "Le chat dort sur le sofa.", "Un chat dort."],
    ["the runner runs quickly", "runners run fast"],
]


def test_bleu_and_chrf_equal_sacrebleu_single_reference():
    assert bleu(PREDICTIONS, REFERENCES) == sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score
    assert chrf(PREDICTIONS, REFERENCES) == sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES]).score
    assert 0 < bleu(PREDICTIONS, REFERENCES) < 100


def test_bleu_and_chrf_equal_sacrebleu_with_a_varying_number_of_references():
    streams = [[refs[k] if k < len(refs) else None for refs in MULTI_REFERENCES] for k in range(3)]
    assert bleu(PREDICTIONS, MULTI_REFERENCES) == sacrebleu.corpus_bleu(PREDICTIONS, streams).score
    assert chrf(PREDICTIONS, MULTI_REFERENCES) == sacrebleu.corpus_chrf(PREDICTIONS, streams).score
    # More acceptable references can only help.
    assert bleu(PREDICTIONS, MULTI_REFERENCES) > bleu(PREDICTIONS, REFERENCES)


def test_chrf_options_reach_sacrebleu():
    assert chrf(PREDICTIONS, REFERENCES, word_order=2) == sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES],
                                                                                word_order=2).score


def test_rouge_equals_rouge_score_mean_f1_with_stemming():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(PREDICTIONS, REFERENCES, strict=True)]
    expected = {name: sum(s[name].fmeasure for s in scores) / len(scores) for name in ("rouge1", "rouge2", "rougeL")}
    assert rouge(PREDICTIONS, REFERENCES) == pytest.approx(expected, rel=1e-12)
    # Stemming is on: "running runners ran" vs "runner runs" shares stems.
    assert rouge(PREDICTIONS, REFERENCES)["rouge1"] > rouge(PREDICTIONS, REFERENCES, use_stemmer=False)["rouge1"]


def test_rouge_with_several_references_takes_the_best():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score_multi(refs, pred) for pred, refs in zip(PREDICTIONS, MULTI_REFERENCES, strict=True)]
    expected = {name: sum(s[name].fmeasure for s in scores) / len(scores) for name in ("rouge1", "rouge2", "rougeL")}
    assert rouge(PREDICTIONS, MULTI_REFERENCES) == pytest.approx(expected, rel=1e-12)


def test_squad_normalisation_exact_match_and_f1():
    assert normalize_answer("  The  Eiffel-Tower, in PARIS! ") == "eiffeltower in paris"
    assert normalize_answer("an apple a day") == "apple day"
    assert exact_match(["The Pacific Ocean.", "seven", "Paris"], ["pacific ocean", ["7", "Seven"], "London"]) == \
        pytest.approx(2 / 3)
    # "the lion king" vs "a lion": tokens [lion, king] vs [lion] -> precision 1/2, recall 1, F1 2/3.
    assert f1(["the lion king"], ["a lion"]) == pytest.approx(2 / 3)
    assert f1(["lion"], [["tiger", "the lion"]]) == 1.0  # best reference counts
    assert f1(["zebra"], ["lion"]) == 0.0
    assert f1(["the"], ["a"]) == 1.0  # both normalise to nothing: SQuAD v2 counts that as a match
    assert f1(["the"], ["lion"]) == 0.0


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        bleu(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="not a single string"):
        rouge("a cat", "a cat")
    with pytest.raises(ValueError, match="reference 0 must be a string or a non-empty list"):
        exact_match(["a"], [[]])
