"""Semantic search: documents chunked, embedded by a library embedding model and kept in a persisted vector index
(`SemanticIndex`), queried by meaning from Python, the `llmasos index` commands and POST /v1/indexes/{name}/query."""

from llmasos.search.chunking import Chunking
from llmasos.search.index import Hit, SemanticIndex
from llmasos.search.vectors import GraphSettings

__all__ = ["Chunking", "GraphSettings", "Hit", "SemanticIndex"]
