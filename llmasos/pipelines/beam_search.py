"""Beam search for encoder-decoder models (Seq2SeqLM), step for step transformers' `generate(num_beams=...)`
(its vectorised beam search of transformers >= 4.50): each step keeps the `2 * num_beams` best continuations of all
beams, the best `num_beams` not ending in EOS run on, and those ending in EOS among the first `num_beams` join the
finished hypotheses with score sum(logprobs) / length ** length_penalty. `early_stopping`: True stops once
`num_beams` hypotheses are finished; False stops when no running beam can beat the worst finished one at its
current length; "never" when none can at the longest length allowed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmasos.sampling_params import SamplingParams

NEG = -1.0e9


@dataclass(frozen=True)
class BeamSettings:
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ValueError(f"num_beams must be a positive integer, got {self.num_beams!r}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if not 1 <= self.num_return_sequences <= self.num_beams:
            raise ValueError(f"num_return_sequences ({self.num_return_sequences}) must be between 1 and num_beams "
                             f"({self.num_beams})")


def _gather(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """tensor (batch, beams, ...) gathered along beams by indices (batch, k) -> (batch, k, ...)."""
    while indices.dim() < tensor.dim():
        indices = indices.unsqueeze(-1)
    return tensor.gather(1, indices.expand(*indices.shape[:2], *tensor.shape[2:]))


@torch.inference_mode()
def beam_search(lm, input_ids: torch.Tensor, mask: torch.Tensor, params: SamplingParams,
                beams: BeamSettings) -> list[list[tuple[list[int], float]]]:
    """Padded prompts (batch, length) -> per prompt, `num_return_sequences` (generated token ids, score), best
    first. `params` gives max_tokens, min_tokens, repetition_penalty, logit_bias and ignore_eos."""
    model, num_beams = lm.model, beams.num_beams
    batch = input_ids.shape[0]
    encoded = model.encode(input_ids, mask).repeat_interleave(num_beams, dim=0)
    cache = model.new_cache(encoded, mask.repeat_interleave(num_beams, dim=0))
    eos = [] if params.ignore_eos else sorted(lm.eos_token_ids)
    eos_tensor = torch.tensor(eos, dtype=torch.long, device=input_ids.device)
    keep = max(2, 1 + len(eos)) * num_beams
    top_mask = torch.arange(keep, device=input_ids.device) < num_beams
    prompt_length, max_length = 1, 1 + params.max_tokens
    fill = lm.pad_token_id
    running = torch.full((batch, num_beams, max_length), fill, dtype=torch.long, device=input_ids.device)
    running[:, :, 0] = lm.config.decoder_start_token_id
    sequences = running.clone()
    lengths = torch.zeros((batch, num_beams), dtype=torch.long, device=input_ids.device)  # of finished hypotheses
    running_scores = torch.zeros((batch, num_beams), device=input_ids.device)
    running_scores[:, 1:] = NEG
    beam_scores = torch.full((batch, num_beams), NEG, device=input_ids.device)
    finished = torch.zeros((batch, num_beams), dtype=torch.bool, device=input_ids.device)
    improvable = torch.ones((batch, 1), dtype=torch.bool, device=input_ids.device)
    offsets = torch.arange(batch, device=input_ids.device)[:, None] * num_beams
    cur_len = 1
    step_input = running[:, :, 0].reshape(-1, 1)
    while True:
        logits = model.decode_step(step_input, cache)[:, -1]  # (batch * beams, vocab)
        log_probs = torch.log_softmax(logits, dim=-1)
        log_probs = lm._process(log_probs, running[:, :, :cur_len].reshape(batch * num_beams, -1), params,
                                cur_len - prompt_length, eos)
        vocab = log_probs.shape[-1]
        accumulated = (log_probs.view(batch, num_beams, vocab) + running_scores[:, :, None]).view(batch, -1)
        top_log_probs, top_indices = torch.topk(accumulated, k=keep)
        source_beams = top_indices // vocab
        top_sequences = _gather(running, source_beams)
        top_sequences[:, :, cur_len] = top_indices % vocab
        hits = torch.isin(top_indices % vocab, eos_tensor) | (cur_len + 1 >= max_length)  # (batch, keep)

        # the beams that run on: the best num_beams continuations not ending here
        run_scores = top_log_probs + hits.float() * NEG
        next_indices = torch.topk(run_scores, k=num_beams)[1]
        running = _gather(top_sequences, next_indices)
        running_scores = _gather(run_scores, next_indices)
        origin = _gather(source_beams, next_indices)  # which old beam each new one extends

        # the hypotheses that end here, among the first num_beams, join the finished ones if good enough
        just_finished = hits & top_mask[None, :]
        scores = top_log_probs / ((cur_len + 1 - prompt_length) ** beams.length_penalty)
        full = finished.all(dim=-1, keepdim=True) & (beams.early_stopping is True)
        scores = scores + full.float() * NEG + (~improvable).float() * NEG + (~just_finished).float() * NEG
        merged_scores = torch.cat((beam_scores, scores), dim=1)
        best = torch.topk(merged_scores, k=num_beams)[1]
        sequences = _gather(torch.cat((sequences, top_sequences), dim=1), best)
        beam_scores = _gather(merged_scores, best)
        finished = _gather(torch.cat((finished, just_finished), dim=1), best)
        new_lengths = torch.full_like(scores, cur_len + 1 - prompt_length, dtype=torch.long)
        lengths = _gather(torch.cat((lengths, new_lengths), dim=1), best)

        flat_origin = (origin + offsets).reshape(-1)
        for layer_cache in cache["self"]:
            for key in ("k", "v"):
                layer_cache[key] = layer_cache[key].index_select(0, flat_origin)
        cur_len += 1
        if beams.early_stopping == "never" and beams.length_penalty > 0.0:
            best_length = max_length - prompt_length
        else:
            best_length = cur_len - prompt_length
        best_possible = running_scores[:, :1] / (best_length ** beams.length_penalty)
        worst_finished = torch.where(finished, beam_scores.min(dim=1, keepdim=True)[0], NEG)
        improvable = improvable & torch.any(best_possible > worst_finished, dim=-1, keepdim=True)
        open_beams = not (bool(finished.all()) and beams.early_stopping is True)
        if not (bool(improvable.any()) and open_beams and not bool(hits.all())):
            break
        step_input = running[:, :, cur_len - 1].reshape(-1, 1)
    results = []
    for row in range(batch):
        results.append([(sequences[row, k, 1:1 + int(lengths[row, k])].tolist(), float(beam_scores[row, k]))
                        for k in range(beams.num_return_sequences)])
    return results
