"""llguidance vs xgrammar on CPU, with a Qwen2-sized vocabulary: compile time per JSON schema (the ten schemas of
tests/engine/json_schemas.py) and token-mask time per generated token, p50/p99, over constrained random walks.

    .venv/bin/pip install --no-deps xgrammar apache-tvm-ffi   # only for this comparison: not a runtime dependency
    .venv/bin/python benchmarks/grammar_engines.py [--walks 5] [--json results.json]

The vocabulary: a byte-level BPE tokenizer built like benchmarks/make_qwen2_checkpoint.py's (Qwen2's normalizer and
pre-tokenizer, `<|bos|>` = 0, `<|endoftext|>` = 1) but trained to 151,643 entries, Qwen2's own count, then padded to
the model's 151,936 ids (as Qwen2 is). tinyshakespeare alone cannot fill that many merges, so the corpus adds 220,000
random words over Latin, Cyrillic, Greek, hex and CJK alphabets: the token strings are synthetic, but the size and
shape of the trie the engines walk are those of a real Qwen2 vocabulary.

The walks: at each step, one engine's mask is computed and a token is drawn uniformly among the allowed ones
(llguidance's walk, seeded); the other engine replays the same tokens, so both compute masks for the same states.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "engine"))

from common import percentile  # noqa: E402
from json_schemas import SCHEMAS  # noqa: E402
from make_qwen2_checkpoint import SHAKESPEARE, write_bpe_tokenizer  # noqa: E402

QWEN2_VOCAB = 151_936  # the model's rows (Qwen2-0.5B's vocab_size)
QWEN2_TOKENS = 151_643  # Qwen2's BPE entries
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}  # as the engine's


def write_qwen2_size_tokenizer(directory: Path, seed: int = 0) -> Path:
    """tokenizer.json + tokenizer_config.json of a 151,643-entry byte-level BPE (see the module docstring)."""
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "tokenizer.json").is_file():
        return directory
    rng = random.Random(seed)
    alphabets = ["abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
                 "абвгдежзийклмнопрстуфхцчшщыэюя", "αβγδεζηθικλμνξοπρστυφχψω", "0123456789abcdef",
                 "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年"]
    weights = [4, 2, 1, 1, 1, 1]
    words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(3, 12)))
             for alphabet in rng.choices(alphabets, weights, k=220_000)]
    text = SHAKESPEARE.read_text(encoding="utf-8") if SHAKESPEARE.is_file() else ""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as corpus:
        corpus.write(text + "\n" + " ".join(w for w in words for _ in range(2)))
    write_bpe_tokenizer(directory, Path(corpus.name), QWEN2_TOKENS)
    Path(corpus.name).unlink()
    return directory


def allowed_ids(bitmask_row: torch.Tensor, vocab: int) -> list[int]:
    import numpy as np

    bits = np.unpackbits(bitmask_row.numpy().view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits).tolist()


def bench_llguidance(tokenizer_json: str, walks: int, max_steps: int, seed: int):
    import llguidance
    from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

    started = time.perf_counter()
    tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=QWEN2_VOCAB, eos_token=1)
    setup = time.perf_counter() - started
    compile_ms, first_mask_ms, mask_us, sequences = {}, {}, [], {}
    bitmask = allocate_token_bitmask(1, QWEN2_VOCAB)
    rng = random.Random(seed)
    for name, schema in SCHEMAS.items():
        started = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        compiled = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        compile_ms[name] = (time.perf_counter() - started) * 1e3
        assert not compiled.is_error(), compiled.get_error()
        sequences[name] = []
        for walk in range(walks):
            matcher = compiled.deep_copy()
            tokens = []
            for step in range(max_steps):
                started = time.perf_counter()
                fill_next_token_bitmask(matcher, bitmask)
                elapsed = time.perf_counter() - started
                if walk == 0 and step == 0:
                    first_mask_ms[name] = elapsed * 1e3
                else:
                    mask_us.append(elapsed * 1e6)
                choices = allowed_ids(bitmask[0], QWEN2_VOCAB)
                token = rng.choice(choices)
                tokens.append(token)
                if token == 1:
                    break
                assert matcher.consume_token(token), matcher.get_error()
                if matcher.is_stopped():
                    break
            sequences[name].append(tokens)
    return dict(setup_s=setup, compile_ms=compile_ms, first_mask_ms=first_mask_ms, mask_us=mask_us), sequences


def bench_xgrammar(tokenizer_dir: Path, sequences: dict[str, list[list[int]]]):
    import xgrammar
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    started = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=QWEN2_VOCAB, stop_token_ids=[1])
    setup = time.perf_counter() - started
    compile_ms, first_mask_ms, mask_us = {}, {}, []
    disagreements = 0
    bitmask = xgrammar.allocate_token_bitmask(1, QWEN2_VOCAB)
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=False, max_threads=torch.get_num_threads())
    for name, schema in SCHEMAS.items():
        started = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))
        compile_ms[name] = (time.perf_counter() - started) * 1e3
        for walk, tokens in enumerate(sequences[name]):
            matcher = xgrammar.GrammarMatcher(compiled)
            for step, token in enumerate(tokens):
                started = time.perf_counter()
                matcher.fill_next_token_bitmask(bitmask)
                elapsed = time.perf_counter() - started
                if walk == 0 and step == 0:
                    first_mask_ms[name] = elapsed * 1e3
                else:
                    mask_us.append(elapsed * 1e6)
                if not (int(bitmask[0, token // 32]) >> (token % 32)) & 1:
                    disagreements += 1  # the engines' languages differ here (e.g. number formats): stop replaying
                    break
                if not matcher.accept_token(token) or matcher.is_terminated():
                    break
    return dict(setup_s=setup, compile_ms=compile_ms, first_mask_ms=first_mask_ms, mask_us=mask_us,
                disagreements=disagreements)


def summary(result: dict) -> dict:
    compile_ms = list(result["compile_ms"].values())
    return {"tokenizer_setup_s": round(result["setup_s"], 3),
            "compile_ms_median": round(percentile(compile_ms, 50), 3),
            "compile_ms_max": round(max(compile_ms), 3),
            "first_mask_ms_median": round(percentile(list(result["first_mask_ms"].values()), 50), 3),
            "mask_us_p50": round(percentile(result["mask_us"], 50), 1),
            "mask_us_p99": round(percentile(result["mask_us"], 99), 1),
            "num_masks": len(result["mask_us"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--walks", type=int, default=5, help="random walks per schema")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--tokenizer-dir", type=Path, default=Path(tempfile.gettempdir()) / "llmasos-qwen2-vocab")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    directory = write_qwen2_size_tokenizer(args.tokenizer_dir)
    tokenizer_json = (directory / "tokenizer.json").read_text(encoding="utf-8")
    llg, sequences = bench_llguidance(tokenizer_json, args.walks, args.max_steps, seed=0)
    results = {"llguidance": llg}
    try:
        results["xgrammar"] = bench_xgrammar(directory, sequences)
    except ImportError:
        print("xgrammar is not installed: llguidance only (see the module docstring)")
    table = {engine: summary(result) for engine, result in results.items()}
    per_schema = {engine: {name: round(ms, 2) for name, ms in result["compile_ms"].items()}
                  for engine, result in results.items()}
    print(f"{'engine':<12}" + "".join(f"{key:>22}" for key in next(iter(table.values()))))
    for engine, row in table.items():
        print(f"{engine:<12}" + "".join(f"{value:>22}" for value in row.values()))
    print("\ncompile ms per schema:")
    for name in SCHEMAS:
        print(f"  {name:<18}" + "".join(f"{engine}={per_schema[engine][name]:>9.2f}  " for engine in per_schema))
    if "xgrammar" in results:
        print(f"\nxgrammar refused {results['xgrammar']['disagreements']} of llguidance's tokens")
    if args.json:
        args.json.write_text(json.dumps({"summary": table, "compile_ms": per_schema}, indent=2))


if __name__ == "__main__":
    main()
