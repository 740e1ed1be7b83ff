"""Where an engine step's time goes: step durations by kind (prefill / mixed / decode) and the top operators.

    python benchmarks/profile_steps.py                     # CPU, bf16, Qwen2-0.5B shape
    python benchmarks/profile_steps.py --quantization int8
    python benchmarks/profile_steps.py --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch
from common import QWEN2_05B, TINY, random_checkpoint, sync
from engine_throughput import workload

from llmasos import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--quantization", choices=["int8", "int4"], default=None)
    parser.add_argument("--no-pack", action="store_true", help="plain F.linear instead of oneDNN-packed bf16")
    args = parser.parse_args()
    shape = TINY if args.tiny else QWEN2_05B
    parser_quant = args.quantization
    path = random_checkpoint(shape, getattr(torch, args.dtype))
    llm = LLM.load(path, dtype=args.dtype, device=args.device, quantization=parser_quant,
                   pack_weights=not args.no_pack)
    engine = llm.engine

    def run(requests, profile=False):
        for prompt, n in requests:
            engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        kinds: dict[str, list[float]] = {}
        while engine.has_unfinished():
            out_kind = None
            sync(args.device)
            start = time.perf_counter()
            sched = engine.scheduler
            pending = [(r.num_tokens - r.num_computed_tokens) for r in sched.running] + [1]
            out_kind = "decode" if max(pending) == 1 and not sched.waiting else "prefill/mixed"
            engine.step()
            sync(args.device)
            kinds.setdefault(out_kind, []).append(time.perf_counter() - start)
        return kinds

    run(workload(1, shape["vocab_size"], 4))
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        kinds = run(workload(0, shape["vocab_size"]))
    for kind, times in kinds.items():
        print(f"{kind}: {len(times)} steps, total {sum(times):.3f} s, mean {1e3 * sum(times) / len(times):.1f} ms")
    sort = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by="self_" + sort, row_limit=25))


if __name__ == "__main__":
    main()
