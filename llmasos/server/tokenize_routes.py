"""POST /tokenize and /detokenize (vLLM's shapes): clients that must agree with the server on token boundaries
(sliding-window perplexity, prompt budgeting) ask the server's own tokenizer."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from llmasos.engine.validation import PromptError, check_token_ids
from llmasos.server.app import parse_body, served_model
from llmasos.server.protocol import ChatMessage
from llmasos.server.state import ServerState


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    tokens: list[int]


def add_tokenize_routes(router: APIRouter, state: ServerState) -> None:
    from llmasos.server.protocol import APIError

    @router.post("/tokenize")
    async def tokenize(request: Request):
        body: TokenizeRequest = await parse_body(request, TokenizeRequest)
        served = served_model(state, body.model, request.state.key)
        tokenizer = served.llm.tokenizer
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if body.prompt is not None:
            tokens = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            tokens = tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt,
                                                   tokenize=True, chat_template=served.chat_template)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": served.max_model_len}

    @router.post("/detokenize")
    async def detokenize(request: Request):
        body: DetokenizeRequest = await parse_body(request, DetokenizeRequest)
        served = served_model(state, body.model, request.state.key)
        try:
            if body.tokens:
                check_token_ids(body.tokens, served.llm.config.vocab_size)
        except PromptError as exc:
            raise APIError(400, str(exc), param="tokens") from None
        return {"prompt": served.llm.tokenizer.decode(body.tokens)}
