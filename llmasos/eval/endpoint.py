"""The endpoint scorer backend: evaluations against any OpenAI-compatible server (LLMasOS, vLLM, ...) over httpx.

Scoring is POST /v1/completions with echo, logprobs=1 and max_tokens=0, reading choices[0].logprobs.token_logprobs
(first entry null). Token ids come from the vLLM-style POST /tokenize when the server has it, so long texts are cut
into the same token windows as in process; without it, each text is scored whole from its echo.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from llmasos.errors import EndpointError
from llmasos.eval.backends import GenerationParams, Prompt

API_KEY_ENV = "LLMASOS_API_KEY"
# How servers without vLLM's /tokenize answer it: no such route, or a route of another shape refusing our body.
_NO_TOKENIZE = (400, 404, 405, 422, 501)


def _base_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise EndpointError(f"endpoint {url!r} must be an http:// or https:// URL, e.g. http://127.0.0.1:8000")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error", body.get("detail", body))
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        return str(error)[:300]
    return str(body)[:300]


class EndpointBackend:
    """An OpenAI-compatible server. `model` is the served model id (the only served one when omitted)."""

    kind = "endpoint"

    def __init__(self, url: str, model: str | None = None, *, api_key: str | None = None,
                 context_length: int | None = None, concurrency: int = 8, timeout: float = 300.0) -> None:
        self.base_url = _base_url(url)
        api_key = api_key or os.environ.get(API_KEY_ENV)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self._client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        self._pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="llmasos-eval")
        self._context_length = context_length
        self._can_tokenize: bool | None = None
        self._models: list[dict[str, Any]] | None = None
        try:
            self.model_name = model or self._only_model()
        except EndpointError:
            self.close()
            raise

    # -- HTTP ------------------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict | None = None, *,
                 missing: tuple[int, ...] = ()) -> dict[str, Any] | None:
        """The JSON answer; None when the status is one of `missing` (the server lacks what was asked)."""
        url = f"{self.base_url}{path}"
        try:
            response = self._client.request(method, path, json=body)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise EndpointError(f"cannot reach {self.base_url} ({exc}); check that the server is running and that "
                                "--endpoint names its address") from None
        except httpx.TimeoutException:
            raise EndpointError(f"{url} did not answer within {self.timeout:g} s; the server may be overloaded, "
                                "or raise the timeout") from None
        except httpx.HTTPError as exc:
            raise EndpointError(f"request to {url} failed: {exc}") from None
        if response.status_code in missing:
            return None
        if response.status_code in (401, 403):
            raise EndpointError(f"{url} refused the request ({response.status_code}: {_error_message(response)}); "
                                f"pass a valid key with --api-key or the {API_KEY_ENV} environment variable")
        if response.status_code >= 400:
            raise EndpointError(f"{url} answered {response.status_code}: {_error_message(response)}")
        try:
            data = response.json()
        except ValueError:
            raise EndpointError(f"{url} did not answer JSON; is {self.base_url} an OpenAI-compatible server?") from None
        if not isinstance(data, dict):
            raise EndpointError(f"{url} answered {type(data).__name__}, not a JSON object")
        return data

    def _post(self, path: str, body: dict, **kwargs) -> dict[str, Any] | None:
        return self._request("POST", path, body, **kwargs)

    def _map(self, function, items: list) -> list:
        return list(self._pool.map(function, items)) if len(items) > 1 else [function(item) for item in items]

    # -- models and context ----------------------------------------------------------------------------------------
    def models(self) -> list[dict[str, Any]]:
        if self._models is None:
            data = self._request("GET", "/v1/models", missing=(404, 405, 501))
            models = data.get("data") if data is not None else []  # no listing: the caller must name the model
            if not isinstance(models, list):
                raise EndpointError(f"{self.base_url}/v1/models has no model list; is it an OpenAI-compatible server?")
            self._models = [m for m in models if isinstance(m, dict) and isinstance(m.get("id"), str)]
        return self._models

    def _only_model(self) -> str:
        ids = [m["id"] for m in self.models()]
        if not ids:
            raise EndpointError(f"{self.base_url}/v1/models lists no model; pass --model with the served model id")
        if len(ids) != 1:
            listed = ", ".join(ids) or "none"
            raise EndpointError(f"{self.base_url} serves {len(ids)} models ({listed}); pass --model with one of them")
        return ids[0]

    def context_length(self) -> int | None:
        if self._context_length is None:
            for model in self.models():
                if model["id"] == self.model_name and isinstance(model.get("max_model_len"), int):
                    self._context_length = model["max_model_len"]
        return self._context_length

    # -- scoring ---------------------------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int] | None:
        if self._can_tokenize is False:
            return None
        body = {"model": self.model_name, "prompt": text, "add_special_tokens": True}
        if self._can_tokenize is None:  # probing: anything but vLLM's answer means the server has no such route
            data = self._post("/tokenize", body, missing=_NO_TOKENIZE)
            tokens = data.get("tokens") if data is not None else None
            if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) for t in tokens):
                self._can_tokenize = False
                return None
            self._can_tokenize = True
        else:
            data = self._post("/tokenize", body)
            tokens = data.get("tokens")
            if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
                raise EndpointError(f"{self.base_url}/tokenize answered without a list of token ids in \"tokens\"")
        if self._context_length is None and isinstance(data.get("max_model_len"), int):
            self._context_length = data["max_model_len"]
        return tokens

    def _echo(self, prompt: str | list[int]) -> list[float | None]:
        body = {"model": self.model_name, "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 0,
                "temperature": 0}
        data = self._post("/v1/completions", body)
        choices = data.get("choices")
        logprobs = choices[0].get("logprobs") if isinstance(choices, list) and choices and isinstance(
            choices[0], dict) else None
        values = logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
        if not isinstance(values, list) or not values:
            raise EndpointError(
                f"{self.base_url}/v1/completions returned no prompt logprobs for an echo request (echo=true, "
                "logprobs=1, max_tokens=0), so it cannot score text; use a server that supports them, such as "
                "`llmasos serve` or vLLM")
        if isinstance(prompt, list):
            if len(values) < len(prompt):
                raise EndpointError(f"{self.base_url} echoed {len(values)} logprobs for a prompt of {len(prompt)} "
                                    "tokens; it does not echo the whole prompt")
            values = values[: len(prompt)]
        if any(not isinstance(v, (int, float)) for v in values[1:]):
            raise EndpointError(f"{self.base_url} echoed a null logprob after the first token; it cannot score text")
        return [None] + [float(v) for v in values[1:]]

    def score(self, sequences: list[list[int]]) -> list[list[float | None]]:
        return self._map(self._echo, [list(ids) for ids in sequences])

    def score_texts(self, texts: list[str]) -> list[list[float | None]]:
        return self._map(self._echo, list(texts))

    # -- generation ------------------------------------------------------------------------------------------------
    def _generate_one(self, prompt: Prompt, params: GenerationParams) -> str:
        body: dict[str, Any] = {"model": self.model_name, "max_tokens": params.max_tokens,
                                "temperature": params.temperature, "top_p": params.top_p}
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        chat = isinstance(prompt, list)
        data = self._post("/v1/chat/completions" if chat else "/v1/completions",
                          {**body, "messages": prompt} if chat else {**body, "prompt": prompt})
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
        except (KeyError, IndexError, TypeError):
            raise EndpointError(f"{self.base_url} answered a {'chat ' if chat else ''}completion without "
                                f"{'choices[0].message.content' if chat else 'choices[0].text'}") from None
        return text or ""

    def generate(self, prompts: list[Prompt], params: GenerationParams) -> list[str]:
        return self._map(lambda prompt: self._generate_one(prompt, params), list(prompts))

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._client.close()
