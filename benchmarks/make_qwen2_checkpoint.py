"""The random Qwen2-0.5B-shaped checkpoint of the engine benchmarks, written to a directory that llama.cpp's
convert_hf_to_gguf.py accepts, and the conversion itself (for benchmarks/llama_cpp_compare.py).

    # 1. the checkpoint (repo venv): random bf16 weights + a byte-level BPE tokenizer
    .venv/bin/python benchmarks/make_qwen2_checkpoint.py /tmp/qwen2-bench

    # 2. GGUF files (a venv that has torch, transformers, numpy, sentencepiece, pyyaml, tqdm; see
    #    benchmarks/llama_cpp_compare.py for how to make one without downloading torch again)
    /tmp/llamacpp/venv/bin/python benchmarks/make_qwen2_checkpoint.py --convert /tmp/qwen2-bench \
        --llama-cpp /tmp/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp \
        --outtype bf16 --outfile /tmp/qwen2-bench-bf16.gguf

The weights come from `common.random_checkpoint` (the same as benchmarks/engine_throughput.py: seed 0, the
Qwen2-0.5B shape, tied embeddings, vocab 151936). Its WordLevel "t123" tokenizer cannot be converted: llama.cpp's
"gpt2" vocab type needs BPE merges. So the tokenizer is replaced by a byte-level BPE tokenizer built like Qwen2's
(NFC, Qwen2's split regex, byte-level BPE; the same pipeline transformers' Qwen2Tokenizer builds) but trained with
the `tokenizers` library on /work/shared/data/tinyshakespeare.txt: 8192 entries, `<|bos|>` = 0 and
`<|endoftext|>` = 1 (the config's bos/eos ids). The converter pads the vocab to the model's 151936 with unused
[PADn] tokens.

convert_hf_to_gguf.py names a BPE tokenizer's pre-tokenizer by hashing the token ids it gives for a fixed text,
against a table of published models; a freshly trained vocab is never in that table, and the converter then
refuses ("BPE pre-tokenizer was not recognized"). The real Qwen2 tokenizer cannot be downloaded here. `--convert`
therefore runs the converter unchanged except for one wrapper: when the hash is unknown AND the tokenizer splits
text exactly as Qwen2's pre-tokenizer does (checked on a test text), it answers "qwen2", the name llama.cpp uses for
that pre-tokenizer. No file of llama.cpp is edited. The tokenizer only matters for loading: both benchmarks feed
token ids.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare.txt")
SPECIAL_TOKENS = ["<|bos|>", "<|endoftext|>"]  # ids 0 and 1 = the checkpoint's bos_token_id / eos_token_id
BPE_VOCAB = 8192
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
               r"""|\s+(?!\S)|\s+""")
# Text on which a pre-tokenizer must split exactly like Qwen2's for --convert to call it "qwen2".
CHECK_TEXT = ("\n \n\n \t\t \t\n  \n   \n🚀 (normal) 😶\u200d🌫️ ✅ 🦙🦙 3 33 333 3.3 3..3 "
              "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
              "------======= нещо на Български ```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
              "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL   x\r\n\r\ny  ")


def qwen2_pre_tokenizer():
    """Qwen2's pre-tokenizer: its split regex, then byte-level mapping without GPT-2's regex."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def write_bpe_tokenizer(directory: Path, corpus: Path = SHAKESPEARE, vocab_size: int = BPE_VOCAB) -> None:
    """A byte-level BPE tokenizer with Qwen2's normalizer and pre-tokenizer, trained on `corpus`, saved
    (tokenizer.json and tokenizer_config.json) into `directory`, replacing whatever tokenizer is there."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = qwen2_pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train([str(corpus)], trainer)
    assert [backend.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1]
    for stale in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (directory / stale).unlink(missing_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=SPECIAL_TOKENS[0], eos_token=SPECIAL_TOKENS[1],
                            unk_token=None).save_pretrained(directory)


def make_checkpoint(directory: Path) -> Path:
    """The engine benchmark's random Qwen2-0.5B-shaped bf16 checkpoint, with a convertible BPE tokenizer."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import QWEN2_05B, random_checkpoint

    directory.mkdir(parents=True, exist_ok=True)
    random_checkpoint(QWEN2_05B, torch.bfloat16, directory)
    write_bpe_tokenizer(directory)
    return directory


def convert(checkpoint: Path, llama_cpp: Path, outtype: str, outfile: Path) -> None:
    """Run llama.cpp's convert_hf_to_gguf.py on `checkpoint`, naming an unknown BPE vocab whose pre-tokenizer
    is Qwen2's "qwen2" (see the module docstring). Runs in this process: use a Python with the converter's deps."""
    sys.path.insert(0, str(llama_cpp))
    sys.path.insert(1, str(llama_cpp / "gguf-py"))
    from conversion.base import TextModel

    original = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        conversion_logger = logging.getLogger("hf-to-gguf")
        level = conversion_logger.level
        conversion_logger.setLevel(logging.ERROR)  # the converter's banner for an unknown hash
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            pre = tokenizer.backend_tokenizer.pre_tokenizer
            if pre is None or pre.pre_tokenize_str(CHECK_TEXT) != qwen2_pre_tokenizer().pre_tokenize_str(CHECK_TEXT):
                raise
            print("make_qwen2_checkpoint: unknown BPE vocab with Qwen2's pre-tokenizer -> tokenizer.ggml.pre 'qwen2'")
            return "qwen2"
        finally:
            conversion_logger.setLevel(level)

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    import convert_hf_to_gguf

    sys.argv = ["convert_hf_to_gguf.py", str(checkpoint), "--outtype", outtype, "--outfile", str(outfile)]
    convert_hf_to_gguf.main()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path, help="the checkpoint directory (written, or read with --convert)")
    parser.add_argument("--convert", action="store_true", help="convert the checkpoint to GGUF instead")
    parser.add_argument("--llama-cpp", type=Path, help="llama.cpp source tree (has convert_hf_to_gguf.py)")
    parser.add_argument("--outtype", default="bf16", help="convert_hf_to_gguf.py --outtype: bf16, q8_0, f16, ...")
    parser.add_argument("--outfile", type=Path, help="the GGUF file to write")
    args = parser.parse_args()
    if args.convert:
        if args.llama_cpp is None or args.outfile is None:
            parser.error("--convert needs --llama-cpp and --outfile")
        convert(args.directory, args.llama_cpp, args.outtype, args.outfile)
    else:
        print(make_checkpoint(args.directory))


if __name__ == "__main__":
    main()
