"""Turning engine outputs into OpenAI response pieces: logprobs in the completions and chat shapes."""

from __future__ import annotations

import math


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -9999.0


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def completion_logprobs(tokenizer, token_ids: list[int], entries: list, start_offset: int = 0) -> dict:
    """Completions-API logprobs. `entries[i]` is None (first prompt token), a float, a (logprob, {id: logprob})
    pair (prompt tokens with alternatives) or a {id: logprob} dict holding the chosen token (generated tokens)."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = start_offset
    for token_id, entry in zip(token_ids, entries, strict=True):
        text = token_text(tokenizer, token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        if isinstance(entry, tuple):
            chosen, alternatives = entry
        elif isinstance(entry, dict):
            chosen, alternatives = entry[token_id], entry
        else:
            chosen, alternatives = entry, {}
        token_logprobs.append(_finite(chosen))
        top = {token_text(tokenizer, tid): _finite(lp) for tid, lp in alternatives.items()}
        top_logprobs.append(top or None)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_logprobs(tokenizer, token_ids: list[int], entries: list[dict], top_k: int) -> dict:
    """Chat-API logprobs: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""
    content = []
    for token_id, entry in zip(token_ids, entries, strict=True):
        text = token_text(tokenizer, token_id)
        ranked = sorted(entry.items(), key=lambda item: item[1], reverse=True)[:top_k]
        content.append({
            "token": text, "logprob": _finite(entry[token_id]), "bytes": list(text.encode("utf-8")),
            "top_logprobs": [{"token": (t := token_text(tokenizer, tid)), "logprob": _finite(lp),
                              "bytes": list(t.encode("utf-8"))} for tid, lp in ranked],
        })
    return {"content": content}
