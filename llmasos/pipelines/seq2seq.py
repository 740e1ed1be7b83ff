"""Seq2SeqLM: an encoder-decoder model (T5 family) with its tokenizer, generating like `LLM.generate` does.

It takes the same SamplingParams and returns the same RequestOutputs, so the task pipelines treat encoder-decoder and
decoder-only models alike. Decoding is batched with a key/value cache; greedy (temperature 0) equals transformers'
greedy `generate`; with `BeamSettings(num_beams=k)` it runs transformers' beam search (beam_search.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

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
                self._counter += 1
                text = prompts[i] if isinstance(prompts[i], str) else None
                results[i] = RequestOutput(f"seq2seq-{self._counter}", text, id_lists[i], completions, True)
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

    @torch.inference_mode()
    def _generate_batch(self, id_lists: list[list[int]], params: SamplingParams) -> list[list[CompletionOutput]]:
        n = params.n
        device = self.device
        length = max(len(ids) for ids in id_lists)
        input_ids = torch.full((len(id_lists), length), self.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(id_lists):
            input_ids[row, :len(ids)] = torch.tensor(ids, device=device)
            mask[row, :len(ids)] = 1
        encoded = self.model.encode(input_ids, mask).repeat_interleave(n, dim=0)  # one row per returned sequence
        mask = mask.repeat_interleave(n, dim=0)
        cache = self.model.new_cache(encoded, mask)
        rows = encoded.shape[0]
        generator = torch.Generator(device=device)
        generator.manual_seed(params.seed if params.seed is not None else int(torch.randint(2**62, (1,)).item()))
        sequences = torch.full((rows, 1), self.config.decoder_start_token_id, dtype=torch.long, device=device)
        tokens: list[list[int]] = [[] for _ in range(rows)]
        logprobs: list[list[dict[int, float]]] = [[] for _ in range(rows)]
        finish: list[str | None] = [None] * rows
        eos = sorted(self.eos_token_ids)
        step_input = sequences
        for step in range(params.max_tokens):
            logits = self.model.decode_step(step_input, cache)[:, -1]  # (rows, vocab) float32
            logits = self._process(logits, sequences, params, step, eos)
            chosen = self._choose(logits, params, generator)
            chosen_logprobs = torch.log_softmax(logits, dim=-1).gather(1, chosen[:, None])[:, 0].tolist()
            for row, token in enumerate(chosen.tolist()):
                if finish[row] is not None:
                    continue
                tokens[row].append(token)  # an ending EOS is kept, as the engine keeps it
                if params.logprobs is not None:
                    logprobs[row].append({token: chosen_logprobs[row]})
                if token in self.eos_token_ids and not params.ignore_eos:
                    finish[row] = "stop"
            if all(f is not None for f in finish):
                break
            # Finished rows keep feeding padding, as transformers does; their outputs are no longer read.
            chosen = torch.where(torch.tensor([f is None for f in finish], device=device), chosen,
                                 torch.full_like(chosen, self.pad_token_id))
            sequences = torch.cat([sequences, chosen[:, None]], dim=1)
            step_input = chosen[:, None]
        outputs: list[list[CompletionOutput]] = []
        for prompt_index in range(len(id_lists)):
            completions = []
            for k in range(n):
                row = prompt_index * n + k
                completions.append(self._completion(k, tokens[row], finish[row] or "length", logprobs[row], params))
            outputs.append(completions)
        return outputs

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

    @staticmethod
    def _choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
        if params.greedy:
            return logits.argmax(dim=-1)
        logits = logits / params.temperature
        if params.top_k > 0:
            kth = logits.topk(min(params.top_k, logits.shape[1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            drop = sorted_probs.cumsum(dim=-1) - sorted_probs > params.top_p  # keep the smallest set reaching top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(1, order, sorted_probs)
        if params.min_p > 0:
            probs = probs.masked_fill(probs < params.min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

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
