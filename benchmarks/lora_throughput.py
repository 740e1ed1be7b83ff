"""LoRA benchmark (issue 15): adapters served unmerged on one base, in one run on one random Qwen2-0.5B-shaped
checkpoint (common.random_checkpoint; `--layers` keeps the first N of its 24 layers, the default 8 on a 2-core CPU)
with random rank-16 adapters on every linear layer of the decoder (q, k, v, o, gate, up, down).

Measured, repetitions interleaved (base, loaded-unused, mixed, base, ...), medians reported:
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


def throughput(llm: LLM, requests, loras: list[str | None], device: str) -> float:
    """All requests at once, run to completion: output tokens per second."""
    engine = llm.engine
    sync(device)
    start = time.perf_counter()
    ids = [engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, lora=lora))
           for (prompt, n), lora in zip(requests, loras, strict=True)]
    engine.run_to_completion(ids)
    sync(device)
    return sum(n for _, n in requests) / (time.perf_counter() - start)


def decode_ms(llm: LLM, vocab: int, loras: list[str | None], device: str, steps: int = 24) -> float:
    """Median ms of a decode step of len(loras) rows (prefill done first, fresh prompts so nothing is cached)."""
    engine = llm.engine
    rng = random.Random(len(set(loras)))
    ids = [engine.add_request([rng.randrange(3, vocab) for _ in range(32)],
                              SamplingParams(max_tokens=steps + 4, temperature=0, ignore_eos=True, lora=lora))
           for lora in loras]
    while any(len(engine.groups[i].children[0].token_ids) == 0 for i in ids):
        engine.step()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        engine.step()
        sync(device)
        times.append(time.perf_counter() - start)
    engine.run_to_completion(ids)
    return 1000 * median(times)


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
    options = dict(dtype=args.dtype, device=args.device, kv_cache_memory="2GiB", max_num_seqs=64,
                   max_num_batched_tokens=2048, enable_prefix_caching=False)
    if args.threads:
        options["num_threads"] = args.threads
    vocab = shape["vocab_size"]
    requests = workload(1, vocab, 32, (32, 128), (32, 64))
    base_only: list[str | None] = [None] * len(requests)
    mixed = [f"a{i % 4}" for i in range(len(requests))]

    base = LLM.load(path, **options)
    served = LLM.load(path, lora_adapters=four, max_loras=4, **options)
    warm = workload(2, vocab, 8, (16, 32), (4, 8))
    throughput(base, warm, [None] * 8, args.device)
    throughput(served, warm, [f"a{i % 4}" for i in range(8)], args.device)  # wraps the layers, fills the slots
    results: dict[str, list[float]] = {"base": [], "loaded_unused": [], "mixed_4": []}
    for _ in range(args.repeats):
        results["base"].append(throughput(base, requests, base_only, args.device))
        results["loaded_unused"].append(throughput(served, requests, base_only, args.device))
        results["mixed_4"].append(throughput(served, requests, mixed, args.device))
    medians = {key: median(values) for key, values in results.items()}
    base.close()
    served.close()
    del base, served

    many = LLM.load(path, lora_adapters=adapters, max_loras=16, **options)
    decode_ms(many, vocab, [f"a{i}" for i in range(16)], args.device, steps=4)  # warm-up: every slot filled
    steps = {}
    for distinct in (0, 1, 4, 16):
        loras = [None] * 16 if distinct == 0 else [f"a{i % distinct}" for i in range(16)]
        steps[distinct] = median([decode_ms(many, vocab, loras, args.device) for _ in range(args.repeats)])
    many.close()

    rows = [("checkpoint", f"{'tiny' if args.tiny else 'Qwen2-0.5B'} shape, {shape['num_hidden_layers']} layers, "
                           f"{args.dtype}, {args.device}"),
            ("adapters", f"rank {args.rank} on q,k,v,o,gate,up,down"),
            ("engine threads", str(args.threads or "the engine's choice (idle cores)"))]
    for key, label in (("base", "32 requests, base only"), ("loaded_unused", "32 base requests, 4 adapters loaded"),
                       ("mixed_4", "32 requests over 4 adapters")):
        rows.append((f"{label} (tok/s, median of {args.repeats})",
                     f"{medians[key]:.1f}  [{', '.join(f'{v:.1f}' for v in results[key])}]"))
    rows.append(("loaded-unused / base", f"{medians['loaded_unused'] / medians['base']:.3f}"))
    rows.append(("mixed over 4 adapters / base", f"{medians['mixed_4'] / medians['base']:.3f}"))
    for distinct, ms in steps.items():
        rows.append((f"decode step, 16 rows, {distinct} distinct adapters (ms)", f"{ms:.1f}"))
    print_table("LoRA adapters served unmerged", rows)
    save_json(args.json, {"shape": shape, "rank": args.rank, "throughput": results, "medians": medians,
                          "decode_ms": steps})


if __name__ == "__main__":
    main()
