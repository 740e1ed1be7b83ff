"""Evaluations through an OpenAI-compatible endpoint: the same numbers as in process, and clear errors for a closed
port, a server without logprobs, a server without /tokenize and a refused API key."""

from __future__ import annotations

import json
import math
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner
from support import CORPUS, family_config, hf_tokenizer, make_checkpoint
from support_server import start_test_server

from llmasos import LLM
from llmasos.cli.main import cli
from llmasos.errors import EndpointError
from llmasos.eval import GenerationParams, PromptFormat, generate_and_score, multiple_choice, perplexity
from llmasos.eval.data import read_jsonl, read_texts
from llmasos.eval.endpoint import EndpointBackend

from .references import ReferenceServer, reference_nll

EVALS = Path(__file__).resolve().parents[2] / "evals"
SHORT = "To be, or not to be, that is the question."
LONG = CORPUS * 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    reference = make_checkpoint(directory, family_config("llama", num_hidden_layers=2))
    return directory, reference


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM.load(checkpoint[0], dtype="float32")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again on leaving: nothing listens there


class _NoLogprobsHandler(BaseHTTPRequestHandler):
    """Answers every completion with text and "logprobs": null, as servers without echo support do."""

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.path != "/v1/completions":
            self.send_error(404)
            return
        body = json.dumps({"object": "text_completion", "model": "m", "choices": [
            {"index": 0, "text": "hello", "logprobs": None, "finish_reason": "length"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_unreachable_endpoint_is_a_clear_error():
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(EndpointError, match=f"cannot reach {url}.*check that the server is running"):
        perplexity(EndpointBackend(url, "m", context_length=64), SHORT)
    with pytest.raises(EndpointError, match=f"cannot reach {url}"):  # not "pass --context-length"
        perplexity(EndpointBackend(url, "m"), SHORT)
    result = CliRunner().invoke(cli, ["eval", "perplexity", "--endpoint", url, "--data",
                                      str(EVALS / "tiny_text.jsonl")])
    assert result.exit_code == 1 and f"error: cannot reach {url}" in result.stderr
    assert "Traceback" not in result.output


def test_endpoint_without_logprobs_is_a_clear_error():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _NoLogprobsHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        with pytest.raises(EndpointError, match="lists no model; pass --model"):
            EndpointBackend(url)  # it has no /v1/models
        with pytest.raises(ValueError, match="does not say its context length; pass --context-length"):
            perplexity(EndpointBackend(url, "m"), SHORT)
        backend = EndpointBackend(url, "m", context_length=64)
        with pytest.raises(EndpointError, match="returned no prompt logprobs .*cannot score text"):
            perplexity(backend, SHORT)
        with pytest.raises(EndpointError, match="returned no prompt logprobs"):
            multiple_choice(backend, read_jsonl(EVALS / "tiny_mc.jsonl")[:1])
        assert backend.generate(["hi"], GenerationParams(max_tokens=4)) == ["hello"]  # generation needs no logprobs
    finally:
        httpd.shutdown()
        httpd.server_close()


# -- against a vLLM-shaped server answering from transformers ---------------------------------------------------------
@pytest.fixture(scope="module")
def vllm_like(checkpoint):
    with ReferenceServer(checkpoint[1], hf_tokenizer(), max_model_len=512, api_key="sk-test") as server:
        yield server


def test_endpoint_perplexity_uses_the_same_windows_as_in_process(vllm_like, checkpoint, llm):
    backend = EndpointBackend(vllm_like.url + "/v1", api_key="sk-test")
    assert backend.model_name == "reference" and backend.context_length() == 512
    texts = [SHORT, LONG]
    remote = perplexity(backend, texts, context_length=64, stride=24)
    local = perplexity(llm, texts, context_length=64, stride=24)
    nll, num_tokens = reference_nll(checkpoint[1], hf_tokenizer(), texts, 64, 24)
    assert remote.num_tokens == local.num_tokens == num_tokens and remote.num_windows == local.num_windows > 2
    assert remote.perplexity == pytest.approx(math.exp(nll / num_tokens), rel=1e-4)
    assert remote.perplexity == pytest.approx(local.perplexity, rel=1e-3)
    assert remote.bits_per_byte == pytest.approx(local.bits_per_byte, rel=1e-3)
    windows = [r for r in vllm_like.httpd.requests if r.get("echo")]
    assert all(isinstance(r["prompt"], list) and len(r["prompt"]) <= 64 and r["max_tokens"] == 0 for r in windows)


def test_without_tokenize_a_text_that_fits_is_scored_whole(checkpoint, llm):
    with ReferenceServer(checkpoint[1], hf_tokenizer(), has_tokenize=False, max_model_len=512) as server:
        backend = EndpointBackend(server.url)
        remote = perplexity(backend, [SHORT, LONG])  # both fit in 512 tokens: one window each
        local = perplexity(llm, [SHORT, LONG])
        assert remote.perplexity == pytest.approx(local.perplexity, rel=1e-3)
        assert remote.num_tokens == local.num_tokens
        assert all(isinstance(r["prompt"], str) for r in server.httpd.requests)
        with pytest.raises(EndpointError, match="longer than the context length 64.*no POST /tokenize"):
            perplexity(backend, LONG, context_length=64, stride=32)
        mc = read_jsonl(EVALS / "tiny_mc.jsonl")
        assert multiple_choice(backend, mc).loglikelihoods == [
            pytest.approx(t, abs=1e-3) for t in multiple_choice(llm, mc).loglikelihoods]


def test_endpoint_multiple_choice_and_generation(vllm_like, llm):
    backend = EndpointBackend(vllm_like.url, "reference", api_key="sk-test", concurrency=4)
    examples = read_jsonl(EVALS / "tiny_mc.jsonl")
    remote, local = multiple_choice(backend, examples), multiple_choice(llm, examples)
    assert remote.loglikelihoods == [pytest.approx(t, abs=1e-3) for t in local.loglikelihoods]
    assert (remote.accuracy, remote.accuracy_norm) == (local.accuracy, local.accuracy_norm)

    qa = read_jsonl(EVALS / "tiny_qa.jsonl")[:3]
    result = generate_and_score(backend, qa, "f1", prompt_format=PromptFormat(template="Q: {question}\nA:"),
                                params=GenerationParams(max_tokens=5, stop=["\n"]))
    sent = [r for r in vllm_like.httpd.requests if r.get("prompt") in result.prompts]
    assert sorted(r["prompt"] for r in sent) == sorted(result.prompts)
    assert all(r["max_tokens"] == 5 and r["stop"] == ["\n"] and r["temperature"] == 0 for r in sent)
    chat = generate_and_score(backend, read_jsonl(EVALS / "tiny_summaries.jsonl")[:2], "rouge",
                              params=GenerationParams(max_tokens=4))
    assert len(chat.predictions) == 2 and set(chat.metrics) == {"rouge1", "rouge2", "rougeL"}


def test_refused_key_and_unknown_model_are_clear_errors(vllm_like):
    with pytest.raises(EndpointError, match="refused the request .*401.*--api-key"):
        EndpointBackend(vllm_like.url, api_key="sk-wrong")
    with pytest.raises(EndpointError, match="answered 404: The model `nope` does not exist"):
        perplexity(EndpointBackend(vllm_like.url, "nope", api_key="sk-test", context_length=64), SHORT)


def test_cli_against_an_endpoint_reads_the_key_from_the_environment(vllm_like, monkeypatch, llm):
    monkeypatch.setenv("LLMASOS_API_KEY", "sk-test")
    result = CliRunner().invoke(cli, ["eval", "perplexity", "--endpoint", vllm_like.url, "--data",
                                      str(EVALS / "tiny_text.jsonl"), "--context-length", "64", "--stride", "32",
                                      "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    local = perplexity(llm, read_texts(EVALS / "tiny_text.jsonl"), context_length=64, stride=32)
    assert report["backend"] == "endpoint" and report["endpoint"] == vllm_like.url and report["model"] == "reference"
    assert report["metrics"]["perplexity"] == pytest.approx(local.perplexity, rel=1e-3)


# -- against LLMasOS's own server -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def our_server(checkpoint):
    return start_test_server(checkpoint[0])


def test_our_server_gives_the_in_process_numbers(our_server, llm):
    backend = EndpointBackend(our_server)
    texts = [SHORT, LONG, "héllo wörld 日本語 🙂"]
    remote, local = perplexity(backend, texts), perplexity(llm, texts)  # each text fits: one window
    assert remote.num_tokens == local.num_tokens
    assert remote.perplexity == pytest.approx(local.perplexity, rel=1e-3)
    assert remote.bits_per_byte == pytest.approx(local.bits_per_byte, rel=1e-3)
    examples = read_jsonl(EVALS / "tiny_mc.jsonl")
    remote_mc, local_mc = multiple_choice(backend, examples), multiple_choice(llm, examples)
    assert remote_mc.loglikelihoods == [pytest.approx(t, abs=1e-3) for t in local_mc.loglikelihoods]
    params = GenerationParams(max_tokens=6, stop=["\n"])
    prompt_format = PromptFormat(template="Q: {question}\nA:")
    qa = read_jsonl(EVALS / "tiny_qa.jsonl")
    remote_gen = generate_and_score(backend, qa, ["exact_match", "f1"], prompt_format=prompt_format, params=params)
    local_gen = generate_and_score(llm, qa, ["exact_match", "f1"], prompt_format=prompt_format, params=params)
    assert remote_gen.predictions == local_gen.predictions
    chat = read_jsonl(EVALS / "tiny_summaries.jsonl")
    assert generate_and_score(backend, chat, "rouge", params=GenerationParams(max_tokens=8)).predictions == \
        generate_and_score(llm, chat, "rouge", params=GenerationParams(max_tokens=8)).predictions


def test_our_server_gives_the_in_process_windows(our_server, llm):
    """Texts longer than the context are cut into token windows, which needs the server's POST /tokenize."""
    backend = EndpointBackend(our_server)
    texts = [SHORT, LONG]
    remote = perplexity(backend, texts, context_length=64, stride=24)
    local = perplexity(llm, texts, context_length=64, stride=24)
    assert remote.num_tokens == local.num_tokens and remote.num_windows == local.num_windows > 2
    assert remote.perplexity == pytest.approx(local.perplexity, rel=1e-3)
    assert remote.bits_per_byte == pytest.approx(local.bits_per_byte, rel=1e-3)
