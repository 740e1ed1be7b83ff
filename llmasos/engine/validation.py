"""The one check of a prompt against a model and its engine: vocabulary, context length, KV-cache size. The engine,
`LLM`, the server and scoring all call `validate_prompt`; the server maps its error types to OpenAI error codes.
Structured-output constraints that cannot compile raise StructuredOutputError (llmasos.engine.structured_output)."""

from __future__ import annotations


class PromptError(ValueError):
    """A prompt the engine can never run (the message says why and what to change)."""


class EmptyPromptError(PromptError):
    pass


class TokenOutOfVocabularyError(PromptError):
    pass


class ContextLengthError(PromptError):
    """Prompt plus max_tokens exceed the model's context (OpenAI's context_length_exceeded)."""

    def __init__(self, message: str, num_prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
        super().__init__(message)
        self.num_prompt_tokens, self.max_tokens, self.max_model_len = num_prompt_tokens, max_tokens, max_model_len


class CacheTooSmallError(PromptError):
    pass


class StructuredOutputError(ValueError):
    """A structured-output constraint (JSON schema, regex, choice, grammar) that is invalid, unsupported or too
    costly to compile; raised before the request is queued (the server answers 400 with this message)."""


class StructuredOutputTimeoutError(StructuredOutputError):
    """The constraint did not compile within the time limit."""


def check_token_ids(token_ids: list[int], vocab_size: int) -> None:
    if not token_ids:
        raise EmptyPromptError("the prompt is empty: give at least one token")
    bad = next((t for t in token_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size),
               None)
    if bad is not None:
        raise TokenOutOfVocabularyError(f"prompt token id {bad!r} is outside the vocabulary (0..{vocab_size - 1})")


def validate_prompt(token_ids: list[int], max_tokens: int, vocab_size: int, max_model_len: int,
                    num_kv_blocks: int | None = None, block_size: int = 16) -> None:
    """Raise a PromptError if `token_ids` + `max_tokens` can never run on this model and cache."""
    check_token_ids(token_ids, vocab_size)
    total = len(token_ids) + max_tokens
    if total > max_model_len:
        raise ContextLengthError(
            f"this model's maximum context length is {max_model_len} tokens, but the request needs {total} "
            f"({len(token_ids)} in the prompt + {max_tokens} max_tokens); shorten the prompt or lower max_tokens",
            len(token_ids), max_tokens, max_model_len)
    if num_kv_blocks is not None:
        blocks = -(-total // block_size)
        if blocks > num_kv_blocks:
            raise CacheTooSmallError(
                f"the request needs {blocks} KV blocks ({total} tokens) but the whole cache has {num_kv_blocks}; "
                "raise kv_cache_memory / num_kv_blocks or shorten the prompt or max_tokens")
