"""Batched sampling with per-request parameters: logit bias, penalties, min_tokens, structured-output token masks,
temperature, top-k, top-p, min-p, greedy, and seeded draws that do not depend on the rest of the batch."""

from __future__ import annotations

import torch

from llmasos.engine.request import Request
from llmasos.engine.structured_output import apply_bitmask


def sample(logits: torch.Tensor, requests: list[Request], masks: tuple[list[int], torch.Tensor] | None = None
           ) -> tuple[list[int], list[dict[int, float] | None]]:
    """logits (batch, vocab) float32, one row per request -> chosen token ids and, where asked, their logprobs.
    `masks`: (rows, packed int32 bitmask with one row each) of the structured-output requests; every way of choosing
    (greedy, temperature, top-k/p, min-p) then picks among the allowed tokens only. Logprobs stay the model's."""
    batch, vocab = logits.shape
    device = logits.device
    want_logprobs = [r.params.logprobs is not None for r in requests]
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
    logits = _apply_processors(logits.clone(), requests, vocab)
    if masks is not None:
        apply_bitmask(logits, *masks)

    temperatures = [r.params.temperature for r in requests]
    greedy = [t == 0 for t in temperatures]
    chosen = torch.empty(batch, dtype=torch.long, device=device)
    if any(greedy):
        rows = torch.tensor([i for i, g in enumerate(greedy) if g], device=device)
        chosen[rows] = logits[rows].argmax(dim=-1)
    if not all(greedy):
        rows_list = [i for i, g in enumerate(greedy) if not g]
        rows = torch.tensor(rows_list, device=device)
        sub = logits[rows] / torch.tensor([temperatures[i] for i in rows_list], device=device).unsqueeze(1)
        sub = _truncate(sub, [requests[i] for i in rows_list])
        probs = torch.softmax(sub, dim=-1)
        chosen[rows] = _draw(probs, [requests[i] for i in rows_list])
    token_ids = chosen.tolist()

    logprob_entries: list[dict[int, float] | None] = [None] * batch
    if raw_logprobs is not None:
        top = max(r.params.logprobs or 0 for r in requests)
        top_values, top_ids = (raw_logprobs.topk(top, dim=-1) if top else (None, None))
        chosen_lp = raw_logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
        top_values = top_values.tolist() if top else None
        top_ids = top_ids.tolist() if top else None
        for i, request in enumerate(requests):
            if not want_logprobs[i]:
                continue
            entry = {token_ids[i]: chosen_lp[i]}
            for k in range(request.params.logprobs):
                entry.setdefault(top_ids[i][k], top_values[i][k])
            logprob_entries[i] = entry
    return token_ids, logprob_entries


def _apply_processors(logits: torch.Tensor, requests: list[Request], vocab: int) -> torch.Tensor:
    for i, request in enumerate(requests):
        p = request.params
        row = logits[i]
        if p.logit_bias:
            ids = [t for t in p.logit_bias if t < vocab]
            if ids:
                row[ids] += torch.tensor([p.logit_bias[t] for t in ids], device=row.device)
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(request.all_token_ids)), device=row.device, dtype=torch.long)
            seen = seen[seen < vocab]
            values = row[seen]
            row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and request.output_token_ids:
            ids, counts = torch.tensor(request.output_token_ids, device=row.device).unique(return_counts=True)
            keep = ids < vocab
            ids, counts = ids[keep], counts[keep]
            row[ids] -= p.frequency_penalty * counts.to(row.dtype) + p.presence_penalty
        if len(request.output_token_ids) < p.min_tokens:
            banned = [t for t in (request.eos_token_ids | set(p.stop_token_ids)) if t < vocab]
            if banned:
                row[banned] = float("-inf")
    return logits


def _truncate(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """top-k, then top-p, then min-p, each only where some request asks for it."""
    top_ks = [r.params.top_k for r in requests]
    if any(k > 0 for k in top_ks):
        vocab = logits.shape[-1]
        k = torch.tensor([min(k, vocab) if k > 0 else vocab for k in top_ks], device=logits.device)
        sorted_desc = logits.sort(dim=-1, descending=True).values
        threshold = sorted_desc.gather(1, (k - 1).unsqueeze(1))
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    top_ps = [r.params.top_p for r in requests]
    if any(p < 1.0 for p in top_ps):
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        top_p = torch.tensor(top_ps, device=logits.device, dtype=cumulative.dtype).unsqueeze(1)
        drop = cumulative <= 1 - top_p
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    min_ps = [r.params.min_p for r in requests]
    if any(p > 0 for p in min_ps):
        probs = logits.softmax(dim=-1)
        floor = probs.max(dim=-1, keepdim=True).values * torch.tensor(min_ps, device=logits.device).unsqueeze(1)
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def _draw(probs: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Exponential race (argmax p / E, E ~ Exp(1)): one sample per row with no host sync; seeded rows draw their
    noise from their own generator, so their choice does not depend on the rest of the batch."""
    noise = torch.empty_like(probs)
    unseeded = [i for i, r in enumerate(requests) if r.generator is None]
    if unseeded:
        noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=probs.device).exponential_()
    for i, request in enumerate(requests):
        if request.generator is not None:
            row = torch.empty(probs.shape[1]).exponential_(generator=request.generator)
            noise[i] = row.to(probs.device)
    return (probs / noise).argmax(dim=-1)
