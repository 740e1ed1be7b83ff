"""POST /tokenize and /detokenize and GET /tokenizer_info (vLLM's shapes): clients that must agree with the server on
token boundaries (sliding-window perplexity, prompt budgeting, lm-evaluation-harness's remote tokenizer) ask the
server's own tokenizer. `model` may be left out while one generating model is served, as vLLM allows."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from llmasos.engine.validation import PromptError, check_token_ids
from llmasos.errors import TemplateError
from llmasos.server.app import parse_body, use_model
from llmasos.server.protocol import APIError, ChatMessage
from llmasos.server.state import ServedModel, ServerState


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfoResponse(BaseModel):
    """What vLLM's GET /tokenizer_info says (lm-evaluation-harness reads eos_token, bos_token and chat_template)."""

    model_config = ConfigDict(extra="allow")

    tokenizer_class: str
    model: str
    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    unk_token: str | None
    chat_template: str | None
    model_max_length: int
    vocab_size: int


async def resolve_model(state: ServerState, request: Request, model_id: str | None) -> ServedModel:
    """The model a tokenizer request names, or the only loaded generating model this key may use when it names
    none."""
    key = request.state.key
    if model_id is not None:
        return await use_model(state, request, model_id)
    choices = [m.id for m in state.models.loaded().values()
               if m.task == "generate" and (key is None or key.allows(m.id))]
    if len(choices) != 1:
        listed = ", ".join(repr(choice) for choice in choices) or "none available to this key"
        raise APIError(400, f"this server serves several models, so the request must name one in 'model': {listed}",
                       param="model")
    return await use_model(state, request, choices[0])


def add_tokenize_routes(router: APIRouter, state: ServerState) -> None:
    @router.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(request: Request):
        body: TokenizeRequest = await parse_body(request, TokenizeRequest)
        served = await resolve_model(state, request, body.model)
        tokenizer = served.llm.tokenizer
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if body.prompt is not None:
            tokens = await run_in_threadpool(tokenizer.encode, body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            try:
                tokens = await run_in_threadpool(
                    tokenizer.apply_chat_template, messages, add_generation_prompt=body.add_generation_prompt,
                    tokenize=True, chat_template=served.chat_template, special_tokens_in_content=False)
            except TemplateError as exc:
                raise APIError(400, f"could not render the chat template: {exc}", param="messages") from None
        return {"tokens": tokens, "count": len(tokens), "max_model_len": served.max_model_len}

    @router.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(request: Request):
        body: DetokenizeRequest = await parse_body(request, DetokenizeRequest)
        served = await resolve_model(state, request, body.model)
        try:
            if body.tokens:
                check_token_ids(body.tokens, served.llm.config.vocab_size)
        except PromptError as exc:
            raise APIError(400, str(exc), param="tokens") from None
        return {"prompt": served.llm.tokenizer.decode(body.tokens)}

    @router.get("/tokenizer_info", response_model=TokenizerInfoResponse)
    async def tokenizer_info(request: Request, model: str | None = None):
        served = await resolve_model(state, request, model)
        tokenizer = served.llm.tokenizer
        return {"tokenizer_class": type(tokenizer).__name__, "model": served.id,
                "eos_token": tokenizer.eos_token, "bos_token": tokenizer.bos_token,
                "pad_token": tokenizer.pad_token, "unk_token": tokenizer.unk_token,
                "chat_template": served.chat_template or tokenizer.chat_template,
                "model_max_length": served.max_model_len, "vocab_size": tokenizer.vocab_size}
