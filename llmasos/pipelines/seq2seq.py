"""Seq2SeqLM: an encoder-decoder model (T5 family) with its tokenizer, generating like `LLM.generate` does.

It takes the same SamplingParams and returns the same RequestOutputs, so the task pipelines treat encoder-decoder and
decoder-only models alike. Decoding is batched with a key/value cache and streams token by token (`stream`); tokens are
chosen by the engine's sampler and turned into text by the engine front end's Choice, so penalties, seeds and stop
strings follow the decoder-only rules. Greedy (temperature 0) equals transformers' greedy `generate`; with
`BeamSettings(num_beams=k)` it runs transformers' beam search (beam_search.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from llmasos.engine.output_processor import Choice, RequestGroup
from llmasos.engine.protocol import EngineCoreOutput
from llmasos.engine.request import Request
from llmasos.engine.sampler import sample
from llmasos.engine.validation import check_token_ids
from llmasos.errors import ModelLoadError
from llmasos.models.loader import read_json_file
from llmasos.models.t5 import T5Config, T5ForConditionalGeneration, load_seq2seq
from llmasos.outputs import CompletionOutput, RequestOutput
from llmasos.pipelines.beam_search import BeamSettings, beam_search
from llmasos.sampling_params import SamplingParams
from llmasos.spec import ModelSpec, generation_defaults, resolve_spec
from llmasos.tokenizer import Tokenizer


class Seq2SeqLM:
    """>>> t5 = Seq2SeqLM.load("path/to/t5-small")
    >>> t5.generate("translate English to French: Hello", SamplingParams(max_tokens=20, temperature=0))[0].text
    """

    def __init__(self, model: T5ForConditionalGeneration, config: T5Config, tokenizer: Tokenizer,
                 generation_config: dict[str, Any] | None = None, path: Path | None = None,
                 spec: ModelSpec | None = None) -> None:
        self.model, self.config, self.tokenizer, self.path = model, config, tokenizer, path
        self.generation_config = generation_config or {}
        # Built by hand (not by `load`): a spec of the checkpoint alone, so defaults still merge in one place.
        self.spec = spec or ModelSpec(name=Path(path).name if path else "seq2seq", path=str(path or ""),
                                      kind="seq2seq", generation_defaults=generation_defaults(self.generation_config))
        self.device = next(model.parameters()).device
        self.eos_token_ids = set(config.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        self.pad_token_id = config.pad_token_id if pad is None else pad
        self._counter = 0

    @classmethod
    def load(cls, model: ModelSpec | str | Path, dtype: str | torch.dtype = "auto",
             device: str | torch.device = "cpu") -> Seq2SeqLM:
        """Load a ModelSpec, a library model by name or a checkpoint directory; `dtype` and `device` given here
        override the spec's."""
        spec = resolve_spec(model, dtype=dtype, device=device)
        if spec.adapters or spec.quantization:  # refused rather than silently dropped
            what = "a LoRA adapter (ADAPTER)" if spec.adapters else f"{spec.quantization} quantization"
            raise ModelLoadError(f"{spec.name} is an encoder-decoder model, which cannot take {what}; only "
                                 "decoder-only models do")
        weights, config = load_seq2seq(spec.path, dtype=spec.dtype, device=spec.device)
        generation_config = read_json_file(spec.directory / "generation_config.json", required=False)
        return cls(weights, config, Tokenizer.from_dir(spec.directory), generation_config, spec.directory, spec)

    def default_sampling(self, **overrides: Any) -> SamplingParams:
        """SamplingParams for one request: `overrides` over the spec's defaults (Modelfile PARAMETERs, then
        generation_config.json), as `LLM.default_sampling`."""
        return self.spec.sampling_params(**overrides)

    @property
    def task_specific_params(self) -> dict[str, dict[str, Any]]:
        params = self.config.raw.get("task_specific_params")
        return params if isinstance(params, dict) else {}

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling: SamplingParams | list[SamplingParams] | None = None,
                 beams: BeamSettings | None = None) -> list[RequestOutput]:
        """Generate for every prompt; prompts that share SamplingParams run as one batch. With `beams`
        (num_beams > 1) decoding is beam search, deterministic: the SamplingParams give max_tokens, min_tokens,
        repetition_penalty, logit_bias and ignore_eos, and `n` is the number of best beams returned."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params_list = sampling if isinstance(sampling, list) else [sampling or self.default_sampling()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        id_lists = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        for ids in id_lists:
            check_token_ids(ids, self.config.vocab_size)
        results: list[RequestOutput | None] = [None] * len(prompts)
        groups: list[tuple[SamplingParams, list[int]]] = []  # prompts with equal parameters decode as one batch
        for index, params in enumerate(params_list):
            group = next((g for g in groups if g[0] == params), None)
            if group is None:
                groups.append((params, [index]))
            else:
                group[1].append(index)
        for params, indices in groups:
            if beams is not None and beams.num_beams > 1:
                outputs = self._beam_batch([id_lists[i] for i in indices], params, beams)
            else:
                outputs = self._generate_batch([id_lists[i] for i in indices], params)
            for i, completions in zip(indices, outputs, strict=True):
                text = prompts[i] if isinstance(prompts[i], str) else None
                results[i] = RequestOutput(f"seq2seq-{self._next_id()}", text, id_lists[i], completions, True)
        return results  # type: ignore[return-value]

    def _padded(self, id_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        length = max(len(ids) for ids in id_lists)
        input_ids = torch.full((len(id_lists), length), self.pad_token_id, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(id_lists):
            input_ids[row, :len(ids)] = torch.tensor(ids, device=self.device)
            mask[row, :len(ids)] = 1
        return input_ids, mask

    def _beam_batch(self, id_lists: list[list[int]], params: SamplingParams,
                    beams: BeamSettings) -> list[list[CompletionOutput]]:
        if not params.greedy:
            raise ValueError("beam search here is deterministic: use num_beams > 1 without do_sample")
        if params.n > 1:
            beams = BeamSettings(beams.num_beams, beams.length_penalty, beams.early_stopping, params.n)
        outputs = []
        for hypotheses in beam_search(self, *self._padded(id_lists), params, beams):
            completions = []
            for index, (token_ids, _) in enumerate(hypotheses):
                finish = "stop" if token_ids and token_ids[-1] in self.eos_token_ids else "length"
                completions.append(self._completion(index, token_ids, finish, [], params))
            outputs.append(completions)
        return outputs

    def _generate_batch(self, id_lists: list[list[int]], params: SamplingParams) -> list[list[CompletionOutput]]:
        groups: list[RequestGroup] = []
        for step in self.stream(id_lists, params):
            groups = step  # the same groups every step, filled in further
        return [group.output().outputs for group in groups]

    @torch.inference_mode()
    def stream(self, id_lists: list[list[int]], params: SamplingParams,
               request_ids: list[str] | None = None) -> Iterator[list[RequestGroup]]:
        """Decode each prompt's n sequences, all in one batch, token by token: after every step, each prompt's
        RequestGroup (`group.output(delta=True)` is the step's delta). Tokens are chosen by the engine's sampler over
        engine Requests (penalties, min_tokens, seeds per sequence, logprobs) and become text in the front end's
        Choice (incremental detokenization, stop strings): the rules of decoder-only generation, not a copy of
        them. Stop iterating to abort."""
        n = params.n
        start = self.config.decoder_start_token_id
        request_ids = request_ids or [f"seq2seq-{self._next_id()}" for _ in id_lists]
        groups, rows = [], []
        for request_id, ids in zip(request_ids, id_lists, strict=True):
            choices = []
            for k in range(n):
                # The decoder's prompt is its start token: repetition penalty sees it, as transformers' does.
                rows.append(Request(f"{request_id}#{k}", [start], params, self.eos_token_ids, index=k))
                detokenizer = self.tokenizer.incremental_detokenizer(None, params.skip_special_tokens)
                choices.append(Choice(rows[-1].request_id, k, params, detokenizer))
            groups.append(RequestGroup(request_id, None, ids, choices))
        choices = [choice for group in groups for choice in group.children]
        if params.max_tokens == 0:  # (a key's quota can leave no room) finished before the first token
            for choice in choices:
                choice.finish_reason = "length"
            yield groups
            return
        input_ids, mask = self._padded(id_lists)
        encoded = self.model.encode(input_ids, mask).repeat_interleave(n, dim=0)  # one row per returned sequence
        cache = self.model.new_cache(encoded, mask.repeat_interleave(n, dim=0))
        step_input = torch.full((len(rows), 1), start, dtype=torch.long, device=self.device)
        while True:
            logits = self.model.decode_step(step_input, cache)[:, -1]  # (rows, vocab) float32
            active = [i for i, row in enumerate(rows) if not row.finished]
            token_ids, logprobs = sample(logits[active], [rows[i] for i in active])
            for i, token_id, entry in zip(active, token_ids, logprobs, strict=True):
                row, choice = rows[i], choices[i]
                row.append_token(token_id, entry)
                choice.receive(EngineCoreOutput(row.request_id, [token_id], None if entry is None else [entry],
                                                row.finish_reason, row.stop_reason))
                if choice.finished and not row.finished:  # a stop string ended it
                    row.finish_reason = choice.finish_reason
            yield groups
            if all(row.finished for row in rows):
                return
            # Finished rows keep feeding padding, as transformers does; their outputs are no longer read.
            step_input = torch.tensor([[self.pad_token_id if row.finished else row.output_token_ids[-1]]
                                       for row in rows], dtype=torch.long, device=self.device)

    def _next_id(self) -> int:
        self._counter += 1
        return self._counter

    def _process(self, logits: torch.Tensor, sequences: torch.Tensor, params: SamplingParams, step: int,
                 eos: list[int]) -> torch.Tensor:
        if params.repetition_penalty != 1.0:  # transformers' rule over the decoder tokens so far
            seen = logits.gather(1, sequences)
            seen = torch.where(seen < 0, seen * params.repetition_penalty, seen / params.repetition_penalty)
            logits = logits.scatter(1, sequences, seen)
        if step < params.min_tokens and eos:
            logits[:, eos] = float("-inf")
        if params.logit_bias:
            for token, bias in params.logit_bias.items():
                if token < logits.shape[1]:
                    logits[:, token] += bias
        return logits

    def _completion(self, index: int, token_ids: list[int], finish: str, logprobs: list[dict[int, float]],
                    params: SamplingParams) -> CompletionOutput:
        text = self.tokenizer.decode(token_ids, skip_special_tokens=params.skip_special_tokens)
        stop_reason = None
        for stop in params.stop_strings:
            position = text.find(stop)
            if position >= 0:
                text, finish, stop_reason = text[:position], "stop", stop
        return CompletionOutput(index, text, token_ids, finish, logprobs if params.logprobs is not None else None,
                                stop_reason)
