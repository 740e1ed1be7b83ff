"""Records -> token examples with loss masks: packed text blocks, prompt/completion pairs, and chat conversations
rendered with the model's own chat template, so training sees exactly the tokens the server will feed.

Also the deterministic data order (a seeded permutation per epoch, read as one endless stream of examples) and the
padding of a batch into the flat layout the native models take."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from llmasos.errors import TemplateError, TrainingDataError
from llmasos.tokenizer import Tokenizer
from llmasos.train.data import Record

IGNORE_INDEX = -100
SKIP_NO_ASSISTANT = "without an assistant turn"
SKIP_TOO_LONG = "longer than the context"
SKIP_TEMPLATE = "that the chat template cannot render"


@dataclass
class Example:
    """input_ids and labels of the same length; labels are IGNORE_INDEX where no loss is taken. A classification
    example has no token labels but one `label` id, and (encoders) the segment of every token."""

    input_ids: list[int]
    labels: list[int]
    token_type_ids: list[int] | None = None
    label: int | None = None
    word_starts: list[bool] | None = None  # whole-word masking: True on the first token of each word


@dataclass
class DatasetReport:
    """What became of the records: examples built, tokens, and the examples skipped, by reason."""

    num_records: int = 0
    num_examples: int = 0
    num_tokens: int = 0
    num_loss_tokens: int = 0
    skipped: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    @property
    def num_skipped(self) -> int:
        return sum(len(sources) for sources in self.skipped.values())

    def skip_summary(self) -> str:
        """e.g. 'skipped 3 of 10 examples: 2 without an assistant turn (first: data.jsonl line 4), 1 longer ...'"""
        parts = [f"{len(sources)} {reason} (first: {sources[0]})" for reason, sources in self.skipped.items()]
        return f"skipped {self.num_skipped} of {self.num_records} examples: " + ", ".join(parts)


def build_examples(records: list[Record], tokenizer: Tokenizer, max_seq_length: int, name: str = "train_data",
                   vocab_size: int | None = None, word_starts: bool = False) -> tuple[list[Example], DatasetReport]:
    """Tokenize records. Text is concatenated (EOS between documents) and cut into blocks of max_seq_length;
    prompt/completion and chat examples stay whole, with loss only on the completion / assistant tokens, and are
    skipped (and counted) when longer than max_seq_length or when they have nothing to learn. Pre-tokenized
    examples are checked against `vocab_size` (the model's; the tokenizer's by default). `word_starts` marks the
    first token of every word of text blocks (whole-word masking)."""
    report = DatasetReport(num_records=len(records))
    examples: list[Example] = []
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    starts: list[bool] = []
    for record in records:
        if record.kind == "text":
            if word_starts:
                ids, flags = word_start_flags(tokenizer, record.text)
                stream.extend(ids)
                starts.extend(flags)
            else:
                stream.extend(tokenizer.encode(record.text))
            if eos is not None:
                stream.append(eos)
                starts.append(False)
            continue
        if record.kind == "ids":
            input_ids = record.input_ids or []
            labels = list(record.labels) if record.labels is not None else list(input_ids)
            vocab = vocab_size or tokenizer.vocab_size
            if any(not 0 <= token < vocab for token in input_ids):
                raise TrainingDataError(f"{record.source}: input_ids must be token ids in 0..{vocab - 1}")
        elif record.kind == "prompt":
            prompt_ids = tokenizer.encode(record.prompt)
            completion_ids = tokenizer.encode(record.completion, add_special_tokens=False)
            if eos is not None:
                completion_ids.append(eos)
            input_ids = prompt_ids + completion_ids
            labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
        else:
            try:
                input_ids, mask = render_conversation(tokenizer, record.messages or [])
            except TemplateError as exc:
                if not report.skipped[SKIP_TEMPLATE]:
                    report.skipped[SKIP_TEMPLATE].append(f"{record.source} ({exc})")
                else:
                    report.skipped[SKIP_TEMPLATE].append(record.source)
                continue
            if not any(mask):
                report.skipped[SKIP_NO_ASSISTANT].append(record.source)
                continue
            labels = [token if keep else IGNORE_INDEX for token, keep in zip(input_ids, mask, strict=True)]
        if len(input_ids) > max_seq_length:
            report.skipped[SKIP_TOO_LONG].append(f"{record.source}: {len(input_ids)} > {max_seq_length} tokens")
            continue
        examples.append(Example(input_ids, labels))
    special_ids = tokenizer.all_special_ids
    for start in range(0, len(stream), max_seq_length):
        block = stream[start:start + max_seq_length]
        if len(block) >= 2:
            flags = None
            if word_starts:  # a block starts a word, as transformers' collator sees a row's first token
                flags = starts[start:start + max_seq_length]
                flags[0] = block[0] not in special_ids
            examples.append(Example(block, list(block), word_starts=flags))
    report.skipped = {reason: sources for reason, sources in report.skipped.items() if sources}
    report.num_examples = len(examples)
    report.num_tokens = sum(len(example.input_ids) for example in examples)
    # The first label of a sequence is never predicted (nothing comes before it).
    report.num_loss_tokens = sum(sum(label != IGNORE_INDEX for label in example.labels[1:]) for example in examples)
    if not examples or report.num_loss_tokens == 0:
        detail = f" ({report.skip_summary()})" if report.num_skipped else ""
        raise TrainingDataError(f"{name} has no usable examples{detail}")
    return examples, report


def word_start_flags(tokenizer: Tokenizer, text: str) -> tuple[list[int], list[bool]]:
    """A text's ids and, per token, whether it begins a word: transformers' whole-word rule on character offsets
    (a token starts a word unless it is special or begins where the previous non-special token ended)."""
    encoding = tokenizer.backend.encode(text, add_special_tokens=True)
    special = [token in tokenizer.all_special_ids for token in encoding.ids]
    flags = []
    for index, (begin, _) in enumerate(encoding.offsets):
        if special[index]:
            flags.append(False)
        elif index == 0 or special[index - 1]:
            flags.append(True)
        else:
            flags.append(begin != encoding.offsets[index - 1][1])
    return list(encoding.ids), flags


def render_conversation(tokenizer: Tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """A conversation -> (ids, loss_mask) with the tokenizer's chat template; the mask is True on each assistant
    reply and the end-of-turn text the template puts after it.

    The text before each reply is the template rendered with add_generation_prompt=True, tokenized on its own, so
    the context the model learns from is token for token what `LLM.chat` sends. A reply whose prompt is not a prefix
    of the whole rendering (templates that rewrite earlier turns) is kept as context but not trained on."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    cuts: list[tuple[int, int]] = []
    for index, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        if index == 0:
            prompt = ""
        else:
            prompt = tokenizer.apply_chat_template(messages[:index], add_generation_prompt=True, tokenize=False)
        through = tokenizer.apply_chat_template(messages[:index + 1], tokenize=False)
        start, end = len(prompt), len(through)
        if full.startswith(through) and through.startswith(prompt) and end > start:
            if not cuts or start >= cuts[-1][1]:
                cuts.append((start, end))
    ids: list[int] = []
    mask: list[bool] = []
    position = 0
    for start, end in cuts:
        for begin, finish, trained in ((position, start, False), (start, end, True)):
            if finish > begin:
                piece = tokenizer.encode(full[begin:finish], add_special_tokens=False)
                ids.extend(piece)
                mask.extend([trained] * len(piece))
        position = end
    if position < len(full):
        piece = tokenizer.encode(full[position:], add_special_tokens=False)
        ids.extend(piece)
        mask.extend([False] * len(piece))
    return ids, mask


def end_of_turn_token_id(tokenizer: Tokenizer) -> int | None:
    """The special token the chat template closes an assistant turn with (e.g. <|im_end|>), if any: generation must
    stop there, so it belongs in generation_config's eos_token_id."""
    marker = "\u2063reply\u2063"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except TemplateError:
        return None
    after = text.split(marker, 1)[1] if marker in text else ""
    ids = tokenizer.encode(after.lstrip(" "), add_special_tokens=False)
    return ids[0] if ids and ids[0] in tokenizer.all_special_ids else None


class DataOrder:
    """Which examples each optimizer step trains on: a seeded permutation per epoch, cut into global batches, the
    last one short when the batch does not divide the epoch (a DataLoader without drop_last). An epoch is
    ceil(examples / global batch) steps that see every example once, and the position in the data is just the step
    number (exact resume)."""

    def __init__(self, num_examples: int, seed: int) -> None:
        self.num_examples = num_examples
        self.seed = seed
        self._permutations: dict[int, list[int]] = {}

    def _permutation(self, epoch: int) -> list[int]:
        permutation = self._permutations.get(epoch)
        if permutation is None:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            permutation = torch.randperm(self.num_examples, generator=generator).tolist()
            self._permutations = {epoch: permutation}  # steps move forward: keep only the current epoch
        return permutation

    def steps_per_epoch(self, global_batch: int) -> int:
        return max(1, math.ceil(self.num_examples / global_batch))

    def step_indices(self, step: int, global_batch: int) -> list[int]:
        """The global batch of example indices of optimizer step `step` (0-based); short at the end of an epoch."""
        epoch, index = divmod(step, self.steps_per_epoch(global_batch))
        return self._permutation(epoch)[index * global_batch:(index + 1) * global_batch]

    def epochs_done(self, num_steps: int, global_batch: int) -> float:
        """Passes over the data after `num_steps` steps: 2.5 is two epochs and half of the third."""
        epoch, index = divmod(num_steps, self.steps_per_epoch(global_batch))
        return epoch + index * global_batch / self.num_examples


def rank_micro_batches(indices: list[int], world_size: int, rank: int, per_device: int,
                       accumulation_steps: int) -> list[list[int]]:
    """Split one step's global batch into world_size * accumulation_steps contiguous slots, micro-batch m of rank r
    being slot m * world_size + r. A full batch gives every slot per_device examples; a short one (an epoch's last)
    is spread as evenly as it goes, so some slots may be empty."""
    num_slots = world_size * accumulation_steps
    assert len(indices) <= num_slots * per_device
    size, extra = divmod(len(indices), num_slots)
    bounds = [slot * size + min(slot, extra) for slot in range(num_slots + 1)]
    slots = [m * world_size + rank for m in range(accumulation_steps)]
    return [indices[bounds[slot]:bounds[slot + 1]] for slot in slots]


def collate(examples: list[Example], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad at the end to the longest example (causal attention never looks ahead, so end padding cannot change
    the real tokens' outputs). Returns input_ids and labels, both (batch, length)."""
    length = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, :len(example.input_ids)] = torch.tensor(example.input_ids)
        labels[row, :len(example.labels)] = torch.tensor(example.labels)
    return input_ids.to(device), labels.to(device)


def count_loss_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry loss in a (batch, length) label tensor (the first position is never a target)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
