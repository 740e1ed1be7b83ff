"""The vector index under a semantic index: usearch (chosen by benchmarks/vector_index.py, see docs/search.md), cosine
similarity as the inner product of unit vectors, exact search while the index is small, HNSW search above that."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VECTORS_FILE = "vectors.usearch"


TUNING_BREADTHS = (64, 128, 256, 512, 1024)
TUNING_QUERIES = 64
# Indexed vectors as queries flatter recall (on 20,000 MiniLM lines: 0.995 sampled, 0.975 for unseen queries at the
# same breadth, docs/performance.md): aiming at 0.97 on the sample keeps real queries above the 0.95 goal.
TARGET_RECALL = 0.97
K_TUNED = 10


@dataclass(frozen=True)
class GraphSettings:
    """HNSW parameters. Below `exact_below` vectors every query is an exact scan (under 2 ms a query up to 10,000
    384-d vectors, docs/performance.md). Above it, `expansion_search` is chosen after each change by measurement
    (`VectorIndex.tune`): the smallest breadth whose recall@10 reaches TARGET_RECALL against an exact scan; `exact` True
    when none does (data without structure, such as random vectors, where a graph walk is no faster than a scan)."""

    connectivity: int = 32
    expansion_add: int = 128
    expansion_search: int = 128
    exact_below: int = 10_000
    exact: bool = False
    measured_recall: float | None = None  # recall@10 of the chosen setting on the sample, when tuned

    def __post_init__(self) -> None:
        for name in ("connectivity", "expansion_add", "expansion_search"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 2:
                raise ValueError(f"{name} must be an integer of at least 2, got {getattr(self, name)!r}")
        if not isinstance(self.exact_below, int) or self.exact_below < 0:
            raise ValueError(f"exact_below must be a non-negative integer, got {self.exact_below!r}")



class VectorIndex:
    """Unit vectors under uint64 keys: add, remove, top-k by inner product (= cosine similarity), save and load."""

    def __init__(self, dimension: int, settings: GraphSettings | None = None, index=None) -> None:
        from usearch.index import Index

        self.dimension = dimension
        self.settings = settings or GraphSettings()
        # One search at a time: the server's thread pool may query one index from several threads, and usearch's
        # single-threaded search reuses one search context.
        self._lock = threading.Lock()
        self.index = index if index is not None else Index(
            ndim=dimension, metric="ip", dtype="f32", connectivity=self.settings.connectivity,
            expansion_add=self.settings.expansion_add, expansion_search=self.settings.expansion_search)

    @classmethod
    def load(cls, directory: Path, dimension: int, settings: GraphSettings) -> VectorIndex:
        from usearch.index import Index

        path = directory / VECTORS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing")
        index = Index.restore(str(path))
        if index is None or index.ndim != dimension:
            raise ValueError(f"{path} is not a usearch index of {dimension}-dimensional vectors")
        index.expansion_search = settings.expansion_search
        return cls(dimension, settings, index)

    def save(self, directory: Path) -> None:
        self.index.save(str(directory / VECTORS_FILE))

    def __len__(self) -> int:
        return len(self.index)

    def add(self, keys: np.ndarray, vectors: np.ndarray, threads: int = 1) -> None:
        """vectors (num_keys, dimension) float32 unit rows."""
        assert vectors.shape == (len(keys), self.dimension), (vectors.shape, len(keys), self.dimension)
        if len(keys):
            self.index.add(np.asarray(keys, dtype=np.uint64), np.ascontiguousarray(vectors, dtype=np.float32),
                           threads=threads)

    def remove(self, keys: list[int]) -> None:
        if keys:
            self.index.remove(np.asarray(keys, dtype=np.uint64))

    def search(self, vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(keys, scores) of the k most similar vectors, best first; scores are inner products."""
        if len(self.index) == 0:
            return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.float32)
        exact = self.settings.exact or len(self.index) < self.settings.exact_below
        with self._lock:
            matches = self.index.search(np.ascontiguousarray(vector, dtype=np.float32), min(k, len(self.index)),
                                        threads=1, exact=exact)
        return np.asarray(matches.keys), 1.0 - np.asarray(matches.distances, dtype=np.float32)

    def tune(self, seed: int = 0) -> GraphSettings:
        """Settings for this index's size and data: unchanged below `exact_below`; above it, the smallest search
        breadth whose recall@10 on TUNING_QUERIES indexed vectors (each query's own vector left out) reaches
        TARGET_RECALL, or exact scans when no breadth does. Sets and returns them."""
        import dataclasses

        if len(self.index) < self.settings.exact_below or len(self.index) <= K_TUNED + 1:
            return self.settings
        keys = np.fromiter(self.index.keys, dtype=np.uint64, count=len(self.index))
        chosen = np.random.default_rng(seed).choice(keys, size=min(TUNING_QUERIES, len(keys)), replace=False)
        queries = np.asarray(self.index.get(chosen), dtype=np.float32)  # (num_queries, dimension)
        truth = [set(row[row != key][:K_TUNED].tolist())
                 for row, key in zip(self.index.search(queries, K_TUNED + 1, exact=True).keys, chosen, strict=True)]
        settings = dataclasses.replace(self.settings, exact=True, measured_recall=None)
        for breadth in TUNING_BREADTHS:
            self.index.expansion_search = breadth
            found = self.index.search(queries, K_TUNED + 1).keys
            recall = float(np.mean([len(set(row[row != key][:K_TUNED].tolist()) & expected) / K_TUNED
                                    for row, key, expected in zip(found, chosen, truth, strict=True)]))
            if recall >= TARGET_RECALL:
                settings = dataclasses.replace(self.settings, expansion_search=breadth, exact=False,
                                               measured_recall=round(recall, 4))
                break
        self.index.expansion_search = settings.expansion_search
        self.settings = settings
        return settings
