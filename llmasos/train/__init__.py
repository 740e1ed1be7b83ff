"""Training: pretrain from scratch, fine-tune (full or LoRA, plain text, prompt/completion or chat), on one process or
many (torchrun: DDP or FSDP), with atomic checkpoints and exact resume; export to Hugging Face and PEFT formats."""

from __future__ import annotations

from llmasos.train.arguments import TrainingArguments
from llmasos.train.loop import TrainResult
from llmasos.train.lora import apply_adapter
from llmasos.train.tokenizer_trainer import train_tokenizer
from llmasos.train.trainer import LLMTrainer

__all__ = ["LLMTrainer", "TrainResult", "TrainingArguments", "apply_adapter", "train_tokenizer"]
