"""Engine benchmark (issue 3): our engine against transformers' generate on the same random Qwen2-0.5B-shaped
checkpoint, in one run. Reports throughput, single-request decode speed and its share of the bandwidth limit,
prefix-caching TTFT, and TTFT / time-per-output-token percentiles.

    python benchmarks/engine_throughput.py                  # CPU, bf16 (+ int8/int4 decode), the Qwen2-0.5B shape
    python benchmarks/engine_throughput.py --device cuda    # the same on a GPU
    python benchmarks/engine_throughput.py --tiny           # a quick check of the script itself
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from common import QWEN2_05B, TINY, copy_bandwidth, median, percentile, print_table, random_checkpoint, save_json, sync

from llmasos import LLM, SamplingParams


def workload(seed: int, vocab: int, count: int = 32) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(3, vocab) for _ in range(rng.randint(32, 256))], rng.randint(16, 128))
            for _ in range(count)]


def run_engine(llm: LLM, requests: list[tuple[list[int], int]], device: str) -> dict:
    """All requests at once; per-request TTFT and time per output token from the engine's own steps."""
    engine = llm.engine
    sync(device)
    start = time.perf_counter()
    ids = [engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
           for prompt, n in requests]
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    counts: dict[str, int] = {}
    while len(done) < len(ids):
        groups = engine.step()
        sync(device)
        now = time.perf_counter()
        for group in groups:
            tokens = len(group.children[0].token_ids)
            if tokens and group.request_id not in first:
                first[group.request_id] = now - start
            if group.finished:
                done[group.request_id] = now - start
                counts[group.request_id] = tokens
    elapsed = time.perf_counter() - start
    tpot = [(done[i] - first[i]) / (counts[i] - 1) for i in ids if counts[i] > 1]
    return {"seconds": elapsed, "tokens": sum(counts.values()), "ttft": [first[i] for i in ids], "tpot": tpot}


def run_transformers(model, requests: list[tuple[list[int], int]], batch_size: int, device: str) -> dict:
    """Static left-padded batches (vLLM's HF baseline): each batch generates its longest output for everyone."""
    ordered = sorted(requests, key=lambda r: len(r[0]))
    sync(device)
    start = time.perf_counter()
    useful = 0
    for i in range(0, len(ordered), batch_size):
        batch = ordered[i:i + batch_size]
        width = max(len(p) for p, _ in batch)
        input_ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch], device=device)
        new = max(n for _, n in batch)
        with torch.inference_mode():
            model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)
        useful += sum(n for _, n in batch)
    sync(device)
    return {"seconds": time.perf_counter() - start, "tokens": useful}


def our_decode(llm: LLM, vocab: int, device: str) -> tuple[float, float]:
    """One request, 128-token prompt, 64 new tokens. Decode speed = 63 tokens / (time for 64 - time for 1); every
    run uses a fresh prompt so the prefix cache cannot shorten one of them. Returns (tok/s, TTFT)."""
    rng = random.Random(7)
    fresh = lambda: [rng.randrange(3, vocab) for _ in range(128)]  # noqa: E731
    run_engine(llm, [(fresh(), 64)], device)  # warm-up (and CUDA graph capture)
    ours_ttft = median([run_engine(llm, [(fresh(), 1)], device)["seconds"] for _ in range(3)])
    ours_total = median([run_engine(llm, [(fresh(), 64)], device)["seconds"] for _ in range(3)])
    return 63 / (ours_total - ours_ttft), ours_ttft


def single_request(llm: LLM, model, vocab: int, device: str) -> dict:
    """Single-stream decode, ours and transformers' (same prompt length and output length)."""
    rng = random.Random(7)
    fresh = lambda: [rng.randrange(3, vocab) for _ in range(128)]  # noqa: E731
    ours_tps, ours_ttft = our_decode(llm, vocab, device)

    def hf(n: int) -> float:
        input_ids = torch.tensor([fresh()], device=device)
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=input_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        sync(device)
        return time.perf_counter() - start

    hf(4)
    hf_ttft = median([hf(1) for _ in range(3)])
    hf_total = median([hf(64) for _ in range(3)])
    return {"ours_decode_tps": ours_tps, "hf_decode_tps": 63 / (hf_total - hf_ttft),
            "ours_ttft": ours_ttft, "hf_ttft": hf_ttft}


def prefix_ttft(path, device: str, dtype: str, vocab: int, caching: bool) -> float:
    """16 requests sharing a 512-token prefix (distinct 16-token suffixes), sent together: mean TTFT."""
    llm = LLM.load(path, dtype=dtype, device=device, enable_prefix_caching=caching, max_num_batched_tokens=2048)
    rng = random.Random(11)
    prefix = [rng.randrange(3, vocab) for _ in range(512)]
    warm = run_engine(llm, [([rng.randrange(3, vocab) for _ in range(64)], 1)], device)  # noqa: F841 - warm-up
    requests = [(prefix + [rng.randrange(3, vocab) for _ in range(16)], 1) for _ in range(16)]
    result = run_engine(llm, requests, device)
    return sum(result["ttft"]) / len(result["ttft"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tiny", action="store_true", help="a tiny model, to check the script quickly")
    parser.add_argument("--hf-batch-size", type=int, default=32)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    shape = TINY if args.tiny else QWEN2_05B
    torch_dtype = getattr(torch, args.dtype)
    path = random_checkpoint(shape, torch_dtype)
    vocab = shape["vocab_size"]

    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(args.device).eval()
    llm = LLM.load(path, dtype=args.dtype, device=args.device)
    requests = workload(0, vocab)
    run_engine(llm, workload(1, vocab, 4), args.device)  # warm-up
    run_transformers(hf_model, workload(1, vocab, 4), 4, args.device)

    ours = run_engine(llm, requests, args.device)
    theirs = run_transformers(hf_model, requests, args.hf_batch_size, args.device)
    single = single_request(llm, hf_model, vocab, args.device)
    weight_bytes = llm.metrics()["weight_bytes"]
    bandwidth = copy_bandwidth(args.device)
    variants = {}  # single-stream decode of other weight formats, against transformers' bf16 decode
    for label, options in (("bf16, plain F.linear", {"pack_weights": False}), ("int8", {"quantization": "int8"}),
                           ("w8a8", {"quantization": "w8a8"}),
                           ("int4 g32", {"quantization": "int4", "quantization_group_size": 32}),
                           ("int4 g128", {"quantization": "int4", "quantization_group_size": 128})):
        if args.device == "cuda" and "pack_weights" in options:
            continue
        other = LLM.load(path, dtype=args.dtype, device=args.device, kv_cache_memory="1GiB", **options)
        tps, _ = our_decode(other, vocab, args.device)
        variants[label] = (tps, other.metrics()["weight_bytes"])
        other.close()
        del other
    with_cache = prefix_ttft(path, args.device, args.dtype, vocab, True)
    without_cache = prefix_ttft(path, args.device, args.dtype, vocab, False)

    ours_tps, hf_tps = ours["tokens"] / ours["seconds"], theirs["tokens"] / theirs["seconds"]
    results = {
        "device": args.device, "dtype": args.dtype, "shape": "tiny" if args.tiny else "qwen2-0.5b",
        "threads": torch.get_num_threads(),
        "throughput_ours_tok_s": ours_tps, "throughput_hf_tok_s": hf_tps, "throughput_ratio": ours_tps / hf_tps,
        "decode_ours_tok_s": single["ours_decode_tps"], "decode_hf_tok_s": single["hf_decode_tps"],
        "decode_ratio": single["ours_decode_tps"] / single["hf_decode_tps"],
        "bandwidth_share": weight_bytes * single["ours_decode_tps"] / bandwidth, "copy_bandwidth_gb_s": bandwidth / 1e9,
        "decode_variants": {label: {"tok_s": tps, "ratio_to_hf_bf16": tps / single["hf_decode_tps"],
                                    "bandwidth_share": nbytes * tps / bandwidth}
                            for label, (tps, nbytes) in variants.items()},
        "prefix_ttft_cached_s": with_cache, "prefix_ttft_uncached_s": without_cache,
        "prefix_ttft_ratio": without_cache / with_cache,
        "ttft_p50_s": median(ours["ttft"]), "ttft_p99_s": percentile(ours["ttft"], 99),
        "tpot_p50_s": median(ours["tpot"]), "tpot_p99_s": percentile(ours["tpot"], 99),
    }
    print_table(f"engine vs transformers ({results['shape']}, {args.dtype}, {args.device}, "
                f"{results['threads']} threads)", [
        ("32 requests: ours (output tok/s)", f"{ours_tps:.1f}"),
        ("32 requests: transformers (output tok/s)", f"{hf_tps:.1f}"),
        ("throughput ratio", f"{results['throughput_ratio']:.2f}x"),
        ("1 request decode: ours (tok/s)", f"{single['ours_decode_tps']:.1f}"),
        ("1 request decode: transformers (tok/s)", f"{single['hf_decode_tps']:.1f}"),
        ("decode ratio", f"{results['decode_ratio']:.2f}x"),
        ("share of bandwidth limit", f"{results['bandwidth_share']:.0%} of {results['copy_bandwidth_gb_s']:.1f} GB/s"),
        *[(f"1 request decode, {label} (tok/s; x transformers bf16; bandwidth share)",
           f"{v['tok_s']:.1f}; {v['ratio_to_hf_bf16']:.2f}x; {v['bandwidth_share']:.0%}")
          for label, v in results["decode_variants"].items()],
        ("prefix TTFT, caching on (s)", f"{with_cache:.3f}"),
        ("prefix TTFT, caching off (s)", f"{without_cache:.3f}"),
        ("prefix TTFT ratio", f"{results['prefix_ttft_ratio']:.1f}x"),
        ("TTFT p50 / p99 (s)", f"{results['ttft_p50_s']:.3f} / {results['ttft_p99_s']:.3f}"),
        ("TPOT p50 / p99 (ms)", f"{results['tpot_p50_s'] * 1e3:.1f} / {results['tpot_p99_s'] * 1e3:.1f}"),
    ])
    save_json(args.json, results)


if __name__ == "__main__":
    main()
