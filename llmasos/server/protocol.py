"""Request bodies of the OpenAI API (completions, chat) as pydantic models, and OpenAI-shaped errors."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llmasos.sampling_params import MAX_LOGPROBS

MAX_QUOTED_CHARS = 100  # an error quotes at most this much of the client's input (a 3 MB model name stays home)
MAX_ERROR_CHARS = 1000  # and no error message is longer than this, whoever built it


def clip(text: object, limit: int = MAX_QUOTED_CHARS) -> str:
    """`text` as a string of at most `limit` characters (and an ellipsis): how errors quote what the client sent."""
    text = str(text)
    if not text.isascii():  # a lone surrogate quoted back would break the response's UTF-8
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + "…"


class APIError(Exception):
    """An error the client caused or must handle, rendered as {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        message = clip(message, MAX_ERROR_CHARS)
        param = None if param is None else clip(param)
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _keep_alive_seconds(value: float | str | None) -> float | None:
    """keep_alive as seconds (math.inf: until stopped); a bad value is the request's 400, naming the field."""
    if value is None:
        return None
    from llmasos.server.lifecycle import parse_keep_alive

    return parse_keep_alive(value)


class StrictModel(BaseModel):
    """JSON types as the OpenAI spec has them: no `false` for a token id, `0.0` for a count or `0` for a flag (floats
    still take integers, as OpenAI's do)."""

    model_config = ConfigDict(strict=True)


class StreamOptions(StrictModel):
    include_usage: bool = False


class KeepAlive(StrictModel):
    """Ollama's `keep_alive`: how long the model stays loaded after this request — seconds, a duration such as '5m',
    or negative for until stopped. Validated to seconds (math.inf: until stopped)."""

    keep_alive: float | str | None = None

    @field_validator("keep_alive")
    @classmethod
    def _keep_alive(cls, value):
        return _keep_alive_seconds(value)


class SamplingFields(KeepAlive):
    """Fields shared by completions and chat, including the extras vLLM accepts (top_k, min_p, ...)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2 ** 63), le=2 ** 63 - 1)  # what a torch generator accepts
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)  # None: the model's default (Modelfile)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: int | None = None
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    ignore_eos: bool = False
    min_tokens: int | None = Field(default=None, ge=0)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        if isinstance(value, list) and len(value) > 16:
            raise ValueError("at most 16 stop sequences")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value):
        if value is None:
            return value
        for key, bias in value.items():
            if not str(key).lstrip("-").isdigit():
                raise ValueError(f"logit_bias key {clip(key)!r} is not a token id")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias value for token {key} must be in [-100, 100]")
        return value


class JsonSchemaFormat(StrictModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)

    name: str = Field(min_length=1, max_length=64)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredFields(StrictModel):
    """OpenAI's response_format and vLLM's structured_outputs ({json | json_object | regex | choice | grammar})."""

    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None


class CompletionRequest(SamplingFields, StructuredFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None
    # Beam search, for encoder-decoder (T5) models: transformers' names, which vLLM's completions accept as extras.
    num_beams: int | None = Field(default=None, ge=1, le=16)
    length_penalty: float | None = None
    early_stopping: bool | Literal["never"] | None = None


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's calls: {id, type, function: {name, arguments}}
    tool_call_id: str | None = None  # a tool message: the call it answers

    @model_validator(mode="after")
    def _tool_content(self):
        # OpenAI requires it: a tool message is the result of a call, and an empty one reads as a result too
        if self.role == "tool" and self.content is None:
            raise ValueError("a tool message needs content (the tool's result)")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields, StructuredFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self):
        # OpenAI's (and vLLM's) rule; without it the alternatives asked for were silently left out
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class ClassifyRequest(KeepAlive):
    """vLLM's POST /classify: one text or a list of texts for a sequence classifier."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    input: str | list[str]
    user: str | None = None


class ScoreRequest(KeepAlive):
    """vLLM's POST /v1/score: text_1 against text_2 (one to many, or pairwise for equal-length lists)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    text_1: str | list[str]
    text_2: str | list[str]
    user: str | None = None


class RerankRequest(KeepAlive):
    """Jina's / Cohere's POST /v1/rerank: documents ordered by relevance to a query."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    query: str
    documents: list[str]
    top_n: int | None = None
    return_documents: bool = True
    user: str | None = None


class IndexQueryRequest(StrictModel):
    """POST /v1/indexes/{name}/query: the text to look up and how many chunks to return (top_k, or k)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    query: str
    top_k: int | None = None
    k: int | None = None


class EmbeddingRequest(KeepAlive):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
