"""POST /classify, /v1/score and /v1/rerank on a real server: tiny random BERT and Qwen2 sequence classifiers and a
one-label BERT cross-encoder against transformers, all-MiniLM-L6-v2 against sentence-transformers' cosine
similarity; wrong kinds of model and bad bodies are OpenAI-shaped 400s, and every answer is metered."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from conftest import assert_error, create_key, start_service
from encoders_support import bert_classifier, minilm_dir, qwen2_classifier, reference_embeddings

from llmasos.library.importer import import_directory
from llmasos.server.auth import usage_summary
from llmasos.server.lifecycle import ModelManager
from llmasos.server.serving import Service, free_port
from llmasos.server.state import ServerSettings

BERT, QWEN, CROSS, ENCODER, DECODER = "bert-cls", "qwen-cls", "cross", "minilm", "tiny"
TEXTS = ["the quick brown fox", "to be or not to be", "operating systems schedule processes", "sea of troubles"]
QUERY = "which fox is quick"


def hf_logits(directory: Path, texts: list[str], pairs: list[str] | None = None) -> torch.Tensor:
    """transformers' logits of each text (or pair) alone, (len(texts), num_labels)."""
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(directory)
    model = tf.AutoModelForSequenceClassification.from_pretrained(directory).eval()
    rows = []
    for i, text in enumerate(texts):
        batch = tokenizer(text, pairs[i] if pairs else None, return_tensors="pt",
                          return_token_type_ids=model.config.model_type == "bert")
        with torch.no_grad():
            rows.append(model(**batch).logits[0])
    return torch.stack(rows)


@pytest.fixture(scope="module")
def directories(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("classifiers")
    return {BERT: bert_classifier(root / BERT, 3), QWEN: qwen2_classifier(root / QWEN, 2),
            CROSS: bert_classifier(root / CROSS, 1, seed=1)}


@pytest.fixture(scope="module")
def service(home, checkpoint, directories):
    service = start_service({**directories, ENCODER: minilm_dir(), DECODER: checkpoint})
    yield service
    service.stop()


def post(service, path: str, body: dict, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(service.base_url + path, json=body, headers=headers, timeout=60)


@pytest.mark.parametrize("model", [BERT, QWEN])
def test_classify_equals_transformers_softmax(service, directories, model):
    response = post(service, "/classify", {"model": model, "input": TEXTS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == model and body["id"].startswith("classify-")
    expected = torch.softmax(hf_logits(directories[model], TEXTS), dim=-1)
    ours = torch.tensor([row["probs"] for row in body["data"]])
    assert torch.allclose(ours, expected, atol=1e-5), (ours, expected)
    labels = [f"LABEL_{i}" for i in expected.argmax(-1).tolist()]
    assert [row["label"] for row in body["data"]] == labels
    assert [row["index"] for row in body["data"]] == list(range(len(TEXTS)))
    assert {row["num_classes"] for row in body["data"]} == {expected.shape[1]}
    classifier = service.models[model].llm
    tokens = sum(len(ids) for ids, _ in classifier.prepare(TEXTS))
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    single = post(service, "/classify", {"model": model, "input": TEXTS[0]}).json()["data"]
    assert len(single) == 1 and torch.allclose(torch.tensor(single[0]["probs"]), expected[0], atol=1e-5)


def test_score_of_an_embedding_model_is_sentence_transformers_cosine(service):
    vectors = reference_embeddings(minilm_dir(), [QUERY, *TEXTS])
    expected = torch.nn.functional.cosine_similarity(vectors[:1], vectors[1:], dim=-1)
    body = post(service, "/v1/score", {"model": ENCODER, "text_1": QUERY, "text_2": TEXTS}).json()
    assert [row["object"] for row in body["data"]] == ["score"] * len(TEXTS)
    ours = torch.tensor([row["score"] for row in body["data"]])
    assert torch.allclose(ours, expected, atol=1e-5), (ours, expected)
    assert body["usage"]["prompt_tokens"] > 0
    # Equal-length lists are scored pairwise.
    pairwise = post(service, "/v1/score", {"model": ENCODER, "text_1": TEXTS, "text_2": TEXTS[::-1]}).json()
    first, second = reference_embeddings(minilm_dir(), TEXTS), reference_embeddings(minilm_dir(), TEXTS[::-1])
    expected_pairs = torch.nn.functional.cosine_similarity(first, second, dim=-1)
    assert torch.allclose(torch.tensor([row["score"] for row in pairwise["data"]]), expected_pairs, atol=1e-5)


def test_score_of_a_cross_encoder_is_sigmoid_of_its_logit(service, directories):
    body = post(service, "/v1/score", {"model": CROSS, "text_1": QUERY, "text_2": TEXTS}).json()
    expected = torch.sigmoid(hf_logits(directories[CROSS], [QUERY] * len(TEXTS), TEXTS)[:, 0])
    ours = torch.tensor([row["score"] for row in body["data"]])
    assert torch.allclose(ours, expected, atol=1e-5), (ours, expected)


@pytest.mark.parametrize("model", [CROSS, ENCODER])
def test_rerank_orders_documents_as_the_scores(service, model):
    scores = [row["score"] for row in
              post(service, "/v1/score", {"model": model, "text_1": QUERY, "text_2": TEXTS}).json()["data"]]
    body = post(service, "/v1/rerank", {"model": model, "query": QUERY, "documents": TEXTS}).json()
    order = sorted(range(len(TEXTS)), key=lambda i: -scores[i])
    assert [row["index"] for row in body["results"]] == order
    assert [row["document"]["text"] for row in body["results"]] == [TEXTS[i] for i in order]
    assert all(abs(row["relevance_score"] - scores[row["index"]]) < 1e-6 for row in body["results"])
    top = post(service, "/v1/rerank", {"model": model, "query": QUERY, "documents": TEXTS, "top_n": 2}).json()
    assert [row["index"] for row in top["results"]] == order[:2] and top["usage"]["total_tokens"] > 0


def test_wrong_kind_of_model_and_bad_bodies_are_400(service):
    error = assert_error(post(service, "/classify", {"model": DECODER, "input": "x"}), 400, "invalid_request_error",
                         "model_not_supported")
    assert error["param"] == "model" and "/classify" in error["message"]
    error = assert_error(post(service, "/classify", {"model": ENCODER, "input": "x"}), 400, code="model_not_supported")
    assert "/v1/embeddings" in error["message"]
    error = assert_error(post(service, "/v1/score", {"model": DECODER, "text_1": "a", "text_2": "b"}), 400,
                         code="model_not_supported")
    assert "/v1/score" in error["message"]
    error = assert_error(post(service, "/v1/score", {"model": BERT, "text_1": "a", "text_2": "b"}), 400,
                         code="model_not_supported")
    assert "/classify" in error["message"]
    error = assert_error(post(service, "/v1/embeddings", {"model": BERT, "input": "x"}), 400,
                         code="model_not_supported")
    assert "/classify" in error["message"]
    assert "/classify" in assert_error(post(service, "/v1/completions", {"model": QWEN, "prompt": "x"}),
                                       400)["message"]
    assert assert_error(post(service, "/classify", {"model": BERT, "input": []}), 400)["param"] == "input"
    assert assert_error(post(service, "/classify", {"model": BERT, "input": [""]}), 400)["param"] == "input"
    assert assert_error(post(service, "/classify", {"model": BERT, "input": [1, 2]}), 400)
    assert assert_error(post(service, "/classify", {"model": BERT, "input": "word " * 500}), 400)["param"] == "input"
    assert assert_error(post(service, "/v1/score", {"model": CROSS, "text_1": ["a", "b"], "text_2": ["a", "b", "c"]}),
                        400)["param"] == "text_1"
    assert assert_error(post(service, "/v1/score", {"model": CROSS, "text_1": "a", "text_2": []}),
                        400)["param"] == "text_2"
    assert assert_error(post(service, "/v1/rerank", {"model": CROSS, "query": "", "documents": ["a"]}),
                        400)["param"] == "query"
    assert assert_error(post(service, "/v1/rerank", {"model": CROSS, "query": "q", "documents": []}),
                        400)["param"] == "documents"
    assert assert_error(post(service, "/v1/rerank", {"model": CROSS, "query": "q", "documents": ["a"], "top_n": 0}),
                        400)["param"] == "top_n"
    assert_error(post(service, "/classify", {"model": "nope", "input": "x"}), 404, code="model_not_found")


def test_a_library_classifier_loads_on_demand(home, directories):
    """ModelManager loads a classifier from the library on its first request; /api/ps reports its weights."""
    import_directory(directories[BERT], "library-cls")
    manager = ModelManager(library=True, load_options={"dtype": "float32"}, max_loaded=2, keep_alive=60.0)
    library = Service(manager, ServerSettings(host="127.0.0.1", port=free_port())).start()
    try:
        body = post(library, "/classify", {"model": "library-cls", "input": TEXTS}).json()
        expected = torch.softmax(hf_logits(directories[BERT], TEXTS), dim=-1)
        assert torch.allclose(torch.tensor([row["probs"] for row in body["data"]]), expected, atol=1e-5)
        entry = {m["name"]: m for m in httpx.get(library.base_url + "/api/ps").json()["models"]}["library-cls"]
        import transformers as tf

        reference = tf.AutoModelForSequenceClassification.from_pretrained(directories[BERT])
        weights = sum(p.numel() * 4 for p in reference.parameters())  # float32; the pooler is part of the head
        assert entry["weight_bytes"] == weights and entry["kv_cache_bytes"] == 0 and entry["state"] == "loaded"
    finally:
        library.stop()


def test_keys_allow_lists_and_metering(service):
    key = create_key("scorer", "--models", f"{BERT},{CROSS}")
    assert post(service, "/classify", {"model": BERT, "input": TEXTS[:2]}, key).status_code == 200
    assert post(service, "/v1/rerank", {"model": CROSS, "query": QUERY, "documents": TEXTS}, key).status_code == 200
    assert_error(post(service, "/v1/score", {"model": ENCODER, "text_1": "a", "text_2": "b"}, key), 403,
                 code="model_not_allowed")
    assert_error(post(service, "/classify", {"model": BERT, "input": "x"}, "sk-wrong"), 401)
    rows = {row["model"]: row for row in usage_summary("scorer")}
    assert set(rows) == {BERT, CROSS} and all(row["requests"] == 1 for row in rows.values())
    assert rows[BERT]["prompt_tokens"] == sum(len(ids) for ids, _ in service.models[BERT].llm.prepare(TEXTS[:2]))
    assert rows[CROSS]["prompt_tokens"] > 0 and rows[CROSS]["completion_tokens"] == 0
    metrics = httpx.get(service.base_url + "/metrics", headers={"Authorization": f"Bearer {key}"}).text
    assert f'llmasos_prompt_tokens_total{{model="{CROSS}"}}' in metrics
