"""References the eval tests compare against, all built on transformers: the HF perplexity guide's sliding-window
loop, lm-evaluation-harness's choice log-likelihood, and a vLLM-shaped OpenAI-compatible HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


def reference_nll(model, tokenizer, texts: list[str], max_length: int, stride: int) -> tuple[float, int]:
    """The HF perplexity guide's loop, scored from transformers' logits: (total NLL in nats, scored tokens)."""
    nll_sum, num_tokens = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        seq_len = ids.size(1)
        prev_end = 0
        for begin in range(0, seq_len, stride):
            end = min(begin + max_length, seq_len)
            target_len = end - prev_end
            input_ids = ids[:, begin:end]
            labels = input_ids.clone()
            labels[:, :-target_len] = -100
            with torch.no_grad():
                logits = model(input_ids).logits.double()
            logprobs = torch.log_softmax(logits[0, :-1], dim=-1)
            shifted = labels[0, 1:]
            mask = shifted != -100
            nll_sum -= logprobs[mask].gather(1, shifted[mask].unsqueeze(1)).sum().item()
            num_tokens += int(mask.sum())
            prev_end = end
            if end == seq_len:
                break
    return nll_sum, num_tokens


def reference_loglikelihood(model, tokenizer, prompt: str, choice: str, max_length: int = 10**9) -> float:
    """lm-evaluation-harness's split (trailing prompt whitespace moves to the choice), scored on transformers."""
    context = prompt.rstrip()
    continuation = prompt[len(context):] + choice
    num_context = len(tokenizer(context)["input_ids"])
    whole = tokenizer(context + continuation)["input_ids"]
    cut = max(0, len(whole) - max_length)
    ids = torch.tensor([whole[cut:]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return sum(logprobs[p - 1, ids[0, p]].item() for p in range(num_context - cut, ids.size(1)))


class _Handler(BaseHTTPRequestHandler):
    server: _ReferenceHTTPServer

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": {"message": message, "type": "invalid_request_error"}})

    def _authorized(self) -> bool:
        key = self.server.api_key
        if key and self.headers.get("Authorization") != f"Bearer {key}":
            self._error(401, "Incorrect API key provided.")
            return False
        return True

    def do_GET(self) -> None:
        if not self._authorized():
            return
        if self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.server.model_id, "object": "model",
                                                         "max_model_len": self.server.max_model_len}]})
        else:
            self._error(404, "not found")

    def do_POST(self) -> None:
        if not self._authorized():
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        routes = {"/v1/completions": self.server.completion, "/v1/chat/completions": self.server.chat}
        if self.server.has_tokenize:
            routes["/tokenize"] = self.server.tokenize
        if self.path not in routes:
            return self._error(404, "not found")
        if body.get("model") != self.server.model_id:
            return self._error(404, f"The model `{body.get('model')}` does not exist.")
        status, answer = routes[self.path](body)
        self._send(status, answer)


class _ReferenceHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, model, tokenizer, model_id: str, max_model_len: int, has_tokenize: bool, api_key: str | None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.max_model_len, self.has_tokenize, self.api_key = max_model_len, has_tokenize, api_key
        self.lock = threading.Lock()
        self.requests: list[dict] = []

    def tokenize(self, body: dict) -> tuple[int, dict]:
        ids = self.tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))["input_ids"]
        return 200, {"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len}

    def _greedy(self, ids: list[int], body: dict) -> str:
        with self.lock, torch.no_grad():
            out = self.model.generate(torch.tensor([ids]), max_new_tokens=body.get("max_tokens", 16),
                                      do_sample=False, pad_token_id=2)
        text = self.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
        for stop in ([body["stop"]] if isinstance(body.get("stop"), str) else body.get("stop") or []):
            text = text.split(stop)[0]
        return text

    def completion(self, body: dict) -> tuple[int, dict]:
        self.requests.append(body)
        prompt = body["prompt"]
        ids = self.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
        if len(ids) > self.max_model_len:
            return 400, {"error": {"message": f"This model's maximum context length is {self.max_model_len} tokens. "
                                              f"However, you requested {len(ids)} tokens in the messages."}}
        if not (body.get("echo") and body.get("max_tokens") == 0):
            return 200, {"object": "text_completion", "choices": [{"index": 0, "text": self._greedy(ids, body),
                                                                  "logprobs": None, "finish_reason": "length"}]}
        with self.lock, torch.no_grad():
            logprobs = torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), dim=-1)
        chosen = [None] + [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))]
        tokens = [self.tokenizer.decode([i]) for i in ids]
        return 200, {"object": "text_completion", "choices": [{
            "index": 0, "text": "".join(tokens), "finish_reason": "length",
            "logprobs": {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": None, "text_offset": None}}]}

    def chat(self, body: dict) -> tuple[int, dict]:
        prompt = self.tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
        text = self._greedy(self.tokenizer(prompt, add_special_tokens=False)["input_ids"], body)
        return 200, {"object": "chat.completion", "choices": [{"index": 0, "finish_reason": "length",
                                                               "message": {"role": "assistant", "content": text}}]}


class ReferenceServer:
    """A vLLM-shaped server answering from a transformers model: /v1/models (with max_model_len), /tokenize (unless
    `has_tokenize` is False), /v1/completions (echo + logprobs + max_tokens=0 scores the prompt) and chat."""

    def __init__(self, model, tokenizer, *, model_id: str = "reference", max_model_len: int = 512,
                 has_tokenize: bool = True, api_key: str | None = None) -> None:
        self.httpd = _ReferenceHTTPServer(model, tokenizer, model_id, max_model_len, has_tokenize, api_key)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ReferenceServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
