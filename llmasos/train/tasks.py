"""What differs between training objectives, for the one training loop: how a batch is padded, what one forward's
summed loss is, and how many targets that loss is the sum of (the loop divides by the global count).

- causal: next-token loss on labelled tokens (loop.LossModule, dataset.collate);
- mlm: BERT's masked language modelling, 15% of the non-special tokens chosen, 80% of those replaced by [MASK],
  10% by a random token, 10% kept (transformers' DataCollatorForLanguageModeling, on the global torch RNG, which
  checkpoints save: a resumed run masks as the uninterrupted one would);
- classification: cross-entropy of one label per example (transformers' single_label_classification)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmasos.train.dataset import IGNORE_INDEX, Example, collate, count_loss_tokens

CAUSAL, MASKED_LM, CLASSIFICATION = "causal", "mlm", "classification"
OBJECTIVES = (CAUSAL, MASKED_LM, CLASSIFICATION)


def pad_batch(examples: list[Example], pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """input_ids (padded at the end with pad_id), attention_mask and token_type_ids, each (batch, length)."""
    length = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    token_type_ids = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        size = len(example.input_ids)
        input_ids[row, :size] = torch.tensor(example.input_ids)
        attention_mask[row, :size] = 1
        if example.token_type_ids:
            token_type_ids[row, :size] = torch.tensor(example.token_type_ids)
    return input_ids.to(device), attention_mask.to(device), token_type_ids.to(device)


class ClassificationLoss(nn.Module):
    """Summed cross-entropy of a sequence classifier's logits against one label per example."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids, attention_mask, token_type_ids)  # (batch, num_labels)
        return F.cross_entropy(logits, labels, reduction="sum", ignore_index=IGNORE_INDEX)


class MaskedLMLoss(nn.Module):
    """Summed cross-entropy over the masked positions of a masked-LM batch."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids, attention_mask, token_type_ids)  # (batch, length, hidden)
        keep = labels != IGNORE_INDEX
        logits = self.model.compute_logits(hidden[keep])  # (num_masked, vocab)
        return F.cross_entropy(logits, labels[keep], reduction="sum")


def mask_tokens(input_ids: torch.Tensor, special: torch.Tensor, mask_id: int, vocab_size: int,
                probability: float, generator: torch.Generator | None = None,
                word_starts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's 80/10/10 rule on (batch, length) ids; `special` marks positions never chosen (specials, padding).
    With `word_starts` (batch, length) bool, whole words are masked: each word's first token is drawn, the word's
    other tokens follow it, and all of them become [MASK] (transformers' whole_word_mask, which drops the 10/10).
    Returns (masked input_ids, labels with IGNORE_INDEX on unchosen positions). The draws are transformers'
    DataCollatorForLanguageModeling's, in its order, so the same generator state masks the same tokens."""
    labels = input_ids.clone()
    chance = torch.full(labels.shape, probability)
    if word_starts is None:
        chance.masked_fill_(special, 0.0)
        chosen = torch.bernoulli(chance, generator=generator).bool()
    else:
        starts = word_starts & ~special
        word_ids = torch.cumsum(starts.long(), dim=1)
        word_ids[special] = -1
        chance.masked_fill_(~starts, 0.0)
        drawn = torch.bernoulli(chance, generator=generator).bool()
        valid = word_ids != -1
        same_word = (word_ids[:, :, None] == word_ids[:, None, :]) & valid[:, :, None] & valid[:, None, :]
        chosen = (same_word & drawn[:, None, :]).any(dim=2)  # (batch, length): a token of a drawn word
    labels[~chosen] = IGNORE_INDEX
    input_ids = input_ids.clone()
    # transformers replaces every token of a whole-word mask by [MASK] (no random or kept words there)
    replace_share = 1.0 if word_starts is not None else 0.8
    replaced = torch.bernoulli(torch.full(labels.shape, replace_share), generator=generator).bool() & chosen
    input_ids[replaced] = mask_id
    if word_starts is not None:
        return input_ids, labels
    randomized = torch.bernoulli(torch.full(labels.shape, 0.5), generator=generator).bool() & chosen & ~replaced
    random_words = torch.randint(vocab_size, labels.shape, dtype=torch.long, generator=generator)
    input_ids[randomized] = random_words[randomized]
    return input_ids, labels


@dataclass
class Objective:
    """How the loop trains for one objective: `collate(examples, pad_id, device)` -> the forward's arguments,
    `count(batch)` -> the targets in it, `loss_module(model)` -> the module whose forward(*batch) is a summed loss."""

    name: str
    collate: Callable[[list[Example], int, torch.device], tuple[torch.Tensor, ...]]
    count: Callable[[tuple[torch.Tensor, ...]], int]
    loss_module: Callable[[nn.Module], nn.Module]


def causal_objective() -> Objective:
    from llmasos.train.loop import LossModule

    return Objective(CAUSAL, collate, lambda batch: count_loss_tokens(batch[-1]), LossModule)


def classification_objective() -> Objective:
    def collate_labels(examples: list[Example], pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        labels = torch.tensor([example.label for example in examples], dtype=torch.long, device=device)
        return (*pad_batch(examples, pad_id, device), labels)

    return Objective(CLASSIFICATION, collate_labels, lambda batch: int((batch[-1] != IGNORE_INDEX).sum()),
                     ClassificationLoss)


def masked_lm_objective(special_ids: list[int], mask_id: int, vocab_size: int, probability: float,
                        whole_word: bool = False) -> Objective:
    special_set = torch.tensor(sorted(set(special_ids)), dtype=torch.long)

    def collate_masked(examples: list[Example], pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        input_ids, attention_mask, token_type_ids = pad_batch(examples, pad_id, torch.device("cpu"))
        special = torch.isin(input_ids, special_set) | (attention_mask == 0)
        word_starts = None
        if whole_word:
            word_starts = torch.zeros_like(special)
            for row, example in enumerate(examples):
                if example.word_starts is None:
                    raise ValueError("whole-word masking needs examples built with word boundaries "
                                     "(build_examples(..., word_starts=True))")
                word_starts[row, :len(example.word_starts)] = torch.tensor(example.word_starts)
        masked, labels = mask_tokens(input_ids, special, mask_id, vocab_size, probability, word_starts=word_starts)
        return tuple(t.to(device) for t in (masked, attention_mask, token_type_ids, labels))

    return Objective(MASKED_LM, collate_masked, lambda batch: int((batch[-1] != IGNORE_INDEX).sum()), MaskedLMLoss)
