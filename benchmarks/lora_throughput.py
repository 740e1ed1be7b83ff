"""LoRA benchmark (issue 15): adapters served unmerged on one base, in one run on one random Qwen2-0.5B-shaped
checkpoint (common.random_checkpoint; `--layers` keeps the first N of its 24 layers, the default 8 on a 2-core CPU)
with random rank-16 adapters on every linear layer of the decoder (q, k, v, o, gate, up, down).

Each configuration runs on an engine of its own and the engines are stepped in turn (each step timed), so a busy
machine slows them alike; throughput = output tokens / the engine's summed step time; medians of the repetitions:
  - throughput of 32 requests, base only (an engine with no adapter);
  - the same 32 base-only requests on an engine holding 4 adapters that has served them before (the layers are
    wrapped): "loaded but unused", goal >= 98% of base;
  - 32 requests spread evenly over the 4 adapters on that engine: goal >= 85%, must >= 70% of base;
  - decode ms per step of a 16-row batch with 0 (base), 1, 4 and 16 distinct adapters.

    python benchmarks/lora_throughput.py                   # CPU, bf16, 8 layers
    python benchmarks/lora_throughput.py --layers 24       # the full depth
    python benchmarks/lora_throughput.py --device cuda --layers 24
    python benchmarks/lora_throughput.py --tiny            # a quick check of the script itself
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from common import QWEN2_05B, TINY, median, print_table, random_checkpoint, save_json, sync
from safetensors.torch import save_file

from llmasos import LLM, SamplingParams

TARGETS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def make_adapter(directory: Path, shape: dict, rank: int, seed: int) -> Path:
    """A PEFT-format adapter with random A and B on every linear layer of the decoder."""
    hidden, inner = shape["hidden_size"], shape["intermediate_size"]
    head_dim = hidden // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    features = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
                "gate_proj": (hidden, inner), "up_proj": (hidden, inner), "down_proj": (inner, hidden)}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shape["num_hidden_layers"]):
        for block, names in TARGETS.items():
            for name in names:
                in_features, out_features = features[name]
                prefix = f"base_model.model.model.layers.{layer}.{block}.{name}"
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.01
                tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
              str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": [n for names in TARGETS.values() for n in names], "use_rslora": False}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def workload(seed: int, vocab: int, count: int, prompt: tuple[int, int], output: tuple[int, int]):
    rng = random.Random(seed)
    return [([rng.randrange(3, vocab) for _ in range(rng.randint(*prompt))], rng.randint(*output))
            for _ in range(count)]


class Run:
    """One engine working through one workload, stepped by `interleaved` in turn with the others."""

    def __init__(self, llm: LLM, requests, loras: list[str | None]) -> None:
        self.engine = llm.engine
        self.num_tokens = sum(n for _, n in requests)
        self.ids = [self.engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True,
                                                                   lora=lora))
                    for (prompt, n), lora in zip(requests, loras, strict=True)]
        self.seconds = 0.0
        self.cpu_seconds = 0.0  # this thread's CPU time: with one torch thread, the step's work itself
        self.step_seconds: list[float] = []

    @property
    def done(self) -> bool:
        return not self.engine.has_unfinished()


def interleaved(runs: list[Run], device: str) -> None:
    """Step every unfinished run in turn, timing each step: a busy machine slows all of them alike, which
    back-to-back runs (seconds apart) cannot promise."""
    turn = 0
    while not all(run.done for run in runs):
        turn += 1
        for run in runs[turn % len(runs):] + runs[:turn % len(runs)]:  # who goes first rotates
            if run.done:
                continue
            sync(device)
            start, cpu_start = time.perf_counter(), time.thread_time()
            run.engine.step()
            sync(device)
            elapsed = time.perf_counter() - start
            run.cpu_seconds += time.thread_time() - cpu_start
            run.seconds += elapsed
            run.step_seconds.append(elapsed)


def decode_runs(llms: list[LLM], vocab: int, loras_per_llm: list[list[str | None]], device: str,
                steps: int = 24) -> list[float]:
    """Median ms of a decode step of each engine's rows (prompts of 32 tokens prefilled first, then `steps` decode
    steps timed, the engines interleaved)."""
    rng = random.Random(len(llms))
    runs = [Run(llm, [([rng.randrange(3, vocab) for _ in range(32)], steps + 1) for _ in loras], loras)
            for llm, loras in zip(llms, loras_per_llm, strict=True)]
    for run in runs:
        run.engine.step()  # the prefill of every row (16 x 32 tokens fit one step's budget)
    interleaved(runs, device)
    return [1000 * median(run.step_seconds) for run in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the Qwen2-0.5B shape (24: all)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="engine torch threads (default: the engine's)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model: checks the script, measures nothing")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    shape = dict(TINY if args.tiny else QWEN2_05B)
    if not args.tiny:
        shape["num_hidden_layers"] = args.layers
    root = Path(tempfile.mkdtemp(prefix="llmasos-lora-bench-"))
    path = random_checkpoint(shape, directory=root / "base")
    adapters = {f"a{i}": make_adapter(root / f"a{i}", shape, args.rank, seed=i) for i in range(16)}
    four = {name: adapters[name] for name in ("a0", "a1", "a2", "a3")}
    options = dict(dtype=args.dtype, device=args.device, kv_cache_memory="512MiB", max_num_seqs=64,
                   max_num_batched_tokens=2048, enable_prefix_caching=False)
    if args.threads:
        options["num_threads"] = args.threads
    vocab = shape["vocab_size"]
    requests = workload(1, vocab, 32, (32, 128), (32, 64))
    base_only: list[str | None] = [None] * len(requests)
    mixed = [f"a{i % 4}" for i in range(len(requests))]

    base = LLM.load(path, **options)
    unused = LLM.load(path, lora_adapters=four, max_loras=4, **options)
    served = LLM.load(path, lora_adapters=four, max_loras=4, **options)
    warm = workload(2, vocab, 8, (16, 32), (4, 8))
    warm_loras = [f"a{i % 4}" for i in range(8)]
    # Warm-up; on the adapter engines it wraps the layers and fills the slots (so "unused" pays the wrappers).
    interleaved([Run(base, warm, [None] * 8), Run(unused, warm, warm_loras), Run(served, warm, warm_loras)],
                args.device)
    results: dict[str, list[float]] = {"base": [], "loaded_unused": [], "mixed_4": []}
    cpu_results: dict[str, list[float]] = {key: [] for key in results}
    for repeat in range(args.repeats):
        runs = {"base": Run(base, requests, base_only), "loaded_unused": Run(unused, requests, base_only),
                "mixed_4": Run(served, requests, mixed)}
        interleaved(list(runs.values()), args.device)
        for key, run in runs.items():
            results[key].append(run.num_tokens / run.seconds)
            cpu_results[key].append(run.num_tokens / run.cpu_seconds)
        print(f"repeat {repeat}: " + ", ".join(f"{key} {values[-1]:.1f} tok/s" for key, values in results.items())
              + "; per CPU second: " + ", ".join(f"{key} {values[-1]:.1f}" for key, values in cpu_results.items()),
              flush=True)
    medians = {key: median(values) for key, values in results.items()}
    for llm in (base, unused, served):
        llm.close()
    del base, unused, served

    counts = (0, 1, 4, 16)
    engines = [LLM.load(path, lora_adapters=adapters if n else {}, max_loras=16, **options) for n in counts]
    loras = [[None] * 16 if n == 0 else [f"a{i % n}" for i in range(16)] for n in counts]
    decode_runs(engines, vocab, loras, args.device, steps=2)  # warm-up: layers wrapped, slots filled
    samples = [decode_runs(engines, vocab, loras, args.device) for _ in range(args.repeats)]
    steps = {n: median([sample[i] for sample in samples]) for i, n in enumerate(counts)}
    for n in counts:
        print(f"decode step, 16 rows, {n} distinct adapters: {steps[n]:.1f} ms", flush=True)

    rows = [("checkpoint", f"{'tiny' if args.tiny else 'Qwen2-0.5B'} shape, {shape['num_hidden_layers']} layers, "
                           f"{args.dtype}, {args.device}"),
            ("adapters", f"rank {args.rank} on q,k,v,o,gate,up,down"),
            ("engine threads", str(args.threads or "the engine's choice (idle cores)"))]
    for key, label in (("base", "32 requests, base only"), ("loaded_unused", "32 base requests, 4 adapters loaded"),
                       ("mixed_4", "32 requests over 4 adapters")):
        rows.append((f"{label} (tok/s, median of {args.repeats})",
                     f"{medians[key]:.1f}  [{', '.join(f'{v:.1f}' for v in results[key])}]"))
    ratios = {key: [value / base_value for value, base_value in zip(results[key], results["base"], strict=True)]
              for key in ("loaded_unused", "mixed_4")}
    cpu_ratios = {key: [value / base_value for value, base_value in zip(cpu_results[key], cpu_results["base"],
                                                                        strict=True)]
                  for key in ("loaded_unused", "mixed_4")}
    for key, label in (("loaded_unused", "loaded-unused / base"), ("mixed_4", "mixed over 4 adapters / base")):
        rows.append((f"{label}: ratio of medians; median of per-repeat ratios",
                     f"{medians[key] / medians['base']:.3f}; {median(ratios[key]):.3f}  "
                     f"[{', '.join(f'{r:.3f}' for r in ratios[key])}]"))
        rows.append((f"{label}, per CPU second of the stepping thread: median of per-repeat ratios",
                     f"{median(cpu_ratios[key]):.3f}  [{', '.join(f'{r:.3f}' for r in cpu_ratios[key])}]"))
    for distinct, ms in steps.items():
        rows.append((f"decode step, 16 rows, {distinct} distinct adapters (ms)", f"{ms:.1f}"))
    print_table("LoRA adapters served unmerged", rows)
    save_json(args.json, {"shape": shape, "rank": args.rank, "throughput": results, "medians": medians,
                          "ratios": ratios, "cpu_throughput": cpu_results, "cpu_ratios": cpu_ratios,
                          "decode_ms": steps})


if __name__ == "__main__":
    main()
