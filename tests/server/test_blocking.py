"""No database statement runs on the event loop: a listener on the engine records every statement executed on a
thread that is running an asyncio loop, while a keyed server (with limits on the key) answers completions (streamed
and not), chat, embeddings, scores, reranking, /v1/models, /v1/usage, refused requests and 429s, on SQLite and
PostgreSQL."""

from __future__ import annotations

import httpx
import pytest
from conftest import MODEL, start_service, watch_statements
from encoders_support import minilm_dir

from llmasos.server import auth

ENCODER = "minilm"


@pytest.fixture(scope="module")
def watched(home, checkpoint):
    """A server with keys, and the statements the database saw on an event-loop thread."""
    secret = auth.create_key("watched", rpm=1000, tpm=10**6, token_quota=10**6, max_concurrency=8)
    limited = auth.create_key("limited", rpm=1)
    with watch_statements() as seen:
        service = start_service({MODEL: checkpoint, ENCODER: minilm_dir()})
        yield service, secret, limited, seen.on_loop
        service.stop()


def test_no_database_call_runs_on_the_event_loop(watched):
    service, secret, limited, on_loop = watched
    headers = {"Authorization": f"Bearer {secret}"}
    with httpx.Client(base_url=service.base_url, headers=headers, timeout=60) as client:
        assert client.get("/v1/models").status_code == 200
        body = {"model": MODEL, "prompt": "to be", "max_tokens": 3}
        assert client.post("/v1/completions", json=body).status_code == 200
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            assert response.status_code == 200 and list(response.iter_lines())
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        assert client.post("/v1/chat/completions", json=chat).status_code == 200
        assert client.post("/v1/embeddings", json={"model": ENCODER, "input": "to be"}).status_code == 200
        score = {"model": ENCODER, "text_1": "to be", "text_2": ["or not", "to be"]}
        assert client.post("/v1/score", json=score).status_code == 200
        rerank = {"model": ENCODER, "query": "to be", "documents": ["or not", "to be"], "top_n": 1}
        assert client.post("/v1/rerank", json=rerank).status_code == 200
        assert client.post("/classify", json={"model": ENCODER, "input": "x"}).status_code == 400
        assert client.get("/v1/usage").status_code == 200
        assert client.post("/v1/completions", json={"model": MODEL}).status_code == 400
        assert client.get("/v1/models", headers={"Authorization": "Bearer sk-llmasos-" + "x" * 43}).status_code == 401
        limited_headers = {"Authorization": f"Bearer {limited}"}
        assert client.post("/v1/completions", json=body, headers=limited_headers).status_code == 200
        assert client.post("/v1/completions", json=body, headers=limited_headers).status_code == 429
    assert on_loop == []
