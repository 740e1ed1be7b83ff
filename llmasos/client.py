"""Python SDK for an LLMasOS (or any OpenAI-compatible) server: Client and AsyncClient with typed errors."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import quote

import httpx


class APIError(Exception):
    """An error answer from the server; `status`, `type`, `code`, `param` come from its OpenAI-shaped body."""

    def __init__(self, status: int, message: str, type: str | None = None, code: str | None = None,
                 param: str | None = None, headers: httpx.Headers | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or httpx.Headers()


class BadRequestError(APIError): ...
class AuthenticationError(APIError): ...
class PermissionDeniedError(APIError): ...
class NotFoundError(APIError): ...
class RequestTooLargeError(APIError): ...
class RateLimitError(APIError): ...
class ServiceUnavailableError(APIError): ...
class APIConnectionError(Exception):
    """The server could not be reached."""


_BY_STATUS = {400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
              413: RequestTooLargeError, 429: RateLimitError, 503: ServiceUnavailableError}


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json().get("error", {})
    except (ValueError, AttributeError):
        error = {"message": response.text}
    cls = _BY_STATUS.get(response.status_code, APIError)
    raise cls(response.status_code, error.get("message") or response.reason_phrase, error.get("type"),
              error.get("code"), error.get("param"), response.headers)


def _events(lines) -> Iterator[dict]:
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data.strip() == "[DONE]":
            return
        event = json.loads(data)
        if isinstance(event, dict) and "error" in event:  # the server failed after the stream had started
            error = event["error"] if isinstance(event["error"], dict) else {"message": str(event["error"])}
            raise APIError(500, error.get("message") or "the stream failed", error.get("type"), error.get("code"),
                           error.get("param"))
        yield event


class _Base:
    def __init__(self, base_url: str | None, api_key: str | None, timeout: float) -> None:
        base = base_url or os.environ.get("LLMASOS_BASE_URL") or "http://127.0.0.1:8000"
        self.base_url = base.rstrip("/").removesuffix("/v1")
        self.api_key = api_key if api_key is not None else os.environ.get("LLMASOS_API_KEY")
        self.timeout = timeout

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


class Client(_Base):
    """Synchronous client.

    >>> client = Client("http://127.0.0.1:8000", api_key="sk-llmasos-...")
    >>> client.chat("my-model", [{"role": "user", "content": "Hi"}])["choices"][0]["message"]["content"]
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 600.0) -> None:
        super().__init__(base_url, api_key, timeout)
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=self._headers())

    def _request(self, method: str, path: str, **kwargs) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise APIConnectionError(f"cannot reach {self.base_url}: {exc}") from None
        _raise_for(response)
        return response.json()

    def _stream(self, path: str, body: dict) -> Iterator[dict]:
        try:
            with self._http.stream("POST", path, json={**body, "stream": True}) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for(response)
                yield from _events(response.iter_lines())
        except httpx.TransportError as exc:
            raise APIConnectionError(f"cannot reach {self.base_url}: {exc}") from None

    def models(self) -> list[dict]:
        return self._request("GET", "/v1/models")["data"]

    def completions(self, model: str, prompt, **params) -> dict:
        return self._request("POST", "/v1/completions", json={"model": model, "prompt": prompt, **params})

    def stream_completions(self, model: str, prompt, **params) -> Iterator[dict]:
        return self._stream("/v1/completions", {"model": model, "prompt": prompt, **params})

    def chat(self, model: str, messages: list[dict], **params) -> dict:
        return self._request("POST", "/v1/chat/completions", json={"model": model, "messages": messages, **params})

    def stream_chat(self, model: str, messages: list[dict], **params) -> Iterator[dict]:
        return self._stream("/v1/chat/completions", {"model": model, "messages": messages, **params})

    def embeddings(self, model: str, input, **params) -> list[list[float]]:
        data = self._request("POST", "/v1/embeddings", json={"model": model, "input": input, **params})["data"]
        return [item["embedding"] for item in sorted(data, key=lambda item: item["index"])]

    def usage(self) -> list[dict]:
        return self._request("GET", "/v1/usage")["data"]

    def indexes(self) -> list[dict]:
        """The server's semantic indexes: id, model, dimension, chunks, size (docs/search.md)."""
        return self._request("GET", "/v1/indexes")["data"]

    def query_index(self, name: str, query: str, top_k: int = 5) -> list[dict]:
        """The top_k chunks of index `name` most similar to `query`: [{id, score, text, metadata}], best first."""
        return self._request("POST", f"/v1/indexes/{quote(name, safe='')}/query",
                             json={"query": query, "top_k": top_k})["data"]

    def ps(self) -> list[dict]:
        """The models the server holds now: state, device, memory, requests in flight, expiry."""
        return self._request("GET", "/api/ps")["models"]

    def load(self, model: str, keep_alive: float | str | None = None) -> dict:
        """Load `model` now (keep_alive: seconds, '10m', or -1 until stopped); returns its `ps` entry."""
        body = {"model": model, **({"keep_alive": keep_alive} if keep_alive is not None else {})}
        return self._request("POST", "/api/load", json=body)

    def stop(self, model: str) -> dict:
        """Unload `model` now, or once its requests in flight are done ({"status": "unloaded" | "unloading"})."""
        return self._request("POST", "/api/stop", json={"model": model})

    def health(self) -> bool:
        try:
            return self._http.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class AsyncClient(_Base):
    """asyncio client with the same methods as Client (awaitable; streams are async iterators)."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 600.0) -> None:
        super().__init__(base_url, api_key, timeout)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, headers=self._headers())

    async def _request(self, method: str, path: str, **kwargs) -> Any:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise APIConnectionError(f"cannot reach {self.base_url}: {exc}") from None
        _raise_for(response)
        return response.json()

    async def _stream(self, path: str, body: dict) -> AsyncIterator[dict]:
        try:
            async with self._http.stream("POST", path, json={**body, "stream": True}) as response:
                if response.status_code >= 400:
                    await response.aread()
                    _raise_for(response)
                async for line in response.aiter_lines():
                    for event in _events([line]):
                        yield event
                    if line.strip() == "data: [DONE]":
                        return
        except httpx.TransportError as exc:
            raise APIConnectionError(f"cannot reach {self.base_url}: {exc}") from None

    async def models(self) -> list[dict]:
        return (await self._request("GET", "/v1/models"))["data"]

    async def completions(self, model: str, prompt, **params) -> dict:
        return await self._request("POST", "/v1/completions", json={"model": model, "prompt": prompt, **params})

    def stream_completions(self, model: str, prompt, **params) -> AsyncIterator[dict]:
        return self._stream("/v1/completions", {"model": model, "prompt": prompt, **params})

    async def chat(self, model: str, messages: list[dict], **params) -> dict:
        return await self._request("POST", "/v1/chat/completions",
                                   json={"model": model, "messages": messages, **params})

    def stream_chat(self, model: str, messages: list[dict], **params) -> AsyncIterator[dict]:
        return self._stream("/v1/chat/completions", {"model": model, "messages": messages, **params})

    async def embeddings(self, model: str, input, **params) -> list[list[float]]:
        data = (await self._request("POST", "/v1/embeddings", json={"model": model, "input": input, **params}))["data"]
        return [item["embedding"] for item in sorted(data, key=lambda item: item["index"])]

    async def usage(self) -> list[dict]:
        return (await self._request("GET", "/v1/usage"))["data"]

    async def indexes(self) -> list[dict]:
        return (await self._request("GET", "/v1/indexes"))["data"]

    async def query_index(self, name: str, query: str, top_k: int = 5) -> list[dict]:
        return (await self._request("POST", f"/v1/indexes/{quote(name, safe='')}/query",
                                    json={"query": query, "top_k": top_k}))["data"]

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()
