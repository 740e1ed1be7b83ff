"""GET /openapi.json: served behind the API keys, it names the real request models, and Schemathesis, driven by it
against a live server on loopback, finds no 5xx and no response that contradicts the schema."""

from __future__ import annotations

import os
import time

import httpx
import pytest
from conftest import MODEL, assert_error, create_key, start_service

schemathesis = pytest.importorskip("schemathesis", reason="a test dependency: pip install -e '.[test]'")

from hypothesis import HealthCheck, given, settings  # noqa: E402  (after the skip: hypothesis comes with schemathesis)
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.slow

EXAMPLES_PER_OPERATION = int(os.environ.get("LLMASOS_SCHEMATHESIS_EXAMPLES", "40"))
TIME_BUDGET = float(os.environ.get("LLMASOS_SCHEMATHESIS_SECONDS", "45"))  # the whole run, shared by operations


@pytest.fixture(scope="module")
def secured(home, checkpoint):
    """A server with one API key: /openapi.json must need it like every route but /health."""
    key = create_key("openapi-test")
    service = start_service({MODEL: checkpoint})
    yield service, key
    service.stop()


def test_openapi_needs_a_key(secured):
    service, key = secured
    assert_error(httpx.get(f"{service.base_url}/openapi.json"), 401, code="invalid_api_key")
    assert httpx.get(f"{service.base_url}/health").status_code == 200
    answer = httpx.get(f"{service.base_url}/openapi.json", headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 200


def test_openapi_describes_the_request_models(secured):
    service, key = secured
    schema = httpx.get(f"{service.base_url}/openapi.json", headers={"Authorization": f"Bearer {key}"}).json()
    components = schema["components"]["schemas"]
    bodies = {"/v1/completions": "CompletionRequest", "/v1/chat/completions": "ChatCompletionRequest",
              "/v1/embeddings": "EmbeddingRequest", "/tokenize": "TokenizeRequest", "/detokenize": "DetokenizeRequest"}
    for path, name in bodies.items():
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{name}"}
    assert {"model", "prompt", "max_tokens", "logprobs", "echo"} <= set(components["CompletionRequest"]["properties"])
    assert components["ChatCompletionRequest"]["required"] == ["model", "messages"]
    assert "model" not in components["TokenizeRequest"].get("required", [])  # optional with one model served
    assert "ChatMessage" in components and "HTTPValidationError" not in components
    assert schema["paths"]["/tokenizer_info"]["get"]["responses"]["200"]["content"]
    answer = schema["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]
    assert answer["application/json"]["schema"] == {"$ref": "#/components/schemas/CompletionResponse"}
    assert "text/event-stream" in answer  # stream: true
    assert schema["paths"]["/health"]["get"]["security"] == [] and schema["security"] == [{"bearer": []}]


def fuzz(operation, base_url: str, auth: dict[str, str], seconds: float) -> int:
    """Schemathesis cases of one operation, valid and invalid, for up to `seconds` (but at least one case): each must
    be answered without a 5xx and as the schema says. Returns how many ran."""
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance

    deadline = time.monotonic() + seconds
    modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
    strategy = st.one_of(*(operation.as_strategy(generation_mode=mode) for mode in modes))
    ran = 0

    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(case=strategy, real_model=st.booleans())
    def check(case, real_model):
        nonlocal ran
        if ran and time.monotonic() > deadline:
            return
        if real_model and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = MODEL  # a served model, or every generation would stop at the 404
        if real_model and "model_id" in (case.path_parameters or {}):
            case.path_parameters["model_id"] = MODEL
        if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int):
            case.body["max_tokens"] = min(case.body["max_tokens"], 8)  # bounded time, not bounded checks
        response = case.call(base_url=base_url, headers=auth, timeout=30)
        case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
        ran += 1

    check()
    return ran


def test_schemathesis_finds_no_server_error(secured):
    service, key = secured
    auth = {"Authorization": f"Bearer {key}"}
    schema = schemathesis.openapi.from_url(f"{service.base_url}/openapi.json", headers=auth)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    share = TIME_BUDGET / len(operations)  # each operation its share, however busy the machine
    ran = {operation.label: fuzz(operation, service.base_url, auth, share) for operation in operations}
    assert all(ran.values()), ran
