"""VectorIndex (llmasos/search/vectors.py) without any model: exact scans below the threshold, HNSW above it with the
search breadth tuned to recall@10 >= 0.95, exact scans when no breadth gets there; removal, save and load."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from llmasos.search import vectors as vectors_module
from llmasos.search.vectors import GraphSettings, VectorIndex


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def exact(data: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    return [int(i) for i in np.argsort(-(data @ query), kind="stable")[:k]]


def test_exact_scan_equals_numpy_and_removal_and_reload(tmp_path):
    data = unit(np.random.default_rng(0).standard_normal((500, 32)))
    index = VectorIndex(32)
    index.add(np.arange(500, dtype=np.uint64), data)
    query = data[7] + 0.1 * data[8]
    keys, scores = index.search(query, 10)
    assert keys.tolist() == exact(data, query, 10)
    np.testing.assert_allclose(scores, np.sort(data @ query)[::-1][:10], atol=1e-5)
    index.remove([int(keys[0])])
    assert int(keys[0]) not in index.search(query, 10)[0].tolist() and len(index) == 499
    index.save(tmp_path)
    loaded = VectorIndex.load(tmp_path, 32, index.settings)
    assert loaded.search(query, 10)[0].tolist() == index.search(query, 10)[0].tolist()
    assert VectorIndex(32).search(query, 5)[0].tolist() == []  # an empty index answers nothing


def test_tuning_picks_a_breadth_that_reaches_the_recall_target():
    rng = np.random.default_rng(1)
    centers = unit(rng.standard_normal((20, 48)))
    data = unit(centers[rng.integers(0, 20, 3000)] + 0.3 * rng.standard_normal((3000, 48)))  # clustered, like text
    index = VectorIndex(48, GraphSettings(connectivity=16, expansion_add=64, exact_below=1000))
    index.add(np.arange(3000, dtype=np.uint64), data)
    settings = index.tune()
    assert not settings.exact and settings.measured_recall >= vectors_module.TARGET_RECALL
    assert settings.expansion_search in vectors_module.TUNING_BREADTHS
    queries = unit(centers[:10] + 0.3 * rng.standard_normal((10, 48)))
    recall = np.mean([len(set(index.search(q, 10)[0].tolist()) & set(exact(data, q, 10))) / 10 for q in queries])
    assert recall >= 0.9


def test_without_a_good_breadth_every_query_is_an_exact_scan(monkeypatch):
    monkeypatch.setattr(vectors_module, "TUNING_BREADTHS", (2,))  # a graph walk this narrow misses neighbours
    data = unit(np.random.default_rng(2).standard_normal((2000, 128)))  # random: the hard case for graphs
    index = VectorIndex(128, GraphSettings(connectivity=2, expansion_add=2, exact_below=100))
    index.add(np.arange(2000, dtype=np.uint64), data)
    settings = index.tune()
    assert settings.exact and settings.measured_recall is None
    for query in data[:5] + 0.01:
        assert index.search(query, 10)[0].tolist() == exact(data, query, 10)


def test_small_indexes_are_not_tuned():
    index = VectorIndex(8)
    index.add(np.arange(50, dtype=np.uint64), unit(np.random.default_rng(3).standard_normal((50, 8))))
    assert index.tune() == GraphSettings()


@pytest.mark.parametrize("bad", [dict(connectivity=1), dict(expansion_search="many"), dict(exact_below=-1)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        dataclasses.replace(GraphSettings(), **bad)
