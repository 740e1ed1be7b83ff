"""Shared pieces of the semantic-search tests: a few hundred distinct sentences, the MiniLM embedder loaded once, and
the reference every index result is compared with: sentence-transformers' own normalised embeddings and a numpy dot."""

from __future__ import annotations

import functools
import random

import numpy as np
from encoders_support import minilm_dir, sentence_transformer

SUBJECTS = ["The cat", "A scheduler", "My grandmother", "The compiler", "A violinist", "The river", "Our server",
            "A hungry fox", "The old sailor", "The database", "A child", "The orchestra"]
VERBS = ["quietly watches", "rewrites", "sings about", "pages out", "forgets", "paints", "defends", "measures",
         "follows", "repairs"]
OBJECTS = ["the morning tide", "a stack of memory pages", "the winter garden", "an unfinished symphony",
           "the locked kernel mutex", "a basket of apples", "the distant mountains", "every broken test"]
QUERIES = ["an animal looking at the sea", "operating system memory management", "music played by an orchestra",
           "fixing software that fails", "fruit in a basket"]


@functools.cache
def sentences(count: int = 200) -> tuple[str, ...]:
    """`count` distinct sentences, the same every run."""
    every = [f"{s} {v} {o}." for s in SUBJECTS for v in VERBS for o in OBJECTS]
    return tuple(random.Random(4).sample(every, count))


@functools.cache
def minilm():
    from llmasos.embeddings import Embedder

    return CachingEmbedder(Embedder.load(minilm_dir()))


class CachingEmbedder:
    """MiniLM with its sentence vectors remembered across the tests of a run (the same texts are indexed several
    times; embedding them once keeps the suite short). Everything else is the real Embedder's."""

    def __init__(self, embedder) -> None:
        self.embedder, self.vectors = embedder, {}

    def __getattr__(self, name):
        return getattr(self.embedder, name)

    def encode_ids(self, id_lists, prompt_length=0, **options):
        import torch

        if options.get("normalize") is not True or prompt_length:
            return self.embedder.encode_ids(id_lists, prompt_length, **options)
        keys = [tuple(ids) for ids in id_lists]
        missing = [key for key in dict.fromkeys(keys) if key not in self.vectors]
        if missing:
            computed = self.embedder.encode_ids([list(key) for key in missing], **options)
            self.vectors.update(zip(missing, computed, strict=True))
        return torch.stack([self.vectors[key] for key in keys]) if keys else self.embedder.encode_ids([], **options)


def reference_top_k(texts: list[str], query: str, k: int) -> tuple[list[int], np.ndarray]:
    """Exact cosine search by sentence-transformers: row numbers of the k best texts and their scores, best first."""
    model = sentence_transformer(str(minilm_dir()))
    corpus = _encoded(tuple(texts))
    scores = corpus @ model.encode([query], normalize_embeddings=True)[0]
    order = np.argsort(-scores, kind="stable")[:k]
    return [int(i) for i in order], scores[order]


@functools.cache
def _encoded(texts: tuple[str, ...]) -> np.ndarray:
    return sentence_transformer(str(minilm_dir())).encode(list(texts), normalize_embeddings=True, batch_size=64)
