"""Attention over a batch of variable-length sequences laid end to end, reading and writing a paged KV cache.

The model never sees the cache: each attention layer hands q, k, v to `AttentionMetadata.attend`, which stores the
new keys and values in their slots and attends over each sequence's whole context (cached blocks + new tokens)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def sdpa_backends(device: torch.device):
    """On CUDA, keep SDPA off cuDNN: cuDNN builds a new execution plan for every new sequence length, which costs
    far more host time than the attention itself in a continuous batch of variable-length prompts."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


_SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa arrived in 2.5


@dataclass
class AttentionMetadata:
    """One forward's batch. Sequence i owns tokens [query_starts[i], query_starts[i+1]) of the flat batch; its
    context after this step is context_lens[i] tokens, the last query_lens[i] of which are in this batch."""

    query_lens: list[int]
    context_lens: list[int]
    # per layer: (k, v), each (num_blocks, block_size, kv_heads, dim)
    kv_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    slot_mapping: torch.Tensor | None = None  # (num_tokens,) flat cache slot of each new token
    block_tables: list[list[int]] | None = None  # per sequence: its block ids, in order
    block_size: int = 16
    _masks: dict = field(default_factory=dict, repr=False)
    _decode: dict = field(default_factory=dict, repr=False)
    _gather_index: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        assert len(self.query_lens) == len(self.context_lens)
        self.query_starts = [0]
        for length in self.query_lens:
            self.query_starts.append(self.query_starts[-1] + length)
        self.num_tokens = self.query_starts[-1]
        # Sequences with one new token attend together as one padded batch; longer ones one by one.
        self.decode_seqs = [i for i, n in enumerate(self.query_lens) if n == 1 and self.kv_cache is not None]
        decode_set = set(self.decode_seqs)
        self.prefill_seqs = [i for i in range(len(self.query_lens)) if i not in decode_set]

    @classmethod
    def for_prompts(cls, lengths: list[int]) -> AttentionMetadata:
        """Fresh sequences with no cache (training, scoring): plain causal attention within each sequence."""
        return cls(query_lens=list(lengths), context_lens=list(lengths))

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        """q (num_tokens, heads, dim), k and v (num_tokens, kv_heads, dim) -> (num_tokens, heads, dim)."""
        if self.kv_cache is not None:
            k_cache, v_cache = self.kv_cache[layer_idx]
            num_kv_heads, dim = k_cache.shape[-2:]
            k_cache.view(-1, num_kv_heads, dim).index_copy_(0, self.slot_mapping, k.to(k_cache.dtype))
            v_cache.view(-1, num_kv_heads, dim).index_copy_(0, self.slot_mapping, v.to(v_cache.dtype))
        if not self.decode_seqs and len(set(self.query_lens)) == 1 and self.query_lens == self.context_lens:
            # Equal-length fresh sequences (training, scoring): one batched call.
            batch, length = len(self.query_lens), self.query_lens[0]
            mask = self._mask(length, length, sliding_window, q.device)
            out = _attention(_heads_first(q, batch, length), _heads_first(k, batch, length),
                             _heads_first(v, batch, length), mask, scale, softcap)
            return out.transpose(1, 2).reshape(q.shape)
        out = torch.empty_like(q)
        for i in self.prefill_seqs:
            start, end = self.query_starts[i], self.query_starts[i + 1]
            query_len, context_len = self.query_lens[i], self.context_lens[i]
            if query_len == context_len:
                keys, values = k[start:end], v[start:end]
            else:
                keys, values = self._gather(layer_idx, i, context_len)
            mask = self._mask(query_len, context_len, sliding_window, q.device)
            seq_out = _attention(q[start:end].transpose(0, 1).unsqueeze(0), keys.transpose(0, 1).unsqueeze(0),
                                 values.transpose(0, 1).unsqueeze(0), mask, scale, softcap)
            out[start:end] = seq_out[0].transpose(0, 1)
        if self.decode_seqs:
            self._attend_decodes(layer_idx, q, out, scale, sliding_window, softcap)
        return out

    def _gather(self, layer_idx: int, seq: int, context_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        k_cache, v_cache = self.kv_cache[layer_idx]
        index = self._gather_index.get(seq)
        if index is None:  # built once per step, shared by every layer
            num_blocks = -(-context_len // self.block_size)
            index = self._gather_index[seq] = torch.tensor(self.block_tables[seq][:num_blocks], device=k_cache.device)
        keys = k_cache[index].flatten(0, 1)[:context_len]  # (context_len, kv_heads, dim)
        values = v_cache[index].flatten(0, 1)[:context_len]
        return keys, values

    def _decode_tensors(self, device: torch.device) -> dict:
        """Padded block tables and token indices of the decode group, built once per step and shared by layers."""
        if not self._decode:
            seqs = self.decode_seqs
            width = max(-(-self.context_lens[i] // self.block_size) for i in seqs)
            tables = [self.block_tables[i][:width] + [0] * (width - len(self.block_tables[i][:width])) for i in seqs]
            lengths = torch.tensor([self.context_lens[i] for i in seqs], device=device)
            self._decode.update(
                tables=torch.tensor(tables, device=device),
                token_index=torch.tensor([self.query_starts[i] for i in seqs], device=device),
                lengths=lengths,
                key_positions=torch.arange(width * self.block_size, device=device),
            )
        return self._decode

    def _attend_decodes(self, layer_idx: int, q: torch.Tensor, out: torch.Tensor, scale: float,
                        sliding_window: int | None, softcap: float | None) -> None:
        d = self._decode_tensors(q.device)
        k_cache, v_cache = self.kv_cache[layer_idx]
        batch = len(self.decode_seqs)
        # index_select over whole blocks is a plain row copy, several times faster than advanced indexing on CPU
        flat = d["tables"].view(-1)
        padded = d["key_positions"].shape[0]
        keys = k_cache.index_select(0, flat).view(batch, padded, *k_cache.shape[2:]).transpose(1, 2)
        values = v_cache.index_select(0, flat).view(batch, padded, *v_cache.shape[2:]).transpose(1, 2)
        mask_key = ("decode", sliding_window, softcap is None)
        mask = self._masks.get(mask_key)
        if mask is None:
            positions, lengths = d["key_positions"].unsqueeze(0), d["lengths"].unsqueeze(1)
            mask = positions < lengths
            if sliding_window is not None:
                mask &= positions > lengths - 1 - sliding_window
            mask = mask.view(batch, 1, 1, -1)
            if softcap is None:  # an additive mask in the query dtype: SDPA would convert a boolean one every layer
                mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
            self._masks[mask_key] = mask
        queries = q.index_select(0, d["token_index"]).unsqueeze(2)  # (batch, heads, 1, dim)
        result = _attention(queries, keys.to(q.dtype), values.to(q.dtype), mask, scale, softcap)
        out.index_copy_(0, d["token_index"], result.squeeze(2))

    def _mask(self, query_len: int, context_len: int, sliding_window: int | None,
              device: torch.device) -> torch.Tensor | None:
        """Causal (and windowed) boolean mask, True = attend; None when plain causal from position 0 suffices."""
        if query_len == context_len and (sliding_window is None or sliding_window >= context_len):
            return None
        key = (query_len, context_len, sliding_window)
        mask = self._masks.get(key)
        if mask is None:
            query_pos = torch.arange(context_len - query_len, context_len, device=device).unsqueeze(1)
            key_pos = torch.arange(context_len, device=device).unsqueeze(0)
            mask = key_pos <= query_pos
            if sliding_window is not None:
                mask &= key_pos > query_pos - sliding_window
            mask = self._masks[key] = mask
        return mask


def _heads_first(x: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    return x.view(batch, length, *x.shape[1:]).transpose(1, 2)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
               softcap: float | None) -> torch.Tensor:
    """q (batch, heads, q_len, dim), k/v (batch, kv_heads, k_len, dim); mask None means causal."""
    if softcap is not None:
        return _softcapped_attention(q, k, v, mask, scale, softcap)
    groups = q.shape[1] // k.shape[1]
    if mask is None:
        if groups > 1 and not _SDPA_HAS_GQA:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=scale,
                                              **({"enable_gqa": groups > 1} if _SDPA_HAS_GQA else {}))
    if groups == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    # Grouped queries with a mask: fold each kv head's query heads into the query length, so every attention
    # backend (masks and all) applies and no key/value is copied per query head.
    batch, heads, q_len, dim = q.shape
    kv_heads = k.shape[1]
    folded = q.reshape(batch, kv_heads, groups * q_len, dim)
    if q_len > 1:  # rows are ordered (group, position): tile the (q_len, k_len) mask once per group
        mask = mask.repeat(*([1] * (mask.dim() - 2)), groups, 1)
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask, scale=scale)
    return out.reshape(batch, heads, q_len, dim)


def _softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                          scale: float, softcap: float) -> torch.Tensor:
    """Gemma-2 attention: scores squashed by tanh before the softmax, which SDPA cannot express."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        q_len, k_len = scores.shape[-2:]
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v)
