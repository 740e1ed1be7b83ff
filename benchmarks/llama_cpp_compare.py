"""Our engine side by side with llama.cpp (llama-bench) on the same checkpoint: prompt processing (pp) and
single-stream token generation (tg) tok/s, for bf16 and, where our `quantization` option exists, int8 vs Q8_0 and
int4 vs Q4_0.

    python benchmarks/llama_cpp_compare.py --llama-bench /tmp/llamacpp/build/bin/llama-bench \\
        --gguf-bf16 /tmp/qwen2-bench-bf16.gguf --gguf-q8 /tmp/qwen2-bench-q8_0.gguf \\
        --gguf-q4 /tmp/qwen2-bench-q4_0.gguf --checkpoint /tmp/qwen2-bench

How each side is measured (the same prompt length P=128, generated tokens N=64 and threads on both):
  llama.cpp  `llama-bench -m X.gguf -t 2 -p 128 -n 64 -r 3 -o json` (after its own warm-up run): pp = a 128-token
             prompt in one batch, tg = 64 tokens generated one at a time from an empty context; the median of its
             3 samples is reported.
  ours       `LLM.load(dir, dtype="bfloat16", quantization=..., enable_prefix_caching=False)`, one warm-up
             request, then for fresh random 128-token prompts: t1 = time of `generate` with max_tokens=1 (= time to
             first token), t64 = with max_tokens=64 (temperature 0, ignore_eos); pp = 128 / median(t1),
             tg = 63 / (median(t64) - median(t1)). Our tg runs after the 128-token prompt (context 128..191), which
             costs a little more attention than llama-bench's tg from an empty context.
A dim second line per row gives the best sample of each side (less sensitive to a busy machine than the median).
Rows whose `quantization` our LLM.load does not accept yet (TypeError / ValueError) are skipped.
Run it on an otherwise idle machine: llama.cpp's threads spin-wait at every barrier, so other load on the same
cores hurts it far more than it hurts torch (on a 2-core box with load ~4 its samples varied 3x and its tg fell to a
fraction of normal); the script prints the 1-minute load average before and after and warns when it is high.
Note: llama-quantize Q4_0 keeps the tied token_embd/output matrix at Q8_0 (its default for the output tensor).

Building llama.cpp (the copy vendored in the llama-cpp-python source distribution on PyPI; CPU only):

    mkdir -p /tmp/llamacpp && cd /tmp/llamacpp
    pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/llamacpp
    tar xzf llama_cpp_python-*.tar.gz            # -> llama_cpp_python-0.3.36/vendor/llama.cpp
    LLAMA=/tmp/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -S $LLAMA -B /tmp/llamacpp/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \\
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \\
        -DLLAMA_BUILD_APP=OFF -DBUILD_SHARED_LIBS=OFF
    nice -n 19 cmake --build /tmp/llamacpp/build --config Release -j2 --target llama-bench llama-quantize
    # (LLAMA_CURL no longer exists in this llama.cpp, which downloads with cpp-httplib; LLAMA_OPENSSL=OFF
    #  drops that dependency. The tools land in /tmp/llamacpp/build/bin.)

A Python for convert_hf_to_gguf.py (it needs torch, transformers, numpy, sentencepiece, pyyaml, tqdm; its own
gguf-py is used): a venv that sees the repo venv's packages and adds the rest:

    python3.11 -m venv /tmp/llamacpp/venv
    echo /work/main/.venv/lib/python3.11/site-packages > /tmp/llamacpp/venv/lib/python3.11/site-packages/zz_repo.pth
    /tmp/llamacpp/venv/bin/pip install sentencepiece tqdm pyyaml requests

The checkpoint and the GGUF files (see benchmarks/make_qwen2_checkpoint.py for the tokenizer it has to use):

    .venv/bin/python benchmarks/make_qwen2_checkpoint.py /tmp/qwen2-bench
    for t in bf16 q8_0; do /tmp/llamacpp/venv/bin/python benchmarks/make_qwen2_checkpoint.py --convert \\
        /tmp/qwen2-bench --llama-cpp $LLAMA --outtype $t --outfile /tmp/qwen2-bench-$t.gguf; done
    /tmp/llamacpp/build/bin/llama-quantize /tmp/qwen2-bench-bf16.gguf /tmp/qwen2-bench-q4_0.gguf Q4_0
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

# ours, quantization=, GGUF. w8a8 quantizes activations to int8 per call, as Q8_0's matmuls do: the like-for-like row.
PAIRS = [("bf16", None, "bf16"), ("int8", "int8", "Q8_0"), ("w8a8", "w8a8", "Q8_0"), ("int4", "int4", "Q4_0")]


def run_llama_bench(binary: str, gguf: str, threads: int, prompt: int, gen: int, repetitions: int) -> dict:
    """pp and tg tok/s (median of llama-bench's samples) for one GGUF file."""
    command = [binary, "-m", gguf, "-t", str(threads), "-p", str(prompt), "-n", str(gen), "-r", str(repetitions),
               "-o", "json"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    out: dict = {"command": " ".join(command)}
    for test in json.loads(result.stdout):
        key = "pp" if test["n_gen"] == 0 else "tg"
        samples = test.get("samples_ts") or [test["avg_ts"]]
        out[f"{key}_tok_s"] = statistics.median(samples)
        out[f"{key}_samples"] = samples
        out[f"{key}_best_tok_s"] = max(samples)
        out["type"] = test.get("model_type", "")
    return out


def run_ours(checkpoint: str, quantization: str | None, threads: int, prompt: int, gen: int,
             repetitions: int) -> dict | str:
    """pp and tg tok/s of our engine, or the reason the row is skipped."""
    import torch

    from llmasos import LLM, SamplingParams

    torch.set_num_threads(threads)
    kwargs = {} if quantization is None else {"quantization": quantization}
    try:
        llm = LLM.load(checkpoint, dtype="bfloat16", enable_prefix_caching=False, **kwargs)
    except (TypeError, ValueError, NotImplementedError) as error:
        return f"skipped: LLM.load(quantization={quantization!r}) -> {type(error).__name__}: {error}"
    # Prompt ids inside the tokenizer's own vocab (the model's is larger; see make_qwen2_checkpoint.py).
    vocab = llm.tokenizer.backend.get_vocab_size()
    rng = random.Random(7)

    def timed(max_tokens: int) -> float:
        ids = [rng.randrange(3, vocab) for _ in range(prompt)]
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        start = time.perf_counter()
        outputs = llm.generate([ids], params)
        elapsed = time.perf_counter() - start
        produced = len(outputs[0].outputs[0].token_ids)
        assert produced == max_tokens, f"asked for {max_tokens} tokens, got {produced}"
        return elapsed

    timed(gen)  # warm-up
    firsts = [timed(1) for _ in range(repetitions)]
    totals = [timed(gen) for _ in range(repetitions)]
    first, total = statistics.median(firsts), statistics.median(totals)
    if hasattr(llm, "close"):
        llm.close()
    llm = None
    gc.collect()
    return {"pp_tok_s": prompt / first, "tg_tok_s": (gen - 1) / (total - first),
            "pp_best_tok_s": prompt / min(firsts), "tg_best_tok_s": (gen - 1) / (min(totals) - min(firsts)),
            "ttft_samples_s": firsts, "total_samples_s": totals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-bench", required=True, help="path of the llama-bench binary")
    parser.add_argument("--gguf-bf16", required=True)
    parser.add_argument("--gguf-q8", required=True)
    parser.add_argument("--gguf-q4", default=None)
    parser.add_argument("--checkpoint", required=True, help="the Hugging Face checkpoint the GGUFs were made from")
    parser.add_argument("--threads", type=int, default=2, help="threads for both (llama-bench -t, torch)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (pp)")
    parser.add_argument("--gen", type=int, default=64, help="generated tokens (tg)")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--only", default="bf16,int8,w8a8,int4", help="which rows: a subset of bf16,int8,w8a8,int4")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    ggufs = {"bf16": args.gguf_bf16, "int8": args.gguf_q8, "w8a8": args.gguf_q8, "int4": args.gguf_q4}
    wanted = set(args.only.split(","))
    load_before = os.getloadavg()

    rows = []
    for ours_name, quantization, theirs_name in PAIRS:
        if ours_name not in wanted or ggufs[ours_name] is None:
            continue
        print(f"llama.cpp {theirs_name}: {ggufs[ours_name]}", file=sys.stderr)
        theirs = run_llama_bench(args.llama_bench, ggufs[ours_name], args.threads, args.prompt, args.gen,
                                 args.repetitions)
        print(f"ours {ours_name}: {args.checkpoint}", file=sys.stderr)
        ours = run_ours(args.checkpoint, quantization, args.threads, args.prompt, args.gen, args.repetitions)
        rows.append({"ours": ours_name, "theirs": theirs_name, "ours_result": ours, "llama_cpp": theirs})
    load_after = os.getloadavg()

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ours vs llama.cpp: pp{args.prompt} / tg{args.gen}, {args.threads} threads, median of "
                        f"{args.repetitions} (load avg {load_before[0]:.2f} before, {load_after[0]:.2f} after)")
    for column in ("ours / llama.cpp", "pp ours", "pp llama.cpp", "pp ratio", "tg ours", "tg llama.cpp",
                   "tg ratio"):
        table.add_column(column, justify="left" if column == "ours / llama.cpp" else "right")
    for row in rows:
        ours, theirs = row["ours_result"], row["llama_cpp"]
        label = f"{row['ours']} / {row['theirs']}"
        if isinstance(ours, str):
            table.add_row(label, "-", f"{theirs['pp_tok_s']:.1f}", "-", "-", f"{theirs['tg_tok_s']:.1f}", ours)
            continue
        row["pp_ratio"] = ours["pp_tok_s"] / theirs["pp_tok_s"]
        row["tg_ratio"] = ours["tg_tok_s"] / theirs["tg_tok_s"]
        table.add_row(label, f"{ours['pp_tok_s']:.1f}", f"{theirs['pp_tok_s']:.1f}", f"{row['pp_ratio']:.2f}x",
                      f"{ours['tg_tok_s']:.1f}", f"{theirs['tg_tok_s']:.1f}", f"{row['tg_ratio']:.2f}x")
        best = {k: ours[f"{k}_best_tok_s"] / theirs[f"{k}_best_tok_s"] for k in ("pp", "tg")}
        table.add_row(f"  best run of {args.repetitions}", f"{ours['pp_best_tok_s']:.1f}",
                      f"{theirs['pp_best_tok_s']:.1f}", f"{best['pp']:.2f}x", f"{ours['tg_best_tok_s']:.1f}",
                      f"{theirs['tg_best_tok_s']:.1f}", f"{best['tg']:.2f}x", style="dim")
    Console().print(table)
    print("tok/s; ratio = ours / llama.cpp (>1: ours faster)")
    if max(load_before[0], load_after[0]) > 0.5 * (os.cpu_count() or 1):
        print(f"WARNING: the machine was busy (load average {load_before[0]:.2f} / {load_after[0]:.2f} on "
              f"{os.cpu_count()} CPUs); llama.cpp suffers more from contention, so these ratios favour us")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "prompt": args.prompt, "gen": args.gen,
                                               "repetitions": args.repetitions, "loadavg_before": load_before,
                                               "loadavg_after": load_after, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
