"""Test support: tiny random Hugging Face checkpoints (weights, config, tokenizer) written by transformers itself."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 384
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows "
    "of outrageous fortune, or to take arms against a sea of troubles. héllo wörld 日本語 🙂. The quick brown fox "
    "jumps over the lazy dog; operating systems schedule processes and manage memory with pages. 0123456789 "
)

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512)


@functools.cache
def _backend_json(add_bos: bool) -> str:
    tok = BackendTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS * 20], trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                           special_tokens=[("<|bos|>", 0)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str()


def hf_tokenizer(add_bos: bool = True, chat_template: str | None = CHATML):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=BackendTokenizer.from_str(_backend_json(add_bos)),
                                  bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")
    if chat_template:
        tok.chat_template = chat_template
    return tok


def family_config(family: str, **overrides):
    """A transformers config for a tiny model of `family` (vocab matches the test tokenizer)."""
    import transformers as tf

    ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if family == "gpt2":
        base = dict(vocab_size=VOCAB_SIZE, n_embd=64, n_layer=3, n_head=4, n_positions=512, **ids)
        return tf.GPT2Config(**{**base, **overrides})
    classes = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
               "qwen3": tf.Qwen3Config, "phi3": tf.Phi3Config, "gemma2": tf.Gemma2Config}
    base = dict(vocab_size=VOCAB_SIZE, **SMALL, **ids)
    extra = {
        "llama": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        "mistral": dict(sliding_window=48),
        "qwen2": dict(tie_word_embeddings=True),
        "qwen3": dict(head_dim=24),
        "phi3": dict(partial_rotary_factor=0.5),
        "gemma2": dict(head_dim=16, sliding_window=40, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                       final_logit_softcapping=3.0),
    }[family]
    return classes[family](**{**base, **extra, **overrides})


def make_checkpoint(directory: Path, config, *, seed: int = 0, add_bos: bool = True,
                    chat_template: str | None = CHATML, dtype=torch.float32):
    """Save a random model (norm weights perturbed so a norm bug cannot hide behind all-ones) and a tokenizer.
    Returns the transformers reference model, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                param.add_(torch.randn_like(param) * 0.3)
            elif name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.05)
    model.eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    hf_tokenizer(add_bos, chat_template).save_pretrained(directory)
    return model
