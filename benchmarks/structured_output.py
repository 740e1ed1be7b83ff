"""Structured output benchmark (issue 14): 32 concurrent requests under JSON schemas against the same 32 requests
unconstrained, in one run, on a random Qwen2-0.5B-shaped checkpoint with a real 151,936-row vocabulary (the
151,643-entry byte-level BPE of benchmarks/grammar_engines.py). Reports decode throughput of both and their ratio,
with the masks computed during the forward (the default) and after it; mask time per step and per token (p50/p99);
compile time per schema (cold, and from the cache).

    .venv/bin/python benchmarks/structured_output.py                 # 24 layers, bf16, 2 threads
    .venv/bin/python benchmarks/structured_output.py --layers 4      # quicker, same vocabulary

Request i uses schema i % 10 of tests/engine/json_schemas.py, temperature 1 and seed i, so the run is repeatable.
Constrained requests end when their JSON is complete; for a fair comparison each unconstrained request is given
max_tokens = the length of its constrained twin's output (ignore_eos), so both runs decode the same number of
tokens with the same batch sizes at every step. Decode throughput = tokens after each request's first / the time
from the step in which the last request got its first token to the end (prefill excluded), three ways: the median
run's wall time; the sum over steps of each step's fastest wall time across the interleaved repeats (robust to a
busy neighbour); and process CPU time (every thread's work, the mask threads' included).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "engine"))

from common import QWEN2_05B, median, percentile, random_checkpoint, save_json  # noqa: E402
from grammar_engines import write_qwen2_size_tokenizer  # noqa: E402
from json_schemas import SCHEMAS  # noqa: E402

from llmasos import LLM, SamplingParams  # noqa: E402
from llmasos.engine.structured_output import check_constraint  # noqa: E402
from llmasos.sampling_params import StructuredOutputsParams  # noqa: E402

SCHEMA_NAMES = list(SCHEMAS)


def make_checkpoint(directory: Path, layers: int, tokenizer_dir: Path) -> Path:
    if not (directory / "config.json").is_file():
        random_checkpoint({**QWEN2_05B, "num_hidden_layers": layers}, torch.bfloat16, directory)
        for stale in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (directory / stale).unlink(missing_ok=True)
        write_qwen2_size_tokenizer(tokenizer_dir)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_dir / name, directory / name)
    return directory


def run(llm: LLM, prompts: list[str], params: list[SamplingParams]) -> dict:
    engine = llm.engine
    start = time.perf_counter()
    ids = [engine.add_request(prompt, p) for prompt, p in zip(prompts, params, strict=True)]
    first: dict[str, float] = {}
    lengths: dict[str, int] = {}
    texts: dict[str, str] = {}
    steps: list[tuple[float, float, float]] = []  # (end of step, wall seconds, process CPU seconds)
    while len(lengths) < len(ids):
        step_start, cpu_start = time.perf_counter(), time.process_time()
        groups = engine.step()
        now = time.perf_counter()
        steps.append((now, now - step_start, time.process_time() - cpu_start))
        for group in groups:
            if group.children[0].token_ids and group.request_id not in first:
                first[group.request_id] = now
            if group.finished:
                lengths[group.request_id] = len(group.children[0].token_ids)
                texts[group.request_id] = group.children[0].text
    end = time.perf_counter()
    decode_start = max(first.values())
    decode_steps = [(wall, cpu) for at, wall, cpu in steps if at > decode_start]
    decode_tokens = sum(lengths.values()) - len(ids)
    return {"seconds": end - start, "decode_tps": decode_tokens / (end - decode_start), "decode_tokens": decode_tokens,
            "step_wall": [w for w, _ in decode_steps], "step_cpu": [c for _, c in decode_steps],
            "lengths": [lengths[i] for i in ids], "texts": [texts[i] for i in ids], "tokens": sum(lengths.values())}


def robust_tps(runs: list[dict], key: str) -> float:
    """Decode tokens / the sum over steps of each step's fastest time across repeats: a neighbour's burst of load
    slows some steps of some repeats, rarely the same step in all of them."""
    num_steps = min(len(r[key]) for r in runs)
    return runs[0]["decode_tokens"] / sum(min(r[key][i] for r in runs) for i in range(num_steps))


def compile_times(llm: LLM) -> dict[str, dict[str, float]]:
    """Per schema: the front end's check (cold) and the engine's compile (cold, then cached)."""
    grammars = llm.engine.core.grammars
    started = time.perf_counter()
    grammars.tokenizer  # noqa: B018 - built once per engine; reported separately
    times = {"tokenizer_s": {"all": time.perf_counter() - started}}
    for name, schema in SCHEMAS.items():
        constraint = StructuredOutputsParams(json=schema)
        started = time.perf_counter()
        check_constraint(constraint)
        checked = time.perf_counter() - started
        started = time.perf_counter()
        grammars.matcher(constraint)
        cold = time.perf_counter() - started
        started = time.perf_counter()
        grammars.matcher(constraint)
        cached = time.perf_counter() - started
        times[name] = {"check_ms": checked * 1e3, "compile_ms": cold * 1e3, "cached_ms": cached * 1e3}
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=QWEN2_05B["num_hidden_layers"])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint", type=Path, help="reuse this directory (written if empty)")
    parser.add_argument("--tokenizer-dir", type=Path, default=Path(tempfile.gettempdir()) / "llmasos-qwen2-vocab")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    directory = args.checkpoint or Path(tempfile.mkdtemp(prefix="llmasos-so-bench-"))
    make_checkpoint(directory, args.layers, args.tokenizer_dir)
    llm = LLM.load(directory, dtype="bfloat16", num_threads=args.threads, max_num_seqs=args.requests)
    runner = llm.engine.runner
    compile = compile_times(llm)

    prompts = [f"Request {i}: reply in JSON." for i in range(args.requests)]
    constrained = [SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=i,
                                  structured_outputs={"json": SCHEMAS[SCHEMA_NAMES[i % len(SCHEMA_NAMES)]]})
                   for i in range(args.requests)]
    run(llm, prompts[:4], [SamplingParams(max_tokens=8, temperature=1.0, seed=0)] * 4)  # warm-up
    first = run(llm, prompts, constrained)
    for i, text in enumerate(first["texts"]):  # every output is valid (jsonschema is a test dependency)
        import jsonschema

        jsonschema.validate(json.loads(text), SCHEMAS[SCHEMA_NAMES[i % len(SCHEMA_NAMES)]])
    free = [SamplingParams(max_tokens=n, temperature=1.0, seed=i, ignore_eos=True)
            for i, n in enumerate(first["lengths"])]
    runs: dict[str, list[dict]] = {"constrained": [], "unconstrained": [], "constrained_no_overlap": []}
    mask_steps: list[float] = []
    mask_tokens: list[float] = []
    # per decode step, the constrained rows = requests still running (known from the lengths)
    rows = [sum(1 for n in first["lengths"] if n > step) for step in range(max(first["lengths"]))]
    for _ in range(args.repeats):  # interleaved, so a neighbour's load falls on all variants alike
        runner.mask_seconds.clear()
        got = run(llm, prompts, constrained)
        assert got["lengths"] == first["lengths"], "seeded constrained runs must repeat"
        runs["constrained"].append(got)
        for step, seconds in enumerate(runner.mask_seconds[:len(rows)]):
            mask_steps.append(seconds)
            mask_tokens.append(seconds / max(rows[step], 1))
        runs["unconstrained"].append(run(llm, prompts, free))
        runner.overlap_masks = False
        runs["constrained_no_overlap"].append(run(llm, prompts, constrained))
        runner.overlap_masks = True
    summary = {
        "layers": args.layers, "requests": args.requests, "repeats": args.repeats, "tokens_per_run": first["tokens"],
        "mean_output_tokens": first["tokens"] / args.requests,
        "mask_ms_per_step_p50": percentile(mask_steps, 50) * 1e3,
        "mask_ms_per_step_p99": percentile(mask_steps, 99) * 1e3,
        "mask_us_per_token_p50": percentile(mask_tokens, 50) * 1e6,
        "mask_us_per_token_p99": percentile(mask_tokens, 99) * 1e6,
    }
    for name, variant in runs.items():
        summary[f"{name}_tps_median_run"] = median([r["decode_tps"] for r in variant])
        summary[f"{name}_tps_fastest_steps"] = robust_tps(variant, "step_wall")
        summary[f"{name}_tps_cpu_time"] = robust_tps(variant, "step_cpu")
    for measure in ("tps_median_run", "tps_fastest_steps", "tps_cpu_time"):
        base = summary[f"unconstrained_{measure}"]
        summary[f"ratio_{measure}"] = summary[f"constrained_{measure}"] / base
        summary[f"ratio_no_overlap_{measure}"] = summary[f"constrained_no_overlap_{measure}"] / base
    summary["compile"] = compile
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items()
                      if k != "compile"}, indent=1))
    print("compile (ms): " + json.dumps({k: {m: round(x, 2) for m, x in v.items()} for k, v in compile.items()}))
    print("sample output:", first["texts"][:3])
    save_json(args.json, summary)


if __name__ == "__main__":
    main()
