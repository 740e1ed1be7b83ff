"""SemanticIndex (llmasos/search/index.py) with the real all-MiniLM-L6-v2: its top-k equals exact cosine search by
sentence-transformers (ids, order, scores within 1e-4), in exact and HNSW mode; it persists, adds, replaces and
deletes; chunks keep where they came from; every bad input is a clear SearchError and a failed create leaves nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from encoders_support import make_sentence_transformer, minilm_dir

from llmasos.errors import IndexNotFoundError, SearchError
from llmasos.search import Chunking, GraphSettings, SemanticIndex
from llmasos.search.store import indexes_dir, list_indexes, remove_index

from .support import QUERIES, minilm, reference_top_k, sentences


@pytest.fixture(scope="module", autouse=True)
def home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("search-home")
        patch.setenv("LLMASOS_HOME", str(path))
        yield path


@pytest.fixture(scope="module")
def corpus_index(home) -> SemanticIndex:
    texts = list(sentences())
    return SemanticIndex.create("corpus", model=minilm_dir(), documents=texts, ids=[f"s{i}" for i in range(len(texts))],
                                embedder=minilm())


def assert_matches_reference(index: SemanticIndex, texts: list[str], k: int = 10) -> None:
    for query in QUERIES:
        expected_rows, expected_scores = reference_top_k(texts, query, k)
        hits = index.query(query, k=k)
        assert [hit.id for hit in hits] == [f"s{row}" for row in expected_rows], query
        np.testing.assert_allclose([hit.score for hit in hits], expected_scores, atol=1e-4)
        assert [hit.text for hit in hits] == [texts[row] for row in expected_rows]


def test_top_k_equals_exact_search_by_sentence_transformers(corpus_index):
    assert corpus_index.num_chunks == 200 and corpus_index.dimension == 384
    assert_matches_reference(corpus_index, list(sentences()))


def test_hnsw_mode_gives_the_same_top_k(home):
    texts = list(sentences())
    graph = GraphSettings(exact_below=0)  # every query walks the graph
    index = SemanticIndex.create("corpus-hnsw", model=minilm_dir(), documents=texts,
                                 ids=[f"s{i}" for i in range(len(texts))], graph=graph, embedder=minilm())
    assert_matches_reference(index, texts)
    tuned = SemanticIndex.open("corpus-hnsw").vectors.settings
    assert not tuned.exact and tuned.measured_recall >= 0.97 and tuned.exact_below == 0
    assert index.manifest["graph"]["expansion_search"] == tuned.expansion_search


def test_reopened_from_disk_gives_the_same_results(corpus_index):
    directory = indexes_dir() / "corpus"
    assert sorted(p.name for p in directory.iterdir()) == ["chunks.sqlite", "index.json", "vectors.usearch"]
    manifest = json.loads((directory / "index.json").read_text())
    assert manifest["model"] == str(minilm_dir()) and manifest["dimension"] == 384 and manifest["normalize"] is True
    reopened = SemanticIndex.open("corpus", embedder=minilm())
    for query in QUERIES:
        assert [h.to_dict() for h in reopened.query(query, 7)] == [h.to_dict() for h in corpus_index.query(query, 7)]
    by_model = SemanticIndex.open("corpus")  # loads the model the manifest names
    assert by_model.query(QUERIES[0], 3)[0].id == corpus_index.query(QUERIES[0], 3)[0].id


def test_add_replace_and_delete_persist(home):
    index = SemanticIndex.create("pets", model=minilm_dir(), embedder=minilm(),
                                 documents=["Cats purr when they are content.", {"text": "Dogs bark at strangers.",
                                                                                 "id": "dog", "kind": "animal"}])
    assert [h.id for h in index.query("a barking dog", 2)] == ["dog", "0"]
    assert index.query("a barking dog", 1)[0].metadata == {"doc_id": "dog", "chunk": 0, "offset": 0, "kind": "animal"}
    assert index.add(["Parrots can imitate human speech."]) == ["1"]
    assert SemanticIndex.open("pets", embedder=minilm()).query("a bird that talks", 1)[0].id == "1"
    with pytest.raises(SearchError, match="'dog' is already in index 'pets'.*replace"):
        index.add([{"text": "Wolves howl.", "id": "dog"}])
    index.add([{"text": "Wolves howl at the moon.", "id": "dog"}], replace=True)
    reopened = SemanticIndex.open("pets", embedder=minilm())
    assert reopened.num_chunks == 3
    assert reopened.query("howling at night", 1)[0].text == "Wolves howl at the moon."
    deleter = SemanticIndex.open("pets")
    assert deleter.delete(["dog", "0"]) == 2 and deleter.num_chunks == 1
    assert deleter._embedder is None  # deleting needs no model
    assert [h.id for h in SemanticIndex.open("pets", embedder=minilm()).query("anything", 5)] == ["1"]
    with pytest.raises(SearchError, match="no chunk or document with id 'nope'"):
        deleter.delete(["nope"])
    assert deleter.delete(["1"]) == 1 and SemanticIndex.open("pets", embedder=minilm()).query("anything", 5) == []


def test_chunks_keep_source_line_offset_and_fields(home, tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    lines = [f"Line {i}: the quick brown fox jumps over the lazy dog number {i}." for i in range(60)]
    (docs / "long.txt").write_text("\n".join(lines) + "\n")
    (docs / "sub" / "notes.md").write_text("# Notes\nShort note about kernels.\n")
    (docs / "records.jsonl").write_text(json.dumps({"text": "Apples are red.", "author": "ann"}) + "\n\n"
                                        + json.dumps({"text": "Bananas are yellow.", "id": 42}) + "\n")
    (docs / ".hidden.txt").write_text("never indexed")
    index = SemanticIndex.create("files", model=minilm_dir(), data=docs, embedder=minilm(),
                                 chunking=Chunking("chars", 300, 60))
    by_id = {hit.id: hit for hit in index.query("fox", k=100)}
    assert "records.jsonl:1" in by_id and "42" in by_id and "sub/notes.md" in by_id
    assert not any("never" in hit.text for hit in by_id.values())
    apple = by_id["records.jsonl:1"].metadata
    assert apple == {"doc_id": "records.jsonl:1", "chunk": 0, "source": str((docs / "records.jsonl").resolve()),
                     "line": 1, "offset": 0, "author": "ann"}
    assert by_id["42"].metadata["line"] == 3
    text = (docs / "long.txt").read_text()
    long_chunks = sorted((h for h in by_id.values() if h.metadata["doc_id"] == "long.txt"),
                         key=lambda h: h.metadata["chunk"])
    assert len(long_chunks) > 5 and [h.id for h in long_chunks[:2]] == ["long.txt#0", "long.txt#1"]
    for hit in long_chunks:
        offset = hit.metadata["offset"]
        assert text[offset:offset + len(hit.text)] == hit.text
        assert hit.metadata["line"] == text.count("\n", 0, offset) + 1
        assert len(hit.text) <= 300
    assert index.delete(source=docs / "sub") == 1
    assert index.delete(source=docs / "long.txt") == len(long_chunks)
    assert index.num_chunks == 2


def test_token_chunks_fit_the_model(home):
    text = " ".join(f"token{i}" for i in range(400))
    index = SemanticIndex.create("tokens", model=minilm_dir(), embedder=minilm(), documents=[text],
                                 chunking=Chunking("tokens", 64, 16))
    hits = index.query("token", k=100)
    assert len(hits) > 3
    for hit in hits:
        assert len(minilm().tokenize([hit.text])[0]) <= 64 + 2
        assert text[hit.metadata["offset"]:hit.metadata["offset"] + len(hit.text)] == hit.text


def test_list_and_remove(home, corpus_index):
    rows = {row["name"]: row for row in list_indexes()}
    assert rows["corpus"]["chunks"] == 200 and rows["corpus"]["dimension"] == 384 and rows["corpus"]["size_bytes"] > 0
    SemanticIndex.create("doomed", model=minilm_dir(), documents=["bye"], embedder=minilm())
    assert "doomed" in {row["name"] for row in SemanticIndex.list_indexes()}
    SemanticIndex.remove("doomed")
    assert "doomed" not in {row["name"] for row in list_indexes()}
    assert not (indexes_dir() / "doomed").exists()
    with pytest.raises(IndexNotFoundError, match="index 'doomed' does not exist"):
        remove_index("doomed")


@pytest.fixture(scope="module")
def small_encoder(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("encoders") / "tiny-64"
    make_sentence_transformer(directory)
    return directory


def test_another_dimension_or_model_is_refused(home, small_encoder, corpus_index):
    small = SemanticIndex.create("small", model=small_encoder, documents=["hello there", "general kenobi"])
    assert small.dimension == 64 and small.query("hello", 1)[0].id == "0"
    with pytest.raises(SearchError, match="holds 64-dimensional vectors.*gives 384-dimensional"):
        SemanticIndex.open("small", embedder=minilm())
    with pytest.raises(SearchError, match="holds 384-dimensional vectors.*gives 64-dimensional"):
        SemanticIndex.open("corpus", embedder=small.embedder)
    other = tmp = small_encoder.parent / "tiny-64-other"
    make_sentence_transformer(tmp, seed=5)
    from llmasos.embeddings import Embedder

    with pytest.raises(SearchError, match="mix two models' vectors"):
        small.check_embedder(Embedder.load(other), adding=True)
    with pytest.raises(SearchError, match="holds 3-dimensional"[:5]):
        corpus_index.search(np.ones(3, dtype=np.float32), 3)


def test_bad_input_is_a_clear_error(home, tmp_path, corpus_index):
    with pytest.raises(SearchError, match="query text must not be empty"):
        corpus_index.query("   ")
    with pytest.raises(SearchError, match="k must be an integer from 1 to 1000"):
        corpus_index.query("x", k=0)
    with pytest.raises(IndexNotFoundError, match="index 'missing' does not exist.*corpus"):
        SemanticIndex.open("missing")
    for bad in ("Bad", "../up", "a/b", "", "x" * 200):
        with pytest.raises(SearchError, match="index name"):
            SemanticIndex.open(bad)
    with pytest.raises(SearchError, match="already exists"):
        SemanticIndex.create("corpus", model=minilm_dir(), documents=["x"], embedder=minilm())
    with pytest.raises(SearchError, match="does not exist"):
        SemanticIndex.create("nodata", model=minilm_dir(), data=tmp_path / "missing.jsonl", embedder=minilm())
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(SearchError, match="is empty: there is nothing to index"):
        SemanticIndex.create("nodata", model=minilm_dir(), data=empty, embedder=minilm())
    with pytest.raises(SearchError, match="nothing to index"):
        SemanticIndex.create("nodata", model=minilm_dir(), documents=["  ", "\n"], embedder=minilm())
    with pytest.raises(SearchError, match="nothing to index"):
        SemanticIndex.create("nodata", model=minilm_dir(), documents=[], embedder=minilm())
    with pytest.raises(SearchError, match=r"\[1\]: needs a \"text\" field"):
        SemanticIndex.create("nodata", model=minilm_dir(), documents=["ok", {"body": "x"}], embedder=minilm())
    with pytest.raises(SearchError, match="'source' is set by the index"):
        SemanticIndex.create("nodata", model=minilm_dir(), documents=[{"text": "x", "source": "y"}], embedder=minilm())
    with pytest.raises(SearchError, match="given twice"):
        SemanticIndex.create("nodata", model=minilm_dir(), documents=["a", "b"], ids=["1", "1"], embedder=minilm())
    with pytest.raises(SearchError, match="not an embedding model"):
        SemanticIndex.create("nodata", model=tmp_path, documents=["a"])
    assert not (indexes_dir() / "nodata").exists()


def test_a_damaged_index_is_a_clear_error(home):
    SemanticIndex.create("damaged", model=minilm_dir(), documents=["one", "two"], embedder=minilm())
    vectors = indexes_dir() / "damaged" / "vectors.usearch"
    vectors.write_bytes(vectors.read_bytes()[:100])
    with pytest.raises(SearchError, match="index 'damaged' is damaged.*llmasos index rm"):
        SemanticIndex.open("damaged")
    vectors.unlink()
    with pytest.raises(SearchError, match="index 'damaged' is damaged"):
        SemanticIndex.open("damaged")
    (indexes_dir() / "damaged" / "index.json").write_text("{not json")
    with pytest.raises(SearchError, match="index 'damaged' is damaged"):
        SemanticIndex.open("damaged")
    remove_index("damaged")


def test_a_failed_create_leaves_no_directory(home, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": "fine too"}) + "\n{broken\n")
    with pytest.raises(SearchError, match="line 3: not valid JSON"):
        SemanticIndex.create("broken", model=minilm_dir(), data=data, embedder=minilm())

    class FailingEmbedder:  # fails half-way through embedding, after the chunks table was written
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def encode_ids(self, *args, **kwargs):
            self.calls += 1
            if self.calls > 1:
                raise RuntimeError("disk on fire")
            return self.inner.encode_ids(*args, **kwargs)

    texts = [f"sentence number {i}" for i in range(130)]  # two slices of EMBED_SLICE
    with pytest.raises(RuntimeError, match="disk on fire"):
        SemanticIndex.create("broken", model=minilm_dir(), documents=texts, embedder=FailingEmbedder(minilm()))
    assert not (indexes_dir() / "broken").exists()
    assert not [p for p in indexes_dir().iterdir() if "broken" in p.name and not p.name.endswith(".lock")]
    # a failed add leaves the index as it was
    index = SemanticIndex.create("kept", model=minilm_dir(), documents=["one", "two"], embedder=minilm())
    failing = SemanticIndex.open("kept", embedder=FailingEmbedder(minilm()))
    failing._embedder.calls = 1
    with pytest.raises(RuntimeError, match="disk on fire"):
        failing.add(["three"])
    assert SemanticIndex.open("kept", embedder=minilm()).num_chunks == 2 == index.num_chunks


def test_concurrent_writers_lose_nothing(home):
    from concurrent.futures import ThreadPoolExecutor

    SemanticIndex.create("shared", model=minilm_dir(), documents=["first"], ids=["first"], embedder=minilm())

    def add(worker: int) -> None:  # each writer holds its own (soon stale) copy, as another process would
        SemanticIndex.open("shared", embedder=minilm()).add([f"note {worker}-{i}" for i in range(3)],
                                                            ids=[f"{worker}-{i}" for i in range(3)])

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(add, range(3)))
    reopened = SemanticIndex.open("shared", embedder=minilm())
    assert reopened.num_chunks == 10 and reopened.manifest["num_documents"] == 10
    expected = {"first"} | {f"{worker}-{i}" for worker in range(3) for i in range(3)}
    assert {hit.id for hit in reopened.query("note", k=20)} == expected
